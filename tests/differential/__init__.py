"""Differential harness: syncbn against torch's single-process batch norm, searched with hypothesis.

See reference.py for the contract and the tolerance rule, configs.py for the configuration space
and the known-failure switches, test_regressions.py for every finding kept as a named test.
"""

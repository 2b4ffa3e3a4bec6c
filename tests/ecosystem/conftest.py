"""The ecosystem tier runs next to other jobs on 2 cores: one intra-op thread per test process."""

import torch

torch.set_num_threads(1)

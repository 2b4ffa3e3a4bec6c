"""syncbn: synchronized batch normalization for data-parallel PyTorch (CPU with Gloo; CUDA with NCCL)."""

from .batchnorm import SyncBatchNorm, sync_batch_norm
from .comm import new_sync_groups, set_debug, set_shared_memory
from .convert import BatchNormNd, convert_sync_bn, revert_sync_bn
from .convert import convert_bn_to_gn, freeze_bn, unfreeze_bn
from .convert import ConversionContext, register_conversion
from .norm_act import BatchNormAct, FrozenBatchNormAct, GroupNormAct, SyncBatchNormAct, SyncBatchRenormAct
from .micro_batch import FrozenBatchNorm, accumulate_bn_stats, recompute_bn_stats
from .renorm import RenormSchedule, SyncBatchRenorm
from .distributed import DistInfo, cleanup, init_distributed

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm",
    "sync_batch_norm",
    "new_sync_groups",
    "set_debug",
    "set_shared_memory",
    "convert_sync_bn",
    "revert_sync_bn",
    "BatchNormNd",
    "SyncBatchRenorm",
    "RenormSchedule",
    "accumulate_bn_stats",
    "recompute_bn_stats",
    "FrozenBatchNorm",
    "freeze_bn",
    "unfreeze_bn",
    "convert_bn_to_gn",
    "register_conversion",
    "ConversionContext",
    "SyncBatchNormAct",
    "SyncBatchRenormAct",
    "FrozenBatchNormAct",
    "BatchNormAct",
    "GroupNormAct",
    "init_distributed",
    "cleanup",
    "DistInfo",
    "__version__",
]

"""syncbn: synchronized batch normalization for data-parallel PyTorch (CPU with Gloo; CUDA with NCCL)."""

from ._consistency import set_debug
from ._masking import masked, sequence_mask
from ._rules import ConversionContext, register_conversion
from .batchnorm import BatchNormNd, SyncBatchNorm, sync_batch_norm
from .comm import new_sync_groups, set_shared_memory
from .convert import convert_bn_to_gn, convert_sync_bn, freeze_bn, revert_sync_bn, unfreeze_bn
from .distributed import DistInfo, cleanup, init_distributed
from .frozen import FrozenBatchNorm
from .micro_batch import accumulate_bn_stats, recompute_bn_stats
from .norm_act import BatchNormAct, FrozenBatchNormAct, GroupNormAct, SyncBatchNormAct, SyncBatchRenormAct
from .renorm import RenormSchedule, SyncBatchRenorm

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm",
    "sync_batch_norm",
    "masked",
    "sequence_mask",
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

"""ditkernels: attention and selective-scan kernels for Diffusion Transformers.

``import ditkernels`` never needs a compiled library, a GPU or triton: backends load on first use,
and ``python -m ditkernels info`` explains any that is missing.
"""

from __future__ import annotations

# The first call of any torch.library.custom_op imports torch._dynamo (torch's custom_op wraps each
# backend implementation in a dynamo-disable that imports it lazily): 1-2 s of CPU on a first scan or
# attention call. Importing it here moves that one-time cost to `import ditkernels` (README, "First call").
import torch._dynamo  # noqa: F401

from .ops.attention import attention
from .ops.local import LocalPlan, local_attention, local_attention_plan
from .ops.rettention import Band, BlockTopK, LocalWindow, ReCache, ReSchedule, ReStepper, rettention
from .ops.sparse import block_sparse_attention, block_topk_attention, block_topk_schedule
from .ops.topk import topk_attention
from .ops.selective_scan import selective_scan, selective_scan_fn
from .ops.scan2d import merge_directions, multi_direction_scan, scan_orders, split_directions
from . import nn
from .nn.attention import swap_attention
from .schedule import BlockSchedule, ElementMask, Epilogue

__version__ = "0.1.0"

__all__ = ["attention", "selective_scan", "selective_scan_fn", "BlockSchedule", "ElementMask", "Epilogue", "__version__"]
__all__ += ["local_attention", "local_attention_plan", "LocalPlan"]
__all__ += ["rettention", "ReCache", "ReSchedule", "ReStepper", "Band", "LocalWindow", "BlockTopK"]
__all__ += ["block_sparse_attention", "block_topk_attention", "block_topk_schedule", "topk_attention"]
__all__ += ["multi_direction_scan", "split_directions", "merge_directions", "scan_orders", "nn"]
__all__ += ["swap_attention"]

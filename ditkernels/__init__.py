"""ditkernels: attention and selective-scan kernels for Diffusion Transformers.

``import ditkernels`` never needs a compiled library, a GPU or triton: backends load on first use,
and ``python -m ditkernels info`` explains any that is missing.
"""

from __future__ import annotations

from .ops.attention import attention
from .schedule import BlockSchedule, ElementMask, Epilogue

__version__ = "0.1.0"

__all__ = ["attention", "BlockSchedule", "ElementMask", "Epilogue", "__version__"]

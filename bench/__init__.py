"""Benchmarks of ditkernels against the peers a user would pick (SDPA, FlexAttention, ...).

Installed as ``ditkernels.bench``; run with ``python -m ditkernels bench`` (see
:func:`ditkernels.bench.runner.main`). Each op module in this package (``attention.py``, later
``local.py``, ``sparse.py``, ``scan.py``) registers its cases with :func:`register`; the runner
discovers every module of the package, so a new op module needs no edit elsewhere.
"""

from .runner import Case, SkipImpl, SweepConfig, main, register

__all__ = ["Case", "SkipImpl", "SweepConfig", "main", "register"]

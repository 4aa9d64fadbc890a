"""Triton kernels of ditkernels (installed as ``ditkernels.triton_kernels``).

Importing a submodule imports triton; set ``TRITON_INTERPRET=1`` before that to run the kernels on
CPU tensors (tests).

- ``flash``: the flash-attention core (forward, backward, shipped configs) that every attention op runs;
- ``block_select``: block top-k selection (key-block means, then scores and an exact top-k per query block);
- ``selective_scan``: Mamba's selective scan (forward, backward);
- ``_interpreter``: the bfloat16 fixes applied to Triton's interpreter under ``TRITON_INTERPRET=1``.

Launchers: ``ditkernels/backends/triton.py`` and ``ditkernels/backends/triton_scan.py``.
"""

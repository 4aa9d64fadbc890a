"""Triton kernels of ditkernels (installed as ``ditkernels.triton_kernels``).

Importing a submodule imports triton; set ``TRITON_INTERPRET=1`` before that to run the kernels on
CPU tensors (tests). ``flash``: the flash-attention core (forward, backward, shipped configs).
"""

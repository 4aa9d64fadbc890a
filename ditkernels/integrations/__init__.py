"""Integrations with model libraries (docs/spec.md §5). Each submodule imports its library, so import it
explicitly; ``import ditkernels`` imports none of them.

- :mod:`ditkernels.integrations.diffusers`: attention processors for diffusers' DiT, PixArt, FLUX and
  SD3 transformers (``pip install diffusers``).

timm models need no integration: :func:`ditkernels.swap_attention` replaces their ``Attention`` modules.
"""

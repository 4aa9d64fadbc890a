"""Fixes to Triton's CPU interpreter (``TRITON_INTERPRET=1``) so that it computes what a GPU computes.

Only the interpreter is touched, never compiled kernels; :func:`patch` is idempotent and every kernel
module of ditkernels calls it at import when the interpreter is on. Two bfloat16 defects of Triton
3.x's interpreter (it stores bf16 as raw ``uint16`` bit patterns):

* ``tl.dot`` multiplies the raw bit patterns of bf16 operands. We widen them to float32 first (exact:
  bf16 products are exact in fp32, as in a GPU's bf16 MMA with fp32 accumulation).
* float32 -> bfloat16 conversions (``x.to(tl.bfloat16)``) truncate instead of rounding to nearest
  even, doubling the rounding error and biasing it; a GPU rounds to nearest even. We round to
  nearest even on the bit patterns (NaN stays NaN).

And one speed fix: ``tl.associative_scan`` with a custom combine runs one element at a time there (a
Python call per element, ~0.1 s per 4096-element chunk). We run the same sequential left-to-right
fold along the scan axis with each step vectorised over the other axes (combine functions are
elementwise, so the results are the same). A combine made of arithmetic operators only is called on
the numpy arrays themselves (float32 stays float32); others get interpreter tensors.
"""

from __future__ import annotations

import os

import numpy as np

_DONE = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even), returned as uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def patch() -> None:
    """Install the fixes into ``triton.runtime.interpreter`` (no-op after the first call)."""
    global _DONE
    if _DONE:
        return
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    builder = _interp.InterpreterBuilder
    TensorHandle = _interp.TensorHandle

    def is_bf16(dtype) -> bool:
        return dtype.scalar == tl.bfloat16 if hasattr(dtype, "scalar") else dtype == tl.bfloat16

    def widen(x):
        if is_bf16(x.dtype):
            return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    orig_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def narrow(src, dst_type):
        """The bf16 result of converting float ``src`` to ``dst_type``; None when that is not such a conversion."""
        if not is_bf16(dst_type) or is_bf16(src.dtype):
            return None
        data = widen(src).data if not is_bf16(src.dtype) else src.data
        if data.dtype.kind != "f":
            return None
        return TensorHandle(f32_to_bf16_bits(data.astype(np.float32)), tl.bfloat16)

    orig_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        out = narrow(src, dst_type)
        return out if out is not None else orig_cast(self, src, dst_type)

    orig_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = narrow(src, dst_type)  # GPUs round bf16 down-casts to nearest even by default
        return out if out is not None else orig_fp_to_fp(self, src, dst_type, rounding_mode)

    ops = _interp.ScanOps

    def generic_scan(self, input):
        datas = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
        outs = [np.empty_like(x) for x in datas]
        fn = self.combine_fn.fn

        def combine_numpy(acc, cur):
            ret = fn(*acc, *cur)
            return tuple(np.asarray(r, dtype=x.dtype) for r, x in zip(ret if isinstance(ret, tuple) else (ret,),
                                                                     datas))

        def combine_tl(acc, cur):
            wrap = lambda vals: tuple(self.to_tensor(v, arg.dtype) for v, arg in zip(vals, input))
            ret = fn(*wrap(acc), *wrap(cur))
            ret = ret if isinstance(ret, tuple) else (ret,)
            return tuple(np.broadcast_to(r.handle.data if isinstance(r, tl.core.tensor) else r,
                                         x.shape[1:]) for r, x in zip(ret, datas))

        combine = combine_numpy
        acc = tuple(x[0] for x in datas)
        for o, v in zip(outs, acc):
            o[0] = v
        for i in range(1, datas[0].shape[0]):
            cur = tuple(x[i] for x in datas)
            try:
                acc = combine(acc, cur)
            except Exception:  # the combine calls tl.* functions: interpreter tensors
                if combine is combine_tl:
                    raise
                combine = combine_tl
                acc = combine(acc, cur)
            for o, v in zip(outs, acc):
                o[i] = v
        return [self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), arg.dtype)
                for o, arg in zip(outs, input)]

    generic_scan._ditkernels = True
    ops.generic_scan = generic_scan

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    # create_fp_trunc and friends are lambdas that look up cast_impl on the instance at call time.
    _DONE = True

"""``python -m ditkernels compile-report``: compile every shipped GPU kernel without a GPU.

Each shipped Triton configuration (``ditkernels.triton_kernels.flash``) is compiled for the real
targets of ``ditkernels.triton_kernels.archs`` (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120: TTIR ->
PTX -> cubin, the same compiler a GPU run uses, with the launch ``flash.launches`` gives a contiguous
problem), and its cubin is read with the ``cuobjdump`` bundled in the triton wheel: registers, spills
(local memory), stack, shared memory and the tensor-core instruction (UTCHMMA & co: Blackwell's
tcgen05.mma; HGMMA: sm_90 warpgroup MMA; HMMA: mma.sync; none: CUDA-core FMA). The embedded cubins of the
``ditkernels._cuda`` extension, when built, are reported the same way.
The selective-scan kernels (``ditkernels.triton_kernels.selective_scan``, rows ``scan_fwd`` /
``scan_bwd``, see :class:`ScanJob`) and the block top-k selection kernels
(``ditkernels.triton_kernels.block_select``, rows ``select_pool`` / ``select_blocks``, see
:class:`SelectJob`) are compiled and checked like the attention kernels.

Exit status 1 when any kernel fails to compile, spills, uses more shared memory than its arch has
per block, or (fp16/bf16 attention) does not use its arch's tensor-core instruction (``Arch.mma``);
an arch the installed triton cannot compile for is one failed row that says why.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from ditkernels.triton_kernels.archs import ARCHS

# Max shared memory per block (opt-in), bytes, per arch.
SHARED_LIMIT = {sm: a.shared_per_block for sm, a in ARCHS.items()}
ATTN_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")


@dataclass(frozen=True)
class Job:
    """One compilation: a shipped config of a kernel plus the plug-in variant."""

    arch: int
    kernel: str  # fwd | bwd_preprocess | bwd_dkdv | bwd_dq
    dtype: str  # fp16 | bf16 | fp32
    block_d: int
    # dense | csr (SCHEDULE=1) | local (SCHEDULE=2 token tables + MASK=1, local attention's plan tiles;
    # local_n32 / local_n16: the forward on plans of 32 / 16-key tiles) | epilogue | odd_d (head_dim <
    # BLOCK_D: masked head dims) | topk (csr + MASK 3, exact top-k's score threshold) | band (csr +
    # MASK_BAND: the sparse pass of a Re-ttention refresh) | rettention (csr + MASK_BAND + epilogue: its
    # sparse step) | local_rettention (local + epilogue: the sparse step with a LocalWindow mask)
    variant: str = "dense"
    part: str = ""  # bwd_dkdv with a split config: "dk" or "dv" (one launch each)


@dataclass
class Row:
    arch: int
    kernel: str
    variant: str
    dtype: str
    block_d: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_bytes: int = -1
    stack: int = -1
    shared: int = -1
    mma: str = "?"
    compile_s: float = 0.0
    status: str = "ok"


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (it ships inside the triton wheel: pip install triton)")
    return found


def jobs_for(archs: list[int], quick: bool) -> list[Job]:
    """Every shipped config (plus CSR / local / epilogue / odd-head_dim variants), or a representative subset."""
    from ditkernels.triton_kernels.flash import BLOCK_D_BUCKETS, DTYPES, KERNELS

    jobs: list[Job] = []
    for arch in archs:
        if quick:  # per arch: tensor-core forward / backward at the shared-memory- and register-heaviest head dims,
            # local attention's token tables + mask, fp32's head-dim chunks under a schedule
            jobs += [Job(arch, "fwd", "fp16", 128), Job(arch, "fwd", "bf16", 256), Job(arch, "bwd_dkdv", "bf16", 128),
                     Job(arch, "bwd_dq", "fp16", 256), Job(arch, "fwd", "bf16", 128, "local"),
                     Job(arch, "bwd_dkdv", "fp32", 64, "csr")]
            continue
        for kernel in KERNELS:
            for dtype in DTYPES:
                for d in BLOCK_D_BUCKETS:
                    jobs.append(Job(arch, kernel, dtype, d))
        for d in BLOCK_D_BUCKETS:
            for kernel in ATTN_KERNELS:
                for dtype in DTYPES:
                    jobs.append(Job(arch, kernel, dtype, d, "csr"))
                    jobs.append(Job(arch, kernel, dtype, d, "local"))
                    if kernel == "fwd":
                        jobs += [Job(arch, kernel, dtype, d, f"local_n{bn}") for bn in _local_fwd_block_n()]
                jobs.append(Job(arch, kernel, "bf16", d, "odd_d"))
                for dtype in ("fp16", "bf16", "fp32"):  # exact top-k: CSR + the score-threshold mask
                    jobs.append(Job(arch, kernel, dtype, d, "topk"))
            jobs.append(Job(arch, "fwd", "bf16", d, "epilogue"))
            jobs.append(Job(arch, "fwd", "fp16", d, "band"))
            for dtype in DTYPES:
                jobs.append(Job(arch, "fwd", dtype, d, "rettention"))
                jobs.append(Job(arch, "fwd", dtype, d, "local_rettention"))
    return [p for j in jobs for p in _split(j)]


def _local_fwd_block_n() -> list[int]:
    """The forward's smaller KV tiles of local-attention plans (ditkernels.backends.triton.local_fwd_block_n)."""
    import torch

    from ditkernels.backends import triton as triton_backend

    full = triton_backend.local_block_sizes(64, torch.float16)[1]
    return [bn for bn in triton_backend.local_fwd_block_n if bn != full]


def _plugins(job: Job) -> tuple[int, int, int]:
    """(SCHEDULE, MASK, EPILOGUE) plug-ins of the launch a job stands for (see ``Job.variant``)."""
    from ditkernels.triton_kernels import flash as f

    none, epi = f.EPILOGUE_NONE, f.EPILOGUE_SCALE_RESIDUAL
    return {"dense": (f.SCHEDULE_DENSE, f.MASK_NONE, none), "odd_d": (f.SCHEDULE_DENSE, f.MASK_NONE, none),
            "epilogue": (f.SCHEDULE_DENSE, f.MASK_NONE, epi), "csr": (f.SCHEDULE_CSR, f.MASK_NONE, none),
            "topk": (f.SCHEDULE_CSR, f.MASK_THRESHOLD, none), "band": (f.SCHEDULE_CSR, f.MASK_BAND, none),
            "rettention": (f.SCHEDULE_CSR, f.MASK_BAND, epi), "local": (f.SCHEDULE_TILED, f.MASK_LOCAL, none),
            "local_rettention": (f.SCHEDULE_TILED, f.MASK_LOCAL, epi),
            }["local" if job.variant.startswith("local_n") else job.variant]


def _config_variant(job: Job) -> str:
    """The config variant (``flash.VARIANTS``) of the launch a job stands for."""
    from ditkernels.triton_kernels import flash

    return flash.launch_variant(*_plugins(job)[:2])


def _head_dim(job: Job) -> int:
    return job.block_d * 5 // 8 if job.variant == "odd_d" else job.block_d


EXAMPLE_HEADS, EXAMPLE_SEQ = 8, 4096  # a typical launch: contiguous (B=2, H=8, S=4096, head_dim)


def _launch(job: Job):
    """The ``flash.Launch`` (config, grid, constexprs, options) of a typical launch of ``job``, from
    ``flash.launches`` as the launchers take theirs. Its schedule is the one the op builds: an op's CSR has
    the forward config's tiles (``flash.block_sizes``), local attention's plans 64-token tiles
    (``ditkernels.backends.triton.local_block_sizes``), ``local_n32`` / ``local_n16`` forward plans 32 / 16 keys."""
    from ditkernels.triton_kernels import flash

    dtype, head_dim, seq = flash.DTYPES[job.dtype], _head_dim(job), EXAMPLE_SEQ
    sched_kind, mask_kind, epi = _plugins(job)
    schedule = None
    if sched_kind == flash.SCHEDULE_TILED:
        from ditkernels.backends import triton as triton_backend

        sbm, sbn = triton_backend.local_block_sizes(head_dim, dtype)
        if job.variant.startswith("local_n"):
            sbn = int(job.variant[len("local_n"):])
        schedule = flash.ScheduleShape(sched_kind, sbm, sbn, seq // sbm, seq // sbn)
    elif sched_kind == flash.SCHEDULE_CSR:
        fwd = flash.config_for("fwd", job.arch, dtype, job.block_d)
        schedule = flash.ScheduleShape(sched_kind, fwd.block_m, fwd.block_n)
    out = flash.launches(job.kernel, arch=job.arch, dtype=dtype, head_dim=head_dim, batch_heads=2 * EXAMPLE_HEADS,
                         seq_q=seq, seq_k=seq, schedule=schedule, mask_kind=mask_kind, epilogue_kind=epi)
    return out[1] if job.part == "dv" else out[0]


def _config(job: Job):
    """The config a launch of ``job`` runs (the launchers' lookup)."""
    return _launch(job).config


def _split(job: Job) -> list[Job]:
    if job.kernel == "bwd_dkdv" and _config(job).split:
        return [Job(job.arch, job.kernel, job.dtype, job.block_d, job.variant, part) for part in ("dk", "dv")]
    return [job]


_PTR_ARGS = {
    "Q": "x", "K": "x", "V": "x", "Out": "x", "DO": "x", "DK": "x", "DV": "x", "DQ": "x", "Residual": "x",
    "Lse": "fp32", "Lse2": "fp32", "Delta": "fp32", "RowScale": "fp32",
    "KvPtr": "i32", "KvIdx": "i32", "Partial": "i32", "MaskParams": "i32", "QTok": "i32", "KTok": "i32",
    "Count": "i32",
}


def _example_args(job: Job, launch) -> dict[str, object]:
    """Argument values of a typical launch of ``job``: the runtime arguments of a contiguous (B=2, H=8, S=4096,
    head_dim) problem, plus the constexprs of ``launch`` (:func:`_launch`)."""
    from ditkernels.triton_kernels import flash

    heads, seq, head_dim = EXAMPLE_HEADS, EXAMPLE_SEQ, _head_dim(job)
    s4 = (heads * seq * head_dim, seq * head_dim, head_dim, 1)
    vals: dict[str, object] = {"H": heads, "seq_q": seq, "seq_k": seq, "head_dim": head_dim,
                               "qk_scale": 0.125, "sm_scale": 0.125}
    for pre in ("q", "k", "v", "o", "do", "dk", "dv", "dq", "r", "d"):
        for i, ax in enumerate(("b", "h", ("m" if pre in ("q", "o", "do", "dq", "r", "d") else "n"), "d")):
            vals[f"stride_{pre}{ax}"] = s4[i]
    for ax, s in zip(("b", "h", "m"), (heads * seq, seq, 1)):
        vals[f"stride_s{ax}"] = s  # row_scale
        vals[f"stride_l{ax}"] = s  # lse
    sched_kind = _plugins(job)[0]
    local, sched = sched_kind == flash.SCHEDULE_TILED, sched_kind != flash.SCHEDULE_DENSE
    vals.update(stride_sched_ptr=(seq // 64 + 1) if sched else 0, stride_sched_idx=4096 if sched else 0,
                sched_head_stride=0 if local else (1 if sched else 0), count_stride=0, count_plane=0)
    vals.update(launch.constexprs)
    return vals


def _source(job: Job):
    """(ASTSource, flash.Launch, argument values) with the signature/specialisation triton's JIT would give a typical launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import native_specialize_impl

    from ditkernels.triton_kernels import flash

    fn = {"fwd": flash._flash_fwd_kernel, "bwd_preprocess": flash._flash_bwd_preprocess_kernel,
          "bwd_dkdv": flash._flash_bwd_dkdv_kernel, "bwd_dq": flash._flash_bwd_dq_kernel}[job.kernel]
    launch = _launch(job)
    vals = _example_args(job, launch)
    backend = make_backend(GPUTarget("cuda", job.arch, 32))
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = vals[name]
        elif name in _PTR_ARGS:
            ty = _PTR_ARGS[name]
            if name == "MaskParams" and vals["MASK"] == flash.MASK_THRESHOLD:
                ty = "fp32"  # MASK_THRESHOLD: per-row float thresholds
            signature[name] = "*" + (job.dtype if ty == "x" else ty)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            ty, spec = native_specialize_impl(backend, vals[name], False, True, True)
            if ty == "constexpr":
                signature[name] = "constexpr"
                constexprs[(i,)] = vals[name]
            else:
                signature[name] = ty
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), launch, vals


def _resources(kernel, arch: int) -> tuple[dict, str, list[str]]:
    """(registers / stack / spill_bytes / shared, SASS, problems) of a compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output: {usage[-300:]}")
    reg, stack, static_shared, local = map(int, m.groups())
    res = {"registers": reg, "stack": stack, "spill_bytes": local, "shared": static_shared + int(kernel.metadata.shared)}
    problems = []
    if local or stack:
        problems.append(f"spills (LOCAL:{local} STACK:{stack})")
    if res["shared"] > SHARED_LIMIT[arch]:
        problems.append(f"shared {res['shared']} > {SHARED_LIMIT[arch]}")
    return res, sass, problems


def mma_instruction(sass: str) -> str:
    """The tensor-core instruction of a kernel's SASS: Blackwell's tcgen05 ones (UTCHMMA, UTCQMMA, ..., joined
    by "+" when several), else HGMMA (sm_90 wgmma), else HMMA (mma.sync), else "none"."""
    found = set(re.findall(r"\b(UTC\w*MMA|HGMMA|HMMA)\b", sass))
    utc = sorted(n for n in found if n.startswith("UTC"))
    if utc:
        return "+".join(utc)
    return next((n for n in ("HGMMA", "HMMA") if n in found), "none")


def target_problem(arch: int) -> str | None:
    """Why the installed triton cannot compile for ``arch`` (None: it can): the ptxas triton runs for that
    arch does not list the target among its ``--gpu-name`` values."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas, name = get_ptxas(arch), sm_arch_from_capability(arch)
        text = subprocess.run([ptxas.path, "--help"], capture_output=True, text=True).stdout
    except Exception as exc:  # another triton layout: the compilations themselves will tell
        return None if isinstance(exc, (ImportError, AttributeError)) else f"cannot run triton's ptxas: {exc}"
    allowed = text.split("--gpu-name", 1)[-1].split("\n--", 1)[0]
    if f"'{name}'" in allowed:
        return None
    return (f"triton {triton.__version__} cannot target {name}: its ptxas ({ptxas.path}, CUDA {ptxas.version}) "
            f"does not list {name}; a newer triton (pip install -U triton) does")


def _compile_row(row: Row, src, arch: int, options: dict) -> tuple[str, list[str]]:
    """Compile ``src`` for ``arch`` into ``row`` (compile time and resources); returns (SASS, problems)."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    row.compile_s = time.perf_counter() - t0
    res, sass, problems = _resources(kernel, arch)
    for key, val in res.items():
        setattr(row, key, val)
    return sass, problems


def _fail_status(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return f"FAIL: compile error: {type(exc).__name__}: {msg[-1] if msg else ''}"[:300]


def _signature(fn, arch: int, vals: dict, ptr_type) -> tuple:
    """(signature, constexprs, attrs) of an ASTSource for ``fn`` launched with ``vals``: pointers (capitalised
    names) typed by ``ptr_type(name)``, 16-byte aligned; ints specialised as triton's JIT does."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl

    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = vals[name]
        elif name[0].isupper():
            signature[name] = "*" + ptr_type(name)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(vals[name], float):
            signature[name] = "fp32"
        else:
            ty, spec = native_specialize_impl(backend, vals[name], False, True, True)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = vals[name]
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU launch uses by default


def compile_job(job: Job) -> Row:
    """Compile one job and read its cubin (runs in a worker process)."""
    if isinstance(job, ScanJob):
        return compile_scan_job(job)
    if isinstance(job, SelectJob):
        return compile_select_job(job)
    _worker_init()
    from ditkernels.triton_kernels import flash

    row = Row(job.arch, job.kernel + (f"[{job.part}]" if job.part else ""), job.variant, job.dtype, job.block_d, 0, 0, 0, 0)
    try:
        src, launch, vals = _source(job)
        row.block_m, row.block_n = vals["BLOCK_M"], vals.get("BLOCK_N", 0)
        row.num_warps, row.num_stages = launch.config.num_warps, launch.config.num_stages
        sass, problems = _compile_row(row, src, job.arch, launch.options)
        row.mma = mma_instruction(sass)
        want = ARCHS[job.arch].mma
        if job.kernel in ATTN_KERNELS and job.dtype in ("fp16", "bf16") and row.mma != want:
            problems.append(f"no {want} ({row.mma})")
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # a compile failure is a report row, not a crash of the report
        row.status = _fail_status(exc)
    return row


# --------------------------------------------------------------------------------------------
# Selective-scan kernels (ditkernels.triton_kernels.selective_scan)
# --------------------------------------------------------------------------------------------

SCAN_KERNELS = ("scan_fwd", "scan_bwd")


@dataclass(frozen=True)
class ScanJob:
    """One compilation of a selective-scan kernel for a state-size bucket ``block_n`` (BLOCK_N).

    Rows report block_d = BLOCK_N (state bucket), block_m = BLOCK_D (channels per program) and
    block_n = BLOCK_L (steps per chunk). variant "varBC": variable B / C with every option on (D, z,
    delta_bias + softplus, initial state, d last_state); "constBC": constant B / C, same options.
    """

    arch: int
    kernel: str  # scan_fwd | scan_bwd
    dtype: str  # fp16 | bf16 | fp32
    block_n: int
    variant: str = "varBC"


def scan_jobs_for(archs: list[int], quick: bool) -> list[ScanJob]:
    """Every shipped selective-scan config (varBC in each dtype, constBC in fp16), or a subset."""
    from ditkernels.triton_kernels.selective_scan import BLOCK_N_BUCKETS, DTYPES

    jobs: list[ScanJob] = []
    for arch in archs:
        if quick:
            jobs.append(ScanJob(arch, "scan_bwd", "fp16", 16))
            continue
        for kernel in SCAN_KERNELS:
            for bn in BLOCK_N_BUCKETS:
                jobs += [ScanJob(arch, kernel, dtype, bn) for dtype in DTYPES]
                jobs.append(ScanJob(arch, kernel, "fp16", bn, "constBC"))
    return jobs


def _scan_source(job: ScanJob):
    """(ASTSource, BLOCK_D, BLOCK_L, num_warps, maxnreg) of a typical contiguous launch: batch 2,
    dim 1536, L 4096, N = BLOCK_N, one B / C group, the launcher's channel blocks per backward
    program on an H100 (132 SMs)."""
    from triton.compiler import ASTSource

    from ditkernels.triton_kernels import selective_scan as ss

    fwd = job.kernel == "scan_fwd"
    fn = ss._selective_scan_fwd_kernel if fwd else ss._selective_scan_bwd_kernel
    var = job.variant == "varBC"
    batch, dim, L, N = 2, 1536, 4096, job.block_n
    launch = ss.scan_launch("fwd" if fwd else "bwd", batch=batch, seqlen=L, dstate=N, span=dim, units=1,
                            partial_bytes=2 * N * L * 4 if var else 0, grad_bytes=2 * batch * N * L * 4,
                            target_programs=4 * 132)
    nblk, n_sub = launch.nblk, launch.n_sub
    vals: dict[str, object] = dict(dim=dim, seqlen=L, dstate=N, nchunks=ss.nchunks(L, N), span=dim,
                                   cpg_b=dim, cpg_c=dim, nblk=nblk, n_sub=n_sub, stride_ad=N, stride_an=1,
                                   stride_hb=dim * N, stride_hd=N, stride_hn=1)
    for pre in ("u", "d", "z", "o", "g", "du", "dd", "dz"):
        vals.update({f"stride_{pre}b": dim * L, f"stride_{pre}d": L, f"stride_{pre}l": 1})
    for x in "bc":
        if var:  # (batch, N, L) operands; (batch, programs, N, L) partials
            vals.update({f"stride_{x}b": N * L, f"stride_{x}g": 0, f"stride_{x}n": L, f"stride_{x}l": 1,
                         f"stride_d{x}b": nblk * N * L, f"stride_d{x}k": N * L, f"stride_d{x}n": L,
                         f"stride_d{x}l": 1})
        else:  # (dim, N) operands; (batch, dim, N) rows
            vals.update({f"stride_{x}b": 0, f"stride_{x}g": N, f"stride_{x}n": 1, f"stride_{x}l": 0,
                         f"stride_d{x}b": dim * N, f"stride_d{x}k": N, f"stride_d{x}n": 1, f"stride_d{x}l": 0})
    vals.update(**launch.constexprs, B_VAR=var, C_VAR=var, HAS_D=True, HAS_Z=True,
                HAS_BIAS=True, SOFTPLUS=True, HAS_H0=True, HAS_DLAST=True)
    in_dtype = {"U", "Delta", "Z", "Out", "DOut", "DU", "DDelta", "DZ"} | ({"Bm", "Cm"} if var else set())
    signature, constexprs, attrs = _signature(fn, job.arch, vals,
                                              lambda name: job.dtype if name in in_dtype else "fp32")
    return (ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), launch.constexprs["BLOCK_D"],
            launch.constexprs["BLOCK_L"], launch.options["num_warps"], launch.options["maxnreg"])


def compile_scan_job(job: ScanJob) -> Row:
    """Compile one selective-scan job and read its cubin (runs in a worker process)."""
    _worker_init()
    row = Row(job.arch, job.kernel, job.variant, job.dtype, job.block_n, 0, 0, 0, 1)
    try:
        src, row.block_m, row.block_n, row.num_warps, maxnreg = _scan_source(job)
        _, problems = _compile_row(row, src, job.arch, {"num_warps": row.num_warps, "num_stages": 1, "maxnreg": maxnreg})
        row.mma = "none"
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # a compile failure is a report row, not a crash of the report
        row.status = _fail_status(exc)
    return row


# --------------------------------------------------------------------------------------------
# Block top-k selection kernels (ditkernels.triton_kernels.block_select)
# --------------------------------------------------------------------------------------------

SELECT_KERNELS = ("select_pool", "select_blocks")
SELECT_NK_PAD = (16, 64, 256, 1024, 4096)  # up to block_select.MAX_KEY_BLOCKS


@dataclass(frozen=True)
class SelectJob:
    """One compilation of a block-selection kernel: ``select_pool`` (key-block means) per head-dim bucket,
    ``select_blocks`` (query pooling, scores, radix top-k) per head-dim bucket and row length ``nk_pad``
    (NK_PAD, up to ``block_select.MAX_KEY_BLOCKS``). Rows report block_m = ROWS (rows per pooling load),
    block_n = NK_PAD and variant ``nk<NK_PAD>`` (``keys`` for the pooling kernel)."""

    arch: int
    kernel: str  # select_pool | select_blocks
    dtype: str  # fp16 | bf16 | fp32 (of q and k)
    block_d: int
    nk_pad: int = 0


def select_jobs_for(archs: list[int], quick: bool) -> list[SelectJob]:
    from ditkernels.triton_kernels.flash import BLOCK_D_BUCKETS, DTYPES

    jobs: list[SelectJob] = []
    for arch in archs:
        if quick:
            jobs.append(SelectJob(arch, "select_blocks", "bf16", 128, 256))
            continue
        for dtype in DTYPES:
            for d in BLOCK_D_BUCKETS:
                jobs.append(SelectJob(arch, "select_pool", dtype, d))
                jobs += [SelectJob(arch, "select_blocks", dtype, d, nk) for nk in SELECT_NK_PAD]
    return jobs


def compile_select_job(job: SelectJob) -> Row:
    """Compile one selection job for a typical contiguous launch (B=2, H=8, 64-token blocks, a row of
    ``nk_pad - 3`` key blocks) and read its cubin (runs in a worker process)."""
    _worker_init()
    from triton.compiler import ASTSource

    from ditkernels.triton_kernels import block_select as bsel

    pool = job.kernel == "select_pool"
    row = Row(job.arch, job.kernel, "keys" if pool else f"nk{job.nk_pad}", job.dtype, job.block_d, bsel.POOL_ROWS,
              job.nk_pad, 4, 1)
    try:
        heads, nk = 8, max(job.nk_pad - 3, 1)
        seq = 64 * nk
        vals: dict[str, object] = dict(seq_q=seq, seq_k=seq, head_dim=job.block_d, block_q=64, block_k=64, nq=nk,
                                       nk=nk, n_blocks=nk, heads=heads, topk=max(nk // 10, 1), num_prefix=0,
                                       num_suffix=0, scale=0.125, ROWS=bsel.POOL_ROWS, BLOCK_D=job.block_d)
        for x in "qk":
            vals.update({f"stride_{x}b": heads * seq * job.block_d, f"stride_{x}h": seq * job.block_d,
                         f"stride_{x}s": job.block_d, f"stride_{x}d": 1})
        if pool:
            fn, opts = bsel._pool_keys_kernel, {"num_warps": bsel.POOL_WARPS}
        else:  # the launch's options less its one constexpr
            fn, opts = bsel._select_blocks_kernel, bsel.launch_options(job.nk_pad)
            vals.update(CHUNK_D=opts.pop("CHUNK_D"), NK_PAD=job.nk_pad)
        row.num_warps = opts["num_warps"]
        signature, constexprs, attrs = _signature(
            fn, job.arch, vals, lambda name: job.dtype if name in ("Q", "K") else ("i8" if name == "Mask" else "fp32"))
        _, problems = _compile_row(row, ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                   job.arch, {"num_stages": 1, **opts})
        row.mma = "none"
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # a compile failure is a report row, not a crash of the report
        row.status = _fail_status(exc)
    return row


# --------------------------------------------------------------------------------------------
# The CUDA extension's embedded cubins
# --------------------------------------------------------------------------------------------

def cuda_extension_rows() -> tuple[list[dict], str]:
    """(rows, note): resource usage of every kernel embedded in ditkernels._cuda, per arch."""
    try:
        spec = importlib.util.find_spec("ditkernels._cuda")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return [], "ditkernels._cuda is not built (no nvcc at install time): no CUDA C++ kernels to report"
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", spec.origin], capture_output=True,
                             text=True).stdout
    except Exception as exc:
        return [], f"cuobjdump failed on {spec.origin}: {exc}"
    rows = []
    # one "arch = sm_XX" header per cubin, then "Function NAME:" and its "REG:... LOCAL:..." on the next line
    for part in re.split(r"(?=arch = sm_)", out):
        am = re.match(r"arch = (sm_\w+)", part)
        if am is None:
            continue
        arch = am.group(1)
        for fm in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", part):
            name, reg, stack, shared, local = fm.group(1), *map(int, fm.groups()[1:])
            if any(r["arch"] == arch and r["kernel"] == name for r in rows):
                continue  # the same cubin listed again (cuobjdump prints a fatbin per embedding)
            rows.append({"arch": arch, "kernel": name, "registers": reg, "stack": stack, "shared": shared,
                         "spill_bytes": local,
                         "status": "ok" if not (local or stack) else f"FAIL: spills (LOCAL:{local} STACK:{stack})"})
    if rows and shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows), capture_output=True,
                               text=True).stdout.splitlines()
        if len(names) == len(rows):
            for r, n in zip(rows, names):
                r["kernel"] = n.split("(")[0]
    note = f"{spec.origin}: {len(rows)} kernel images" if rows else f"{spec.origin}: no embedded CUDA kernels yet"
    return rows, note


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_COLS = ("arch", "kernel", "variant", "dtype", "block_d", "block_m", "block_n", "num_warps", "num_stages",
         "registers", "spill_bytes", "stack", "shared", "mma", "status")
_HEAD = ("arch", "kernel", "variant", "dtype", "D", "BM", "BN", "warps", "stages", "regs", "spill", "stack",
         "shared", "mma", "status")


def _table(rows: list[dict], cols, head) -> str:
    cells = [list(head)] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


def run(archs: list[int], quick: bool, workers: int, variants: list[str] | None = None,
        dtypes: list[str] | None = None) -> tuple[list[Row], float]:
    rows: list[Row] = []
    for arch in list(archs):
        why = target_problem(arch)
        if why is not None:  # one row that says why, instead of a compile error per kernel
            rows.append(Row(arch, "target", "-", "-", 0, 0, 0, 0, 0, status=f"FAIL: {why}"))
            archs = [a for a in archs if a != arch]
    jobs = jobs_for(archs, quick) + scan_jobs_for(archs, quick) + select_jobs_for(archs, quick)
    if variants:  # a subset while developing: attention jobs of these variants, "scan" or "select" jobs
        jobs = [j for j in jobs if (j.variant.split("_n")[0] if isinstance(j, Job) else
                                    "scan" if isinstance(j, ScanJob) else "select") in variants]
    if dtypes:
        jobs = [j for j in jobs if j.dtype in dtypes]
    t0 = time.perf_counter()
    # Fresh interpreters with TRITON_INTERPRET=0: a parent running under the interpreter (tests)
    # must not hand its interpreted kernels to the compiler.
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init) as pool:
            rows += list(pool.map(compile_job, jobs))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return rows, time.perf_counter() - t0


def summary(rows: list[dict]) -> list[str]:
    """One line per arch: compilations, failed, spilling rows and the tensor-core instructions used."""
    lines = []
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        mmas: dict[str, int] = {}
        for r in mine:
            mmas[r["mma"]] = mmas.get(r["mma"], 0) + 1
        lines.append(f"sm_{arch} ({ARCHS[arch].gpus}; {ARCHS[arch].shared_per_block} B shared per block): "
                     f"{len(mine)} compilations, {sum(r['status'] != 'ok' for r in mine)} failed, "
                     f"{sum(r['spill_bytes'] > 0 or r['stack'] > 0 for r in mine)} spill; mma "
                     + ", ".join(f"{k} {v}" for k, v in sorted(mmas.items())))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditkernels compile-report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help=f"comma-separated SM archs ({', '.join(map(str, ARCHS))}); "
                        "default 80,90")
    parser.add_argument("--quick", action="store_true", help="a representative subset of the configs")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--variant", help="comma-separated variants only (attention: dense, csr, local, epilogue, "
                        "odd_d, topk, band, rettention, local_rettention; scan; select): a subset while developing")
    parser.add_argument("--dtype", help="comma-separated dtypes only (fp16, bf16, fp32)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a.strip().removeprefix("sm_").rstrip("a")) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: expected comma-separated integers like 80,90, got {args.arch!r}")
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--arch: supported archs are {sorted(ARCHS)}, got {a}")
    if importlib.util.find_spec("triton") is None:
        print("compile-report: triton is not installed: pip install triton", file=sys.stderr)
        return 1

    variants = [v.strip() for v in args.variant.split(",")] if args.variant else None
    dtypes = [v.strip() for v in args.dtype.split(",")] if args.dtype else None
    rows, elapsed = run(archs, args.quick, max(1, args.jobs), variants, dtypes)
    dict_rows = [asdict(r) for r in rows]
    subset = "quick subset" if args.quick else "every shipped config"
    if variants or dtypes:
        subset += f" (only variants {variants or 'all'}, dtypes {dtypes or 'all'})"
    print(f"Triton kernels ({subset}), "
          f"archs {', '.join(f'sm_{a}' for a in archs)}:")
    print(_table(dict_rows, _COLS, _HEAD))
    cuda_rows, note = cuda_extension_rows()
    print(f"\nCUDA C++ kernels: {note}")
    if cuda_rows:
        cols = ("arch", "kernel", "registers", "spill_bytes", "stack", "shared", "status")
        print(_table(cuda_rows, cols, ("arch", "kernel", "regs", "spill", "stack", "shared", "status")))
    failed = [r for r in dict_rows + cuda_rows if r["status"] != "ok"]
    print()
    print("\n".join(summary(dict_rows)))
    print(f"{len(rows)} Triton compilations in {elapsed:.1f} s ({max(1, args.jobs)} processes); "
          f"{len(cuda_rows)} CUDA kernel images; {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "quick": args.quick, "seconds": elapsed, "triton": dict_rows,
                       "cuda": cuda_rows, "cuda_note": note, "failed": len(failed)}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

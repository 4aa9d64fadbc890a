"""Build script for ditkernels.

Plain pybind11 over raw pointers (no torch headers, so the build never needs torch and one binary
works with every torch version). Extensions:

- ``ditkernels._cpu_<isa>``: the CPU kernels (C++17, threads + SIMD, ``csrc/cpu`` and
  ``csrc/bindings.cpp``), compiled once per instruction set into one small module each:
  ``generic`` (``-march=x86-64``: SSE2; no ``-march`` on other CPUs), ``avx2``
  (``-march=x86-64-v3``: AVX2, FMA, F16C) and ``avx512`` (``-march=x86-64-v4``: AVX-512 F/BW/DQ/VL),
  the last two on x86-64 only. Separate shared objects, so no inline function compiled for one ISA
  can be picked by the linker for another. ``ditkernels/_ext.py`` imports the best one the running
  CPU supports (``DITKERNELS_CPU_ISA`` forces one); ``generic`` is always built and does the CPU check.
- ``ditkernels._emu``: the SIMT emulation of our CUDA device code and its self-test (``csrc/emu``),
  test-only: built with ``DITKERNELS_TEST_EXT=1`` (the README's test command), absent from a user's install.
- ``ditkernels._cuda``: the CUDA C++ kernels, built when ``nvcc`` is found (or
  ``DITKERNELS_CUDA=1``); skipped otherwise, and the install still succeeds.

Objects are compiled in parallel by ninja (one ninja file per extension). Build flags (all optional):

- ``DITKERNELS_CPU_ISAS``: ``;``-separated ISAs to build (default ``generic;avx2;avx512`` on x86-64,
  ``generic`` elsewhere; ``generic`` is always added).
- ``DITKERNELS_CPU_ARCH``: opt-in ``-march=`` value (e.g. ``native``) for one more module,
  ``_cpu_native``, which the loader prefers. It only runs on CPUs like the build machine: never use
  it for a wheel.
- ``DITKERNELS_TEST_EXT``: ``1`` builds the test-only ``ditkernels._emu``.
- ``DITKERNELS_CUDA``: ``1`` requires the CUDA build, ``0`` skips it, unset builds it when nvcc exists.
- ``DITKERNELS_CUDA_ARCHS``: ``;``-separated archs; ``+PTX`` after an arch also embeds its PTX, which
  the driver compiles for any newer GPU. Default ``80+PTX;90a`` (about 20 CPU-seconds of nvcc per
  arch: SASS for Ampere/Ada and Hopper, PTX for the rest); ``wheel`` is the release set
  ``80;86;89;90a;100;120+PTX``.
- ``CUDA_HOME``: the CUDA toolkit (default: found from ``nvcc`` on PATH, then /usr/local/cuda).
- ``MAX_JOBS``: parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


def _find_cuda_home() -> Path | None:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script on PATH; prefer the toolkit it belongs to when resolvable.
        real = Path(nvcc).resolve()
        if (real.parent.parent / "include" / "cuda_runtime.h").exists():
            return real.parent.parent
    for cand in ("/usr/local/cuda",):
        if (Path(cand) / "bin" / "nvcc").exists():
            return Path(cand)
    return None


def _want_cuda() -> tuple[bool, str]:
    flag = os.environ.get("DITKERNELS_CUDA", "").strip()
    if flag == "0":
        return False, "DITKERNELS_CUDA=0"
    home = _find_cuda_home()
    nvcc = shutil.which("nvcc") or (str(home / "bin" / "nvcc") if home else None)
    if nvcc and home and Path(nvcc).exists():
        return True, nvcc
    if flag == "1" or os.environ.get("DITKERNELS_CUDA_ARCHS"):
        raise RuntimeError("the CUDA extension was requested (DITKERNELS_CUDA=1 or DITKERNELS_CUDA_ARCHS set) "
                           "but nvcc was not found: put it on PATH or set CUDA_HOME")
    return False, "nvcc not found"


# The release set: Ampere (80, 86), Ada (89), Hopper (90a), Blackwell (100, 120), and PTX of the newest
# for later GPUs (the driver compiles it at first load).
WHEEL_CUDA_ARCHS = "80;86;89;90a;100;120+PTX"
# A source build (CI builds it on 2 cores): sm_80 SASS also runs on sm_86/89, sm_90a on H100/H200, and
# compute_80 PTX (nearly free: nvcc generates it for sm_80 anyway) on everything newer.
DEFAULT_CUDA_ARCHS = "80+PTX;90a"


def _cuda_archs() -> list[tuple[str, bool]]:
    """(arch, with PTX) for every entry of DITKERNELS_CUDA_ARCHS, e.g. ``90a`` or ``120+PTX``."""
    value = os.environ.get("DITKERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).strip()
    if value == "wheel":
        value = WHEEL_CUDA_ARCHS
    out = []
    for entry in (a.strip() for a in value.replace(",", ";").split(";")):
        if not entry:
            continue
        arch, _, ptx = entry.partition("+")
        if not arch.replace("a", "").replace("f", "").isdigit() or ptx not in ("", "PTX"):
            raise RuntimeError(f"DITKERNELS_CUDA_ARCHS: bad entry {entry!r} (expected e.g. 80, 90a or 120+PTX)")
        out.append((arch, bool(ptx)))
    return out


# CPU instruction sets: name -> -march= value. x86-64 levels (psABI): v3 = AVX2+FMA+F16C+BMI2,
# v4 = v3 + AVX-512 F/BW/CD/DQ/VL. Other CPUs build ``generic`` with the compiler's default target.
_X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU_ISAS = {"generic": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4"} if _X86 else {"generic": None}


def _cpu_isas() -> dict[str, str | None]:
    value = os.environ.get("DITKERNELS_CPU_ISAS", "").strip()
    names = [n.strip() for n in value.replace(",", ";").split(";") if n.strip()] if value else list(CPU_ISAS)
    bad = [n for n in names if n not in CPU_ISAS]
    if bad:
        raise RuntimeError(f"DITKERNELS_CPU_ISAS: {bad} not buildable on {platform.machine()}; "
                           f"choose from {list(CPU_ISAS)}")
    out = {"generic": CPU_ISAS["generic"]}  # always: the fallback, and it holds the CPU check
    out.update((n, CPU_ISAS[n]) for n in names)
    march = os.environ.get("DITKERNELS_CPU_ARCH", "").strip()
    if march:
        out["native"] = march
    return out


def _sources(*patterns: str) -> list[str]:
    out: list[str] = []
    for p in patterns:
        out += sorted(glob.glob(str(ROOT / p), recursive=True))
    return [os.path.relpath(s, ROOT) for s in out]


class NinjaBuildExt(build_ext):
    """Compile the sources of every extension to objects with ONE ninja file, so that the objects of all
    extensions (the same CPU sources once per ISA) share ninja's parallel jobs; then link each."""

    def build_extensions(self) -> None:
        # Absolute: ninja runs in build_dir (-C), and the links below run in the current directory.
        build_dir = Path(self.build_temp).resolve() / "ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        lines = ["ninja_required_version = 1.3", f"cxx = {os.environ.get('CXX', 'c++')}",
                 "rule cxx", "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out", "  depfile = $out.d",
                 "  deps = gcc"]
        nvcc = next((ext.nvcc for ext in self.extensions if getattr(ext, "cuda_home", None)), None)
        if nvcc:
            lines += [f"nvcc = {nvcc}", "rule nvcc", "  command = $nvcc -MD -MF $out.d $flags -c $in -o $out",
                      "  depfile = $out.d", "  deps = gcc"]
        objects = {}
        for ext in self.extensions:
            cxxflags, nvccflags = self._flags(ext)
            ext_dir = build_dir / ext.name.replace(".", "_")
            objects[ext.name] = []
            for src in ext.sources:
                obj = ext_dir / (src.replace("/", "_") + ".o")
                cu = src.endswith(".cu")
                flags = nvccflags if cu else cxxflags
                lines += [f"build {obj}: {'nvcc' if cu else 'cxx'} {ROOT / src}",
                          f"  flags = {' '.join(map(shlex.quote, flags))}"]
                objects[ext.name].append(str(obj))
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        cmd = [_ninja(), "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(cmd, check=True)
        for ext in self.extensions:
            self._link(ext, objects[ext.name])

    def build_extension(self, ext: Extension) -> None:  # build_extensions above does all of them
        raise NotImplementedError

    @staticmethod
    def _flags(ext: Extension) -> tuple[list[str], list[str]]:
        """(C++ flags, nvcc flags) of one extension's sources."""
        inc = [f"-I{ROOT / 'csrc'}", f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}"]
        cxxflags = inc + ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", "-Wall",
                          "-Wno-unused-function", "-fno-math-errno"]
        march = getattr(ext, "march", None)
        if march:
            cxxflags.append(f"-march={march}")
        cxxflags += ext.extra_compile_args
        nvccflags = []
        if getattr(ext, "cuda_home", None) is not None:
            archs = _cuda_archs()
            gencode = [f"-gencode=arch=compute_{a},code=[sm_{a}{f',compute_{a}' if ptx else ''}]"
                       for a, ptx in archs]
            nvccflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                         "--expt-relaxed-constexpr", "-lineinfo", f"-I{ROOT / 'csrc'}", *gencode,
                         # recorded for ``_cuda.archs()``; '_'-separated because nvcc splits -D values at commas
                         f"-DDK_CUDA_ARCHS={'_'.join(a + ('+PTX' if ptx else '') for a, ptx in archs)}"]
        return cxxflags, nvccflags

    def _link(self, ext: Extension, objects: list[str]) -> None:
        libs, libdirs = [], []
        if getattr(ext, "cuda_home", None) is not None:
            libdirs = [str(ext.cuda_home / "lib64")]
            libs = ["cudart_static", "dl", "rt"]
        ext_path = self.get_ext_fullpath(ext.name)
        Path(ext_path).parent.mkdir(parents=True, exist_ok=True)
        self.compiler.link_shared_object(
            objects, ext_path, libraries=libs, library_dirs=libdirs,
            extra_postargs=["-pthread"], target_lang="c++",
        )


def _ninja() -> str:
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise RuntimeError("ninja is required to build ditkernels: pip install ninja")
        return found


ext_modules = []
for isa, march in _cpu_isas().items():
    cpu_ext = Extension(f"ditkernels._cpu_{isa}", sources=_sources("csrc/cpu/*.cpp", "csrc/bindings.cpp"))
    cpu_ext.march = march
    # DK_MODULE names the module (PyInit_<name>); DK_ISA is what ``ditkernels info`` prints.
    cpu_ext.extra_compile_args = [f"-DDK_MODULE=_cpu_{isa}", f"-DDK_ISA={isa}"]
    ext_modules.append(cpu_ext)
if os.environ.get("DITKERNELS_TEST_EXT", "").strip() == "1":
    ext_modules.append(Extension("ditkernels._emu", sources=_sources("csrc/emu/*.cpp")))
use_cuda, why = _want_cuda()
if use_cuda:
    cuda_ext = Extension("ditkernels._cuda", sources=_sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"))
    cuda_ext.cuda_home = _find_cuda_home()
    cuda_ext.nvcc = why
    cuda_ext.extra_compile_args = [f"-I{cuda_ext.cuda_home / 'include'}"]
    ext_modules.append(cuda_ext)
else:
    print(f"ditkernels: skipping the CUDA extension ({why})", file=sys.stderr)

setup(
    packages=["ditkernels", "ditkernels.backends", "ditkernels.reference", "ditkernels.ops", "ditkernels.nn",
              "ditkernels.integrations", "ditkernels.distributed", "ditkernels.triton_kernels", "ditkernels.bench"],
    # Triton sources and benchmarks live at the top level of the repository but install inside the
    # ditkernels namespace: other distributions own the top-level name ``triton_kernels``.
    package_dir={"ditkernels": "ditkernels", "ditkernels.triton_kernels": "triton_kernels",
                 "ditkernels.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": NinjaBuildExt},
    zip_safe=False,
)

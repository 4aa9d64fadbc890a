"""Build script for ditkernels.

Two extensions, both plain pybind11 over raw pointers (no torch headers, so the build never
needs torch and one binary works with every torch version):

- ``ditkernels._C``: the CPU kernels (C++17, threads + SIMD) and the SIMT emulation of our CUDA
  device code. Always built.
- ``ditkernels._cuda``: the CUDA C++ kernels, built when ``nvcc`` is found (or
  ``DITKERNELS_CUDA=1``); skipped otherwise, and the install still succeeds.

Objects are compiled in parallel by ninja. Build flags (all optional):

- ``DITKERNELS_CUDA``: ``1`` requires the CUDA build, ``0`` skips it, unset builds it when nvcc exists.
- ``DITKERNELS_CUDA_ARCHS``: ``;``-separated archs, default ``80;90a``.
- ``DITKERNELS_CPU_ARCH``: value for ``-march=`` (default ``native``; empty for the compiler default).
- ``CUDA_HOME``: the CUDA toolkit (default: found from ``nvcc`` on PATH, then /usr/local/cuda).
- ``MAX_JOBS``: parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
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


def _cuda_archs() -> list[str]:
    return [a.strip() for a in os.environ.get("DITKERNELS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
            if a.strip()]


def _sources(*patterns: str) -> list[str]:
    out: list[str] = []
    for p in patterns:
        out += sorted(glob.glob(str(ROOT / p), recursive=True))
    return [os.path.relpath(s, ROOT) for s in out]


class NinjaBuildExt(build_ext):
    """Compile every source of an extension to objects with one ninja file, then link."""

    def build_extension(self, ext: Extension) -> None:
        # Absolute: ninja runs in build_dir (-C), and the link below runs in the current directory.
        build_dir = Path(self.build_temp).resolve() / ext.name.replace(".", "_")
        build_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "c++")
        inc = [f"-I{ROOT / 'csrc'}", f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}"]
        march = os.environ.get("DITKERNELS_CPU_ARCH", "native").strip()
        cxxflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", "-Wall",
                    "-Wno-unused-function", "-fno-math-errno"]
        if march:
            cxxflags.append(f"-march={march}")
        cxxflags += ext.extra_compile_args
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cxxflags = {' '.join(map(shlex.quote, inc + cxxflags))}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
        ]
        cuda_home = getattr(ext, "cuda_home", None)
        if cuda_home is not None:
            archs = _cuda_archs()
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            nvccflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                         "--expt-relaxed-constexpr", "-lineinfo", f"-I{ROOT / 'csrc'}", *gencode,
                         # recorded for ``_cuda.archs()``; '_'-separated because nvcc splits -D values at commas
                         f"-DDK_CUDA_ARCHS={'_'.join(archs)}"]
            lines += [
                f"nvcc = {ext.nvcc}",
                f"nvccflags = {' '.join(map(shlex.quote, nvccflags))}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
            ]
        objects = []
        for src in ext.sources:
            obj = build_dir / (src.replace("/", "_") + ".o")
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            lines.append(f"build {obj}: {rule} {ROOT / src}")
            objects.append(str(obj))
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        cmd = [_ninja(), "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(cmd, check=True)

        libs, libdirs, link_args = [], [], ["-pthread"]
        if cuda_home is not None:
            libdirs = [str(cuda_home / "lib64")]
            libs = ["cudart_static", "dl", "rt"]
        ext_path = self.get_ext_fullpath(ext.name)
        Path(ext_path).parent.mkdir(parents=True, exist_ok=True)
        self.compiler.link_shared_object(
            objects, ext_path, libraries=libs, library_dirs=libdirs,
            extra_postargs=link_args, target_lang="c++",
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


ext_modules = [Extension("ditkernels._C", sources=_sources("csrc/cpu/*.cpp", "csrc/emu/*.cpp", "csrc/bindings.cpp"))]
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

"""Command line: ``python -m ditkernels {info, compile-report, bench, selftest}``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def _cpu_isa_line() -> str:
    """The instruction set of the CPU kernels in use, the ones built and the ones this CPU runs."""
    from ditkernels import _ext

    built = _ext.built_isas()
    try:
        runs = ", ".join(_ext.cpu_isas())
    except Exception as exc:  # _cpu_generic missing or broken: the same reason shows in the line below
        runs = f"unknown ({type(exc).__name__})"
    why = _ext.cpu_error()
    used = f"error: {why}" if why else f"{_ext.isa()} (ditkernels._cpu_{_ext.isa()})"
    forced = os.environ.get(_ext.ENV, "")
    return (f"CPU kernels ISA: {used}\n  built: {', '.join(built) or 'none'}; this CPU runs: {runs}; "
            f"{_ext.ENV}={forced}")


def info(argv: list[str] | None = None) -> int:
    """Print versions, every backend's availability (with the reason and fix), the CPU kernels' instruction
    set and the compiled CUDA archs."""
    argparse.ArgumentParser(prog="python -m ditkernels info", description=info.__doc__).parse_args(argv)
    import torch

    import ditkernels
    from ditkernels import backends
    from ditkernels.backends import cuda

    print(f"ditkernels {ditkernels.__version__} ({os.path.dirname(ditkernels.__file__)})")
    print(f"python {platform.python_version()}  torch {torch.__version__}  triton {_version('triton')}  "
          f"numpy {_version('numpy')}")
    print(f"torch CUDA: {torch.version.cuda or 'none (CPU build)'}; devices: {torch.cuda.device_count()}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}  "
          f"{backends.ENV}={os.environ.get(backends.ENV, '')!s}  torch threads: {torch.get_num_threads()}")
    print("backends:")
    for name, ok, why in backends.report():
        print(f"  {name:<10} {'available' if ok else 'unavailable'}" + (f": {why}" if why else ""))
    print(_cpu_isa_line())
    archs = cuda.compiled_archs()
    print(f"compiled CUDA archs: {', '.join(archs) if archs else 'none (ditkernels._cuda not built)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"info": "backends, versions and compiled archs",
                "compile-report": "compile every shipped kernel for GPU archs without a GPU",
                "bench": "benchmark the kernels against their peers",
                "selftest": "check every op on this machine's fast backends against the reference (+ bench on GPU)"}
    if not argv or argv[0] not in commands:
        print("usage: python -m ditkernels {info,compile-report,bench,selftest} [options]\n" +
              "\n".join(f"  {k:<15} {v}" for k, v in commands.items()), file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info(rest)
    if cmd == "compile-report":
        from ditkernels.compile_report import main as report_main

        return report_main(rest)
    if cmd == "selftest":
        from ditkernels.selftest import main as selftest_main

        return selftest_main(rest)
    from ditkernels.bench.runner import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())

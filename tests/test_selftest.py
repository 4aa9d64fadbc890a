"""``python -m ditkernels selftest``: the CPU path in full, the GPU path's Triton kernels under the interpreter
(a subset: the interpreter is slow), and that a wrong kernel is reported as a failure."""

from __future__ import annotations

import torch

import ditkernels
from ditkernels import selftest
from ditkernels.__main__ import main as cli_main


def test_cpu_selftest_passes_and_writes_one_report(tmp_path, capsys):
    rc, path = selftest.run(device="cpu", bench=False, out=tmp_path, quiet=True)
    text = path.read_text()
    assert rc == 0, text
    assert list(tmp_path.iterdir()) == [path]
    results = {(line.split(" | ")[0][2:], line.split(" | ")[3]) for line in text.splitlines() if line.startswith("| ")
               and " | pass | " in line}
    for op in ("attention", "local_attention", "block_sparse_attention", "block_topk_attention", "topk_attention",
               "rettention", "selective_scan"):
        for dt in ("fp32", "fp16", "bf16"):
            assert (op, dt) in results, (op, dt)
    assert "| cpu |" in text and "0 failed" in text and "## bench" not in text


def test_gpu_path_triton_under_the_interpreter(monkeypatch):
    """The backend a GPU machine checks, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it):
    a cheap subset (the interpreter is slow): the flash core forward and backward in bf16, Re-ttention's
    fused epilogue, the Triton scan forward and backward."""
    every = selftest.cases()
    keep = {("attention", "bf16"), ("rettention", "fp32"), ("rettention", "bf16"), ("selective_scan", "fp32"),
            ("selective_scan", "bf16")}
    subset = [c for c in every if c.op != "rettention" or "band" in c.name]
    monkeypatch.setattr(selftest, "cases", lambda: subset)
    results = selftest.run_checks(torch.device("cpu"), backends=["triton"], dtypes=["fp32", "bf16"],
                                  ops=["attention", "rettention", "selective_scan"],
                                  only=lambda case, dtype: (case.op, dtype) in keep)
    assert {(r.op, r.dtype) for r in results} == keep
    assert all(r.status == "pass" and r.backend == "triton" for r in results), \
        [(r.case, r.dtype, r.reason, r.errs) for r in results]


def test_a_wrong_kernel_fails_the_selftest(tmp_path, monkeypatch):
    def wrong(backend, q, k, v):
        out = ditkernels.attention(q, k, v, backend=backend)
        return out if backend == "reference" else out * 1.001

    bad = selftest.Case("attention", "wrong-by-0.1%", lambda s: selftest._qkv(1, 2, 33, 33, 16, s), wrong)
    monkeypatch.setattr(selftest, "cases", lambda: [bad])
    rc, path = selftest.run(device="cpu", dtypes=["fp32"], bench=False, out=tmp_path, quiet=True)
    text = path.read_text()
    assert rc == 1
    row = next(line for line in text.splitlines() if line.startswith("| attention | wrong-by-0.1% |"))
    assert "| cpu | fp32 | fail |" in row and "e-03 / 1.00e-05 |" in row
    assert "### fail: attention wrong-by-0.1% cpu fp32" in text


def test_cli(tmp_path, capsys):
    assert cli_main(["selftest", "--ops", "attention", "--dtypes", "fp32", "--no-bench", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pass  attention" in out and "1/1 checks passed" in out
    for bad in (["--dtypes", "fp8"], ["--ops", "nope"], ["--backends", "tpu"]):
        try:
            cli_main(["selftest", *bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
        assert bad[1] in capsys.readouterr().err


def test_bench_section_of_the_report(tmp_path, monkeypatch):
    """On a GPU the selftest runs ``bench --quick`` on that device into the same folder (stubbed here: the
    real sweep takes minutes on CPU) and puts its table in the report."""
    from ditkernels.bench import runner

    calls = []

    def fake_main(argv):
        calls.append(argv)
        print("case  mode  impl  time ms\nattention.dense/B1-H8-S4096-D64-fp32  fwd  sdpa  1.0")
        return 0

    monkeypatch.setattr(runner, "main", fake_main)
    rc, path = selftest.run(device="cpu", ops=["attention"], dtypes=["fp32"], bench=True, out=tmp_path, quiet=True)
    assert rc == 0
    assert calls and calls[0][:4] == ["--quick", "--device", "cpu", "--out"] and calls[0][4] == str(tmp_path)
    text = path.read_text()
    assert "## bench --quick (exit status 0)" in text and "attention.dense/B1-H8-S4096-D64-fp32" in text

"""A multi-rank test harness for ``ditkernels.distributed``: P gloo ranks spawned once, every case run inside.

Spawning 4 ranks costs ~25 s on 2 cores, so a test module spawns each world size once
(:func:`rank_fixture`) and runs all its cases in every rank; each case is then one pytest test that fails
naming the case and the ranks that failed, with their tracebacks.

- Cases are module-level functions without arguments (pickled by reference, so the ranks import the test
  module); inside, ``torch.distributed`` is initialised (``dist.get_rank()``, ``dist.get_world_size()``).
- The process group has a short timeout (``timeout``): a rank left waiting in a collective fails its case
  after that many seconds instead of stalling CI.
- After each case the ranks compare notes through the rendezvous store (not a collective, so it works
  whatever state a failed case left the group in); if any rank failed, every rank starts a fresh process
  group so the next case does not inherit a half-finished collective.
- A run longer than ``total_timeout`` is killed; the ranks that did not report fail every case.
- ``world == 1`` runs in the calling process (its process group is destroyed afterwards).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

import pytest

CaseFn = Callable[[], None]


def _worker(rank: int, world: int, store_path: str, cases: Sequence[CaseFn], timeout: float, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # P ranks share the machine's cores
    results: dict[str, str | None] = {}
    try:
        store = dist.FileStore(store_path, world)
        wait = datetime.timedelta(seconds=timeout)

        def init(gen: int) -> None:
            dist.init_process_group("gloo", store=dist.PrefixStore(f"pg{gen}", store), rank=rank,
                                    world_size=world, timeout=wait)

        gen = 0
        init(gen)
        for i, fn in enumerate(cases):
            name = fn.__name__
            t0 = time.perf_counter()
            try:
                fn()
                results[name] = None
            except BaseException:  # noqa: BLE001 - every failure is reported with its traceback
                results[name] = traceback.format_exc()
            results[name + "/seconds"] = f"{time.perf_counter() - t0:.2f}"
            store.set(f"case{i}/{rank}", "fail" if results[name] else "ok")
            store.wait([f"case{i}/{r}" for r in range(world)], wait)
            if any(store.get(f"case{i}/{r}") == b"fail" for r in range(world)):
                dist.destroy_process_group()
                gen += 1
                init(gen)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - a broken harness fails every case still unreported
        tb = traceback.format_exc()
        for fn in cases:
            results.setdefault(fn.__name__, "harness: " + tb)
    out.put((rank, results))


class RankResults:
    """Per-case, per-rank outcome of one :func:`run_ranks`."""

    def __init__(self, world: int, results: dict[int, dict[str, str | None]], missing: str) -> None:
        self.world, self.results, self.missing = world, results, missing

    def seconds(self, case: str) -> float:
        return max(float(r.get(case + "/seconds", 0.0)) for r in self.results.values()) if self.results else 0.0

    def check(self, case: str) -> None:
        """Fail (pytest) naming ``case`` and every rank where it failed, with their tracebacks."""
        failures = []
        for rank in range(self.world):
            res = self.results.get(rank)
            if res is None:
                failures.append(f"--- rank {rank}: no result ({self.missing})")
            elif case not in res:
                failures.append(f"--- rank {rank}: the case did not run")
            elif res[case] is not None:
                failures.append(f"--- rank {rank}:\n{res[case]}")
        if failures:
            pytest.fail(f"case {case} failed on {len(failures)} of {self.world} ranks\n" + "\n".join(failures),
                        pytrace=False)


def run_ranks(world: int, cases: Sequence[CaseFn], *, timeout: float = 60.0,
              total_timeout: float = 900.0) -> RankResults:
    """Spawn ``world`` gloo ranks, run every case in each, return their outcomes (never raises for a case).
    One rank runs inside this process (no spawn: saves the start-up of a fresh interpreter)."""
    if world == 1:
        import torch

        threads, out = torch.get_num_threads(), queue_mod.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _worker(0, 1, os.path.join(tmp, "store"), list(cases), timeout, out)
            finally:
                torch.set_num_threads(threads)
        rank, res = out.get()
        return RankResults(1, {rank: res}, "")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store_path, list(cases), timeout, out), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, dict] = {}
        deadline = time.monotonic() + total_timeout
        missing = ""
        while len(results) < world:
            try:
                rank, res = out.get(timeout=1.0)
                results[rank] = res
                continue
            except queue_mod.Empty:
                pass
            if all(procs[r].exitcode is not None for r in range(world) if r not in results):
                try:  # a result put just before the exit may still be in the pipe
                    while len(results) < world:
                        rank, res = out.get(timeout=2.0)
                        results[rank] = res
                except queue_mod.Empty:
                    pass
                break  # every rank still missing has exited without a result
            if time.monotonic() > deadline:
                missing = f"killed after {total_timeout:.0f} s"
                break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        if not missing:
            missing = "the rank exited without a result: " + ", ".join(
                f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if r not in results)
    return RankResults(world, results, missing)


def raises_everywhere(fn: Callable[[], object], exc: type[BaseException], match: str) -> None:
    """Inside a case: ``fn`` raises ``exc`` matching ``match`` on this rank, quickly, and the group is still
    usable after it (no rank entered a collective the others skipped)."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    assert time.perf_counter() - t0 < 20, "the error took as long as a collective timeout"
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()


def rank_fixture(cases: Sequence[CaseFn], worlds: Sequence[int] = (1, 2, 3, 4), **kwargs):
    """A module-scoped pytest fixture, parametrized by world size, holding the :class:`RankResults` of running
    ``cases`` on that many ranks (one spawn per world size per module).

    Under pytest-xdist (``-n 2``) the cases of one world size land on several workers, and each would spawn
    its own ranks: the first worker runs them and leaves the results in the session's shared temporary
    folder under a file lock, the others read them (pytest-xdist's recipe for once-per-session work)."""

    @pytest.fixture(scope="module", params=list(worlds), ids=[f"P{w}" for w in worlds])
    def ranks(request, tmp_path_factory) -> RankResults:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            return run_ranks(request.param, cases, **kwargs)
        import pickle

        from filelock import FileLock  # a dependency of torch

        path = tmp_path_factory.getbasetemp().parent / f"ranks-{request.module.__name__}-P{request.param}.pkl"
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return pickle.loads(path.read_bytes())
            res = run_ranks(request.param, cases, **kwargs)
            path.write_bytes(pickle.dumps(res))
            return res

    return ranks

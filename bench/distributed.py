"""Sequence-parallel benchmark: ``ditkernels bench --filter distributed [--ranks 2,4]``.

Starts P CPU ranks on gloo (``torch.multiprocessing`` spawn, one process per rank, ``--threads`` threads
each, default 1) and reports, per call of Ulysses (dense), ring and halo-exchange local attention (circle,
radius 8): the time (median over ``--reps`` of the wall time from a barrier before the call to a barrier
after it, i.e. the slowest rank) and the bytes each rank sends, counted from the tensors the code hands to
the collectives (``ditkernels/distributed/_comm.py``), next to the byte formulas
(:func:`ditkernels.distributed.ulysses.ulysses_bytes`, :func:`~ditkernels.distributed.ring.ring_bytes`,
:func:`~ditkernels.distributed.local.halo_bytes`). Then a table of the bytes per rank per attention layer
at real sizes from those formulas: FLUX at 4096 px (256x256 tokens, 24 heads, head_dim 128, 512 text
tokens, bf16, batch 1) for P = 2, 4, 8.

CPU ranks on one machine say nothing about GPU speed; the byte columns are what carries over.
The family does not go through the in-process runner (its calls need P processes): the table is printed
and written as ``<out>/<tag>.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

QUICK = dict(grid=(32, 32), heads=8, head_dim=64, text=16, window=8)
FULL = dict(grid=(64, 64), heads=8, head_dim=64, text=64, window=8)
REAL = dict(grid=(256, 256), heads=24, head_dim=128, text=512, window=8, itemsize=2)
IMPLS = ("ulysses", "ring", "halo")


def _formula(impl: str, p: int, rank: int, grid, heads, head_dim, text, window, itemsize, batch=1) -> int | None:
    from ditkernels.distributed._layout import Layout
    from ditkernels.distributed.ring import ring_bytes
    from ditkernels.distributed.ulysses import ulysses_bytes

    tokens = list(Layout.make(grid, None, p).tokens)
    if impl == "ulysses":
        return ulysses_bytes(tokens, rank, batch=batch, heads=heads, head_dim=head_dim, num_global=text,
                             element_size=itemsize)
    if impl == "ring":
        return ring_bytes(tokens, rank, batch=batch, heads=heads, head_dim=head_dim, element_size=itemsize)
    try:
        from ditkernels.distributed.local import halo_bytes
    except ImportError:
        return None
    return halo_bytes(tuple(grid), window, world_size=p, heads=heads, head_dim=head_dim, batch=batch,
                      itemsize=itemsize, num_prefix=text)[rank]


def _rank_main(rank: int, p: int, store_path: str, cfg: dict, out) -> None:
    try:
        import torch.distributed as dist

        import ditkernels.distributed as dd
        from ditkernels.distributed import _comm

        torch.set_num_threads(cfg["threads"])
        dist.init_process_group("gloo", store=dist.FileStore(store_path, p), rank=rank, world_size=p,
                                timeout=datetime.timedelta(seconds=300))
        grid, h, d, text = tuple(cfg["grid"]), cfg["heads"], cfg["head_dim"], cfg["text"]
        dtype = getattr(torch, cfg["dtype"])
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(1, h, text + math.prod(grid), d, generator=g).to(dtype) for _ in range(3)]
        loc = [dd.shard(t, grid, num_prefix=text) for t in full]
        calls = {
            "ulysses": lambda q, k, v: dd.ulysses_attention(q, k, v, grid=grid, num_prefix=text),
            "ring": lambda q, k, v: dd.ring_attention(q, k, v, grid=grid, num_prefix=text),
            "halo": lambda q, k, v: dd.local_attention(q, k, v, grid, cfg["window"], num_prefix=text),
        }
        rows = []
        for impl in cfg["impls"]:
            for mode in cfg["modes"]:
                row = dict(impl=impl, ranks=p, mode=mode)
                try:
                    ins = [t.clone().requires_grad_(mode == "fwdbwd") for t in loc]

                    def once():
                        o = calls[impl](*ins)
                        if mode == "fwdbwd":
                            o.backward(torch.ones_like(o))
                        return o

                    with _comm.count() as c:
                        once()
                    for _ in range(cfg["warmup"]):
                        once()
                    times = []
                    for _ in range(cfg["reps"]):
                        dist.barrier()
                        t0 = time.perf_counter()
                        once()
                        dist.barrier()
                        times.append(time.perf_counter() - t0)
                    row.update(ms=1e3 * statistics.median(times), sent=c.sent, status="ok")
                except Exception as e:  # noqa: BLE001 - a failed impl is a row, not a crash
                    row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
                everyone = [None] * p
                dist.all_gather_object(everyone, row)
                rows.append(everyone)
        dist.destroy_process_group()
        out.put((rank, rows, None))
    except BaseException:  # noqa: BLE001
        out.put((rank, None, traceback.format_exc()))


def _spawn(p: int, cfg: dict) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, p, os.path.join(tmp, "store"), cfg, out), daemon=True)
                 for r in range(p)]
        for pr in procs:
            pr.start()
        results = {}
        for _ in range(p):
            rank, rows, err = out.get(timeout=1800)
            if err:
                raise RuntimeError(f"rank {rank} of {p} failed:\n{err}")
            results[rank] = rows
        for pr in procs:
            pr.join(timeout=30)
    return results[0]


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:9.2f}"


def run(args) -> int:
    """The ``--filter distributed`` family of ``ditkernels bench`` (module docstring)."""
    sizes = QUICK if args.quick else FULL
    ranks = [int(x) for x in (args.ranks or ("2" if args.quick else "2,4")).split(",") if x]
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype or "fp32", "float32")
    wanted = [f.split("/", 1)[1] for f in args.filter if "/" in f and f.startswith("distributed")]
    impls = [i for i in IMPLS if not wanted or any(w in i for w in wanted)]
    modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]
    cfg = dict(sizes, dtype=dtype, threads=args.threads or 1, impls=impls, modes=modes,
               reps=args.reps or (3 if args.quick else 7), warmup=args.warmup)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    print(f"ditkernels bench distributed: gloo CPU ranks {ranks}, grid {sizes['grid']}, {sizes['heads']} heads, "
          f"head_dim {sizes['head_dim']}, {sizes['text']} text tokens, {dtype}, {cfg['threads']} thread(s) per rank, "
          f"median of {cfg['reps']}")
    print(f"{'impl':8} {'P':>2} {'mode':7} {'time ms':>10} {'MiB sent/rank (max)':>19} {'formula MiB':>11}  note")
    record = []
    for p in ranks:
        for everyone in _spawn(p, cfg):
            r0 = everyone[0]
            if r0["status"] != "ok":
                print(f"{r0['impl']:8} {p:>2} {r0['mode']:7} {'failed':>10}  {r0.get('reason', '')}")
                record.append(r0)
                continue
            sent = [r["sent"] for r in everyone]
            formula = None
            if r0["mode"] == "fwd":
                f = [_formula(r0["impl"], p, r, sizes["grid"], sizes["heads"], sizes["head_dim"], sizes["text"],
                              sizes["window"], itemsize) for r in range(p)]
                formula = None if None in f else max(f)
                note = "" if formula is None else ("counted == formula" if f == sent else f"MISMATCH {f} != {sent}")
            else:
                note = "forward + backward"
            ms = max(r["ms"] for r in everyone)
            print(f"{r0['impl']:8} {p:>2} {r0['mode']:7} {ms:10.2f} {_mb(max(sent)):>19} {_mb(formula):>11}  {note}")
            record.append(dict(r0, ms=ms, sent_per_rank=sent, formula_max=formula))
    print(f"\nbytes each rank sends per attention layer, forward (formulas), FLUX 4096 px: grid {REAL['grid']}, "
          f"{REAL['heads']} heads x {REAL['head_dim']}, {REAL['text']} text tokens, bf16, batch 1; halo: circle r=8")
    print(f"{'P':>2} " + " ".join(f"{i + ' MiB':>12}" for i in IMPLS))
    real = []
    for p in (2, 4, 8):
        vals = {i: _formula(i, p, p // 2, REAL["grid"], REAL["heads"], REAL["head_dim"], REAL["text"], REAL["window"],
                            REAL["itemsize"]) for i in IMPLS}
        real.append(dict(ranks=p, **{f"{i}_bytes": v for i, v in vals.items()}))
        print(f"{p:>2} " + " ".join(f"{_mb(vals[i]):>12}" for i in IMPLS))
    print("(an interior rank, p // 2; Ulysses: q, k, v in and the output back; ring: the keys and values; halo: the halo rows of keys and values plus the text queries' partial results)")
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or "bench-distributed-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, tag + ".json")
    with open(path, "w") as fh:
        json.dump(dict(config=cfg, ranks=ranks, torch=torch.__version__, rows=record, real_sizes=real,
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat()), fh, indent=1)
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.get("status") == "failed" for r in record) and args.strict else 0

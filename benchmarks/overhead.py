"""Host overhead of one attention call: aten ops and host microseconds per forward+backward, per rank.

    python benchmarks/overhead.py [--cp 1,4] [--docs 10,100,1000] [--sample-len 32768] [--device cpu|cuda]
                                  [--backend null|cpu|cuda|...] [--ulysses 1,2,4] [--json FILE]

A kernel that does nothing (``--backend null``, the default; registered in ``ringattn.kernels.BACKENDS``
for the run) isolates what the library itself issues around the kernels: for 10 / 100 / 1,000 documents
per sample at each CP size it counts the aten ops one forward+backward dispatches on each rank (a
``TorchDispatchMode``; views and allocations included, P2P ops included), and times it (best of
``--repeat``). Counts are taken on a warm call (the plan and its index tensors exist already, as for
every layer after the first of a training step); the first call on a new layout — planning, agreement,
index building — is timed separately. Target: at most ``100 + 150 * plan steps`` ops per rank whatever
the document count, and none of the ops that read a device value back to the host.

``--ulysses 1,2,4`` also measures each CP size as Ulysses x ring (``U x CP/U``, groups from
``ringattn.new_cp_groups``; ``U = CP`` is pure Ulysses): the all-to-alls add a fixed number of ops per
call, the ring part runs on ``CP/U`` ranks (its steps are what the target counts). With the null
kernel the query and KV heads are ``max(1, U)`` so that they split.

With ``--device cuda --backend cuda`` the real kernels run and the table adds the kernel time beside the
host time (CUDA events); ``torch.cuda.set_sync_debug_mode("error")`` then proves the warm call never
synchronises the device. CP > 1 runs that many gloo processes (on one GPU: host staging).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import types
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import ringattn
from ringattn.comm.p2p import host_staging
from ringattn.kernels import BACKENDS

#: aten ops that read a device value back to the host (on a device they synchronise it)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero")


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (``counts`` by op name)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def syncing(self) -> dict:
        return {k: v for k, v in self.counts.items() if k in SYNC_OPS}


def _null_forward(q, k, v, call, scale):
    return torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)


def _null_backward(dout, q, k, v, out, lse, call, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def register_null_kernel() -> str:
    """Register a kernel that returns uninitialised tensors of the right shapes as backend ``"null"``."""
    mod = types.ModuleType("ringattn_null_kernel")
    mod.forward, mod.backward = _null_forward, _null_backward
    sys.modules[mod.__name__] = mod
    BACKENDS["null"] = mod.__name__
    return "null"


def sample_cu(num_docs: int, sample_len: int, seed: int = 0) -> list[int]:
    """``num_docs`` documents of random lengths filling one sample exactly (deterministic)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, sample_len), num_docs - 1)) if num_docs > 1 else []
    return [0] + cuts + [sample_len]


def measure_rank(
    rank: int,
    cp: int,
    cu,
    sample_len: int,
    backend: str,
    device: str,
    heads: int,
    dim: int,
    repeat: int,
    group=None,
    ulysses: int = 1,
) -> dict:
    """Op counts and host times of one rank (``group`` None for CP 1; a ``CPGroups`` when ``ulysses > 1``)."""
    if backend == "null":
        register_null_kernel()
    dev = torch.device(device)
    layout = ringattn.DocLayout.from_cu_seqlens(cu, cp, sample_len=sample_len, ulysses_size=ulysses)
    n = layout.local_tokens(rank)
    dtype = torch.bfloat16 if dev.type == "cuda" or backend != "null" else torch.float32
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(n, heads, dim, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(n, heads, dim, generator=g).to(dev, dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def step(lay=layout):
        ringattn.ring_eod_attention(q, k, v, lay, group=group, backend=backend).backward(dout)

    # warm up the process group and allocator on another layout of the same shape, then time the first call
    # on this one (planning, agreement, index tensors: once per new batch in training)
    other = ringattn.DocLayout.from_cu_seqlens(
        sample_cu(len(cu) - 1, sample_len, seed=1), cp, sample_len=sample_len, ulysses_size=ulysses
    )
    for _ in range(3):
        step(other)
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    counter = OpCounter()
    # on a GPU any synchronising op in the warm call raises (not where gloo stages messages through the host)
    strict = dev.type == "cuda" and (group is None or not host_staging(group, dev))
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with counter:
            step()
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode("default")
    best, best_kernel = float("inf"), None
    for _ in range(repeat):
        sync()
        if group is not None:
            dist.barrier(getattr(group, "cp", group))
        t0 = time.perf_counter()
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            host = time.perf_counter() - t0
            end.record()
            sync()
            kernel = start.elapsed_time(end) / 1e3
        else:
            step()
            host, kernel = time.perf_counter() - t0, None
        if host < best:
            best, best_kernel = host, kernel
    steps = len(ringattn.rank_plan(layout, rank).steps)  # a hybrid layout's rank plan is its ring rank's
    return {
        "rank": rank,
        "ops": counter.total,
        "steps": steps,
        "syncing": counter.syncing(),
        "host_s": best,
        "device_s": best_kernel,
        "first_call_s": first,
        "sync_checked": strict,
        "top_ops": counter.counts.most_common(8),
    }


def _worker(rank, cp, port, out_dir, args):
    torch.set_num_threads(1)
    device = args["device"]
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp, timeout=timedelta(seconds=300)
    )
    try:
        u = args["ulysses"]
        group = ringattn.new_cp_groups(u) if u > 1 else dist.group.WORLD
        res = measure_rank(
            rank,
            cp,
            args["cu"],
            args["sample_len"],
            args["backend"],
            device,
            args["heads"],
            args["dim"],
            args["repeat"],
            group=group,
            ulysses=u,
        )
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def measure(
    cp: int,
    num_docs: int,
    sample_len: int,
    backend: str = "null",
    device: str = "cpu",
    heads: int = 1,
    dim: int = 8,
    repeat: int = 5,
    ulysses: int = 1,
) -> list[dict]:
    """Per-rank results of one configuration (spawns ``cp`` gloo processes for CP > 1)."""
    cu = sample_cu(num_docs, sample_len)
    if cp == 1:
        return [measure_rank(0, 1, cu, sample_len, backend, device, heads, dim, repeat)]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "cu": cu,
        "sample_len": sample_len,
        "backend": backend,
        "device": device,
        "heads": heads,
        "dim": dim,
        "repeat": repeat,
        "ulysses": ulysses,
    }
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(cp, port, out_dir, args), nprocs=cp, start_method="spawn")
        results = []
        for r in range(cp):
            with open(os.path.join(out_dir, f"{r}.json")) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", default="1,4")
    p.add_argument("--docs", default="10,100,1000")
    p.add_argument("--sample-len", type=int, default=32768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="null")
    p.add_argument("--heads", type=int, default=None, help="default 1 (null kernel) or 32 (real kernel)")
    p.add_argument("--head-dim", type=int, default=None, help="default 8 (null kernel) or 128 (real kernel)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--ulysses", default="1", help="Ulysses sizes to measure for each CP size (those dividing it)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    null = args.backend == "null"
    heads = args.heads or (1 if null else 32)
    dim = args.head_dim or (8 if null else 128)
    print(
        f"backend {args.backend} on {args.device}, sample_len {args.sample_len}, heads {heads}"
        f"{' (U under Ulysses x ring)' if null and args.ulysses != '1' else ''}, head_dim {dim}; "
        f"aten ops and host time per forward+backward (warm call), max over ranks"
    )
    header = (
        f"{'CP':>7} {'docs':>5} {'steps':>5} {'ops/rank':>8} {'target':>7} {'sync ops':>8} {'host ms':>8} "
        f"{'1st call ms':>11}"
    )
    if not null:
        header += f" {'device ms':>9}"
    print(header)
    rows = []
    splits = [
        (cp, u)
        for cp in (int(x) for x in args.cp.split(","))
        for u in (int(x) for x in args.ulysses.split(","))
        if cp % u == 0 and (u == 1 or cp > 1)
    ]
    for cp, u in splits:
        h = max(heads, u) if null else heads
        for docs in (int(x) for x in args.docs.split(",")):
            res = measure(cp, docs, args.sample_len, args.backend, args.device, h, dim, args.repeat, ulysses=u)
            worst = max(res, key=lambda r: r["ops"])
            steps = max(r["steps"] for r in res)
            syncing = sum(sum(r["syncing"].values()) for r in res)
            label = f"{cp}" if u == 1 else f"{cp} ({u}x{cp // u})"
            line = (
                f"{label:>7} {docs:>5} {steps:>5} {worst['ops']:>8} {100 + 150 * steps:>7} {syncing:>8} "
                f"{max(r['host_s'] for r in res) * 1e3:>8.2f} {max(r['first_call_s'] for r in res) * 1e3:>11.1f}"
            )
            if not null:
                line += f" {max(r['device_s'] for r in res) * 1e3:>9.2f}"
            print(line, flush=True)
            rows.append({"cp": cp, "ulysses": u, "docs": docs, "ranks": res})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Shared pieces of the torchrun benchmarks (comm.py, hybrid.py, cost_check.py): the workload and model
arguments, this rank's random q/k/v, and interleaved timed rounds of forward+backward."""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ringattn.workloads import load_workload, rescale_cu_seqlens, workload_names


def add_run_args(p: argparse.ArgumentParser, *, sample_len: int, rounds: int) -> None:
    """``--workloads --sample-len --heads --kv-heads --head-dim --rounds`` with these defaults."""
    p.add_argument("--workloads", default=",".join(workload_names()))
    p.add_argument("--sample-len", type=int, default=sample_len)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=rounds)


def rescaled(name: str, sample_len: int) -> tuple[dict, list[int]]:
    """``(workload, cu_seqlens rescaled to sample_len tokens per sample)``."""
    wl = load_workload(name)
    return wl, rescale_cu_seqlens(wl["cu_seqlens"], wl["sample_len"], sample_len)


def local_qkv(n: int, heads: int, kv_heads: int, head_dim: int, g: torch.Generator, dtype=torch.float32):
    """Random leaf ``[q, k, v]`` for ``n`` local tokens, drawn in that order from ``g``."""
    return [torch.randn(n, h, head_dim, generator=g).to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def timed_rounds(runs: dict, rounds: int, warm: bool = True) -> dict:
    """``{key: [seconds]}``: every ``runs[key]()`` once per round, interleaved, each timed as the slowest rank's
    (barrier before, all-reduce MAX after); round 0 warms up connections and caches and is not kept (``warm=False``:
    the caller warmed up, no such round)."""
    times = {key: [] for key in runs}
    for rnd in range(0 if warm else 1, rounds + 1):
        for key, fn in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rnd:
                times[key].append(dt.item())
    return times

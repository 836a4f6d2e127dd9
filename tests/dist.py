"""Spawning small gloo groups for multi-rank tests.

``run_ranks(cp, fn, payload)`` starts ``cp`` processes, each calls ``fn(rank, cp, payload)``
inside an initialised gloo world group, and returns the per-rank results (picklable).
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, cp, port, fn, payload, out_dir, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp, timeout=timedelta(seconds=timeout_s)
    )
    try:
        try:
            result = ("ok", fn(rank, cp, payload))
        except Exception as exc:  # report to the parent instead of dying silently
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ranks(cp: int, fn, payload=None, timeout_s: float = 60.0):
    """Per-rank ``("ok", result)`` or ``("error", message)`` of ``fn`` run on ``cp`` gloo ranks."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry, args=(cp, _free_port(), fn, payload, out_dir, timeout_s), nprocs=cp, join=True,
            start_method="spawn",
        )
        results = []
        for r in range(cp):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def unwrap(results):
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status != "ok"]
    if errors:
        raise AssertionError("; ".join(errors))
    return [res for _, res in results]

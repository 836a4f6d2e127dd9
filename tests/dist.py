"""Spawning small gloo groups for multi-rank tests.

``run_ranks(cp, fn, payload)`` starts ``cp`` processes, each calls ``fn(rank, cp, payload)``
inside an initialised gloo world group, and returns the per-rank results (picklable).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
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


def run_ranks(
    cp: int,
    fn,
    payload=None,
    timeout_s: float = 60.0,
    tolerate_exit: bool = False,
    kill_after_s: float | None = None,
    hung_ranks: tuple[int, ...] = (),
):
    """Per-rank ``("ok", result)`` or ``("error", message)`` of ``fn`` run on ``cp`` gloo ranks.

    ``timeout_s`` is the process group's timeout. With ``tolerate_exit`` a rank that died
    reports ``("dead", exit code)`` instead of failing the call, and ranks still running
    ``kill_after_s`` seconds after the start are killed; ``hung_ranks`` (made to hang on
    purpose) are killed as soon as every other rank has exited.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(cp, _free_port(), fn, payload, out_dir, timeout_s),
            nprocs=cp,
            join=False,
            start_method="spawn",
        )
        if tolerate_exit:
            deadline = None if kill_after_s is None else time.monotonic() + kill_after_s
            order = [r for r in range(cp) if r not in hung_ranks] + list(hung_ranks)
            for r in order:
                p = ctx.processes[r]
                if r in hung_ranks:
                    p.kill()
                p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
        else:
            while not ctx.join():
                pass
        results = []
        for r in range(cp):
            path = os.path.join(out_dir, f"{r}.pkl")
            if not os.path.exists(path):
                results.append(("dead", ctx.processes[r].exitcode))
                continue
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    return results


def unwrap(results):
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status != "ok"]
    if errors:
        raise AssertionError("; ".join(errors))
    return [res for _, res in results]


def _pool_entry(rank, cp, port, inbox, outbox, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp, timeout=timedelta(seconds=timeout_s)
    )
    try:
        while True:
            job = inbox.get()
            if job is None:
                break
            fn, payload = job
            try:
                outbox.put((rank, ("ok", fn(rank, cp, payload))))
            except Exception as exc:
                outbox.put((rank, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``cp`` long-lived gloo ranks that run one job after another (saves a spawn per test case).

    Only for jobs that leave the group usable: every rank must finish each job.
    """

    def __init__(self, cp: int, timeout_s: float = 60.0):
        ctx = mp.get_context("spawn")
        self.cp = cp
        self.stopped = False
        self.inboxes = [ctx.Queue() for _ in range(cp)]
        self.outbox = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_pool_entry, args=(r, cp, port, self.inboxes[r], self.outbox, timeout_s), daemon=True)
            for r in range(cp)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, payload=None, timeout_s: float = 300.0):
        """Per-rank ``("ok", result)`` or ``("error", message)``, as :func:`run_ranks`."""
        for box in self.inboxes:
            box.put((fn, payload))
        results = [None] * self.cp
        for _ in range(self.cp):
            rank, res = self.outbox.get(timeout=timeout_s)
            results[rank] = res
        return results

    def stop(self) -> None:
        """Ask every rank to leave (returns at once; :meth:`close` waits)."""
        if not self.stopped:
            self.stopped = True
            for box in self.inboxes:
                box.put(None)

    def close(self) -> None:
        self.stop()
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

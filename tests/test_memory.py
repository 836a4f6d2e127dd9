"""Memory under a long run: what ringattn keeps per layout goes when the layout goes, and nothing is re-planned.

CP 4 on gloo, a few hundred training steps, each with a new random layout (zigzag, balanced and auto in turn, the
three comm shapes, every fifth step Ulysses 2 x ring 2), forward and backward: after a warm-up the process's resident
memory stays flat, and the per-layout memories (plans, executor views, agreements) hold only the layouts still
alive. Then one layout serves many calls: its plan is built once (the builder is counted) and the same objects come
back.
"""

from __future__ import annotations

import gc
import os
import random

from .dist import run_ranks, unwrap

STEPS = 240
WARMUP = 60
SAMPLE = 192  # a multiple of every rule here: 2*4 (zigzag/auto), 4*4 (balanced), hybrid splits
RSS_SLACK = 12 << 20  # allocator noise; a layout's plans and index tensors leaking per step would exceed it


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_layouts() -> int:
    from ringattn import DocLayout

    return sum(1 for o in gc.get_objects() if isinstance(o, DocLayout))


def _memories() -> dict[str, int]:
    from ringattn.agreement import AGREED
    from ringattn.comm.executor import EXECS
    from ringattn.plan.build import PLANS

    return {"plans": len(PLANS), "execs": len(EXECS), "agreed": len(AGREED)}


def _random_cu(rng: random.Random, samples: int) -> list[int]:
    cu = [0]
    for b in range(samples):
        end = (b + 1) * SAMPLE
        while cu[-1] < end:
            cu.append(min(end, cu[-1] + rng.choice((1, 3, 17, 40, 90, 200))))
    return cu


def _step(layout, group, comm, rank, seed):
    import torch

    import ringattn

    g = torch.Generator().manual_seed(seed * 16 + rank)
    n = layout.local_tokens(rank)
    q = torch.randn(n, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(n, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    out = ringattn.ring_eod_attention(q, k, v, layout, group, comm=comm)
    out.square().sum().backward()
    return float(q.grad.abs().sum())


def _long_run(rank, cp, _):
    import ringattn
    import ringattn.plan.build as build

    groups = ringattn.new_cp_groups(2)
    rng = random.Random(2026)  # the same sequence of layouts on every rank
    strategies, comms = ("zigzag", "balanced", "auto"), ("plain", "ring", "direct")
    samples = []
    for step in range(STEPS):
        hybrid = step % 5 == 4
        layout = ringattn.DocLayout.from_cu_seqlens(
            _random_cu(rng, 1 + step % 2),
            cp,
            sample_len=SAMPLE,
            strategy=strategies[step % 3],
            ulysses_size=2 if hybrid else 1,
        )
        _step(layout, groups if hybrid else None, comms[step % 3], rank, step)
        del layout
        if step + 1 in (WARMUP, STEPS // 2, STEPS):
            gc.collect()
            samples.append((step + 1, _rss(), _live_layouts(), _memories()))

    # one layout, many calls: planned once, the same plan and executor objects every time
    layout = ringattn.DocLayout.from_cu_seqlens(_random_cu(rng, 2), cp, sample_len=SAMPLE, strategy="balanced")
    _step(layout, None, "direct", rank, 0)
    built = []
    original = build._build_rank

    def counting(*args):
        built.append(args[2])
        return original(*args)

    build._build_rank = counting
    try:
        plan = ringattn.rank_plan(layout, rank)
        gc.collect()
        before = (_rss(), _memories())
        for i in range(120):
            _step(layout, None, "direct", rank, i)
        gc.collect()
        after = (_rss(), _memories())
        same = ringattn.rank_plan(layout, rank) is plan
    finally:
        build._build_rank = original
    return samples, before, after, built, same


def test_memory_stays_flat_over_many_layouts_and_calls():
    for rank, (samples, before, after, built, same) in enumerate(unwrap(run_ranks(4, _long_run, timeout_s=300))):
        (_, rss_warm, _, _), _, (_, rss_end, live_end, mem_end) = samples
        assert rss_end - rss_warm < RSS_SLACK, f"rank {rank}: resident memory grew {rss_end - rss_warm} B: {samples}"
        # the ring layout of the last hybrid layout is gone with it; nothing else keeps a layout or its state
        assert live_end == 0, f"rank {rank}: {live_end} layouts outlive their step: {samples}"
        assert mem_end == {"plans": 0, "execs": 0, "agreed": 0}, f"rank {rank}: per-layout memory kept: {samples}"
        assert built == [] and same, f"rank {rank}: a reused layout was re-planned ({built})"
        assert before[1] == after[1] == {"plans": 1, "execs": 1, "agreed": 1}, (rank, before, after)
        assert after[0] - before[0] < RSS_SLACK, f"rank {rank}: {before} -> {after}"

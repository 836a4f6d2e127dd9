"""benchmarks/peers.py (ringattn beside torch's own context parallelism) at CP 2 on a tiny sample.

Checks every exactness column it reports (against its float64 reference, which is itself checked against the
tests' dense reference), that each row of the batch came from exactly one rank, and that the KV tokens it counted
on ringattn's receives equal the plan's ``layout.stats().kv_recv_tokens`` - never the times. A deliberately wrong
peer shows that the exactness columns catch a wrong answer.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from ringattn import DocLayout
from ringattn.workloads import load_workload, rescale_cu_seqlens

from .dist import run_ranks, unwrap
from .reference import dense_with_grads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peers  # noqa: E402  (benchmarks/peers.py)

CP = 2
SAMPLE = 512  # the smallest torch flex CP takes at CP 2: a multiple of 128 * CP
WORKLOADS = ("pretrain_mix_128k", "one_doc_128k")  # many documents (perdoc refuses), one document (perdoc runs)
ARGV = [
    "--device",
    "cpu",
    "--sample-len",
    str(SAMPLE),
    "--workloads",
    ",".join(WORKLOADS),
    "--no-flex-compile",
    "--rounds",
    "1",
    "--setup-reps",
    "1",
]
TOL = 1e-5  # fp32, as the attention tests
WRONG = "ringattn wrong scale"


class _WrongScale(peers.RingPeer):
    """ringattn given a softmax scale 10% off: an answer the exactness columns must flag."""

    def __init__(self, args):
        super().__init__("zigzag", args)
        self.name = WRONG

    def forward(self, st, batch):
        import ringattn

        return ringattn.ring_eod_attention(st["q"], st["k"], st["v"], st["layout"], softmax_scale=batch.scale * 1.1)


def _run(rank, cp, argv):
    real = peers.build_peers

    def with_wrong(args, api, missing, cp):
        found, skipped = real(args, api, missing, cp)
        return found + [_WrongScale(args)], skipped

    peers.build_peers = with_wrong
    buf = io.StringIO()
    results = peers.run(argv, out=buf)
    return results, buf.getvalue()


def test_reference_matches_the_dense_reference():
    cu = [0, 5, 6, 40, 64, 100, 128]  # two samples of 64, documents of 5, 1, 34, 24, 36, 28 tokens
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(128, 4, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(128, 2, 16, generator=g) for _ in range(2))
    want = dense_with_grads(q, k, v, dout, cu, 0.25)
    shares = peers.split_docs(cu, 3)
    assert sorted(d for share in shares for d in share) == list(range(len(cu) - 1))
    got = [sum(parts) for parts in zip(*(peers.reference(q, k, v, dout, cu, 0.25, s) for s in shares))]
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert (x - r).abs().max().item() < 1e-12, name


def test_peers_cp2_exact_and_counts_match_the_plan():
    per_rank = unwrap(run_ranks(CP, _run, ARGV, timeout_s=120))
    results, printed = per_rank[0]
    assert all(set(r) == set(results) for r, _ in per_rank[1:])
    _, missing = peers.torch_cp_api()
    assert set(results) == set(WORKLOADS)
    for wname, outcomes in results.items():
        by = {o.peer: o for o in outcomes}
        cu = rescale_cu_seqlens(load_workload(wname)["cu_seqlens"], load_workload(wname)["sample_len"], SAMPLE)
        for strategy in peers.STRATEGIES:
            o = by[f"ringattn {strategy}"]
            assert not o.refused and not o.bwd_refused and not o.coverage, (wname, o)
            assert set(o.errors) == {"out", "dq", "dk", "dv"}, (wname, o.peer)
            assert all(0 <= e <= TOL for e in o.errors.values()), (wname, o.peer, o.errors)
            plan = DocLayout.from_cu_seqlens(cu, CP, sample_len=SAMPLE, strategy=strategy).stats().kv_recv_tokens
            assert o.kv_tokens == o.kv_expected == list(plan), (wname, o.peer, o.kv_tokens, plan)
            assert len(o.fwd) == 1 and len(o.fwdbwd) == 1
        wrong = by[WRONG]
        assert not wrong.coverage and min(wrong.errors.values()) > 1e-3, wrong.errors
        assert f"{wname}:" in printed and "(= plan)" in printed
        if missing["flex"]:
            continue
        ran = 0
        for b in ("headtail", "perdoc", "ptrr"):
            o = by[f"torch flex {b}"]
            assert f"torch flex {b}" in printed
            if o.refused:
                assert o.refused.startswith("setup: ") and len(o.refused) > 20, o.refused
                assert o.refused.split("setup: ")[1][:60] in printed
                continue
            ran += 1
            assert not o.coverage and 0 <= o.errors["out"] <= TOL, (wname, o.peer, o.errors)
            assert "backward on CPU" in o.bwd_refused and set(o.errors) == {"out"}, (wname, o.peer, o.bwd_refused)
            assert o.kv_tokens == [(CP - 1) * SAMPLE // CP] * CP  # its all-gather: everything but the own shard
        assert ran >= 2, wname  # headtail and ptrr take every 512-token sample at CP 2
        # the per-document head-tail balancer needs every document divisible by 2*CP: only one_doc has that
        assert bool(by["torch flex perdoc"].refused) == (wname == "pretrain_mix_128k")

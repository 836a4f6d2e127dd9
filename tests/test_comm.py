"""The executor issues exactly the P2P operations the plan asks for."""

from __future__ import annotations

import math

import torch

import ringattn
from ringattn import DocLayout, build_plan

from .dist import run_ranks, unwrap
from .reference import dense_with_grads

CP, CHUNK = 4, 8
S = 2 * CP * CHUNK
INSIDE = sorted({0, S} | {c * CHUNK + off for c in range(2 * CP) for off in (0, 3)})  # no doc crosses a chunk
CROSSING = [0, 5, 40, S]


def _count_worker(rank, cp, cu):
    import torch.distributed as dist

    counted = {}
    real = dist.batch_isend_irecv

    def counting(ops):
        for op in ops:
            counted[op.op.__name__] = counted.get(op.op.__name__, 0) + 1
        return real(ops)

    dist.batch_isend_irecv = counting
    layout = DocLayout.from_cu_seqlens(cu, cp)
    idx = layout.local_indices(rank)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(S, 2, 16, generator=g) for _ in range(4))
    res = {}
    for comm in ("plain", "ring", "direct"):
        counted.clear()
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        out = ringattn.ring_eod_attention(ql, kl, vl, layout, comm=comm)
        out.backward(dout[idx])
        ref = dense_with_grads(q, k, v, dout, cu, 1 / math.sqrt(16))
        err = max((x.double() - r[idx]).abs().max().item() for x, r in zip((out, ql.grad, kl.grad, vl.grad), ref))
        res[comm] = (dict(counted), err)
    return res


def expected_ops(layout, comm, rank):
    rp = build_plan(layout, comm).ranks[rank]
    # forward KV, backward KV replay, backward dK/dV returns
    kv = sum((s.send is not None) + (s.recv is not None) for s in rp.steps)
    grad = sum((s.grad_send is not None) + (s.grad_recv is not None) for s in rp.steps)
    return 2 * kv + grad


def test_documents_inside_chunks_issue_no_p2p():
    results = unwrap(run_ranks(CP, _count_worker, INSIDE))
    layout = DocLayout.from_cu_seqlens(INSIDE, CP)
    for rank, res in enumerate(results):
        for comm in ("ring", "direct"):
            counted, err = res[comm]
            assert counted == {}, f"rank {rank} {comm}: {counted}"
            assert err < 1e-5
        counted, err = res["plain"]
        assert sum(counted.values()) == expected_ops(layout, "plain", rank) > 0
        assert err < 1e-5


def test_crossing_documents_issue_planned_p2p():
    results = unwrap(run_ranks(CP, _count_worker, CROSSING))
    layout = DocLayout.from_cu_seqlens(CROSSING, CP)
    for rank, res in enumerate(results):
        for comm in ("plain", "ring", "direct"):
            counted, err = res[comm]
            assert sum(counted.values()) == expected_ops(layout, comm, rank), (rank, comm, counted)
            assert err < 1e-5
    assert sum(sum(res["direct"][0].values()) for res in results) > 0

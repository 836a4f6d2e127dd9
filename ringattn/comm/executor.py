"""The one executor: runs any :class:`~ringattn.plan.RankPlan` forward and backward.

Tensors (local rank):

* q ``[Tq, Hq, D]``; kv ``[Tk, 2, Hkv, D]`` (K and V stacked so one message carries both).
* forward returns fp32 ``out [Tq, Hq, D]`` and ``lse [Tq, Hq]`` (merged over all steps).
* backward returns fp32 ``dq [Tq, Hq, D]`` and ``dkv [Tk, 2, Hkv, D]`` (own rows, with the
  partials other ranks computed on them added in).

Overlap: step ``t+1``'s KV exchange is posted before step ``t`` computes, into the other of
two receive buffers (sized for the largest step). In backward, the dK/dV partial of step
``t`` (fp32, only the rows this rank read) is posted back to its origin right after step ``t``
computes and is added at the owner, in fp32, while later steps run.
"""
from __future__ import annotations

import torch

from ..merge import merge_
from ..plan import RankPlan, Step
from .p2p import TAG_GRAD, TAG_KV, Batch, post

__all__ = ["run_forward", "run_backward"]


def _gather(x: torch.Tensor, rows) -> torch.Tensor:
    if len(rows) == 1:
        s, e = rows[0]
        return x[s:e]
    return torch.cat([x[s:e] for s, e in rows])


def _calls(step: Step):
    """Segments of a step grouped into kernel calls: (causal, q ranges, kv ranges, cu_q, cu_k)."""
    for causal in (True, False):
        segs = [s for s in step.segments if s.causal == causal]
        if not segs:
            continue
        cu_q, cu_k = [0], [0]
        for s in segs:
            cu_q.append(cu_q[-1] + s.q[1] - s.q[0])
            cu_k.append(cu_k[-1] + s.kv[1] - s.kv[0])
        yield causal, [s.q for s in segs], [s.kv for s in segs], tuple(cu_q), tuple(cu_k)


def _max_len(cu) -> int:
    return max(b - a for a, b in zip(cu, cu[1:]))


class _KVStream:
    """Double-buffered KV exchange of a plan (the forward route, replayed in backward)."""

    def __init__(self, plan: RankPlan, kv: torch.Tensor, group):
        self.plan, self.kv, self.group = plan, kv, group
        n = plan.max_recv_tokens
        shape = (n,) + tuple(kv.shape[1:])
        self.bufs = [kv.new_empty(shape), kv.new_empty(shape)] if n else []

    def post(self, i: int, prev: torch.Tensor | None) -> tuple[Batch, torch.Tensor | None]:
        step = self.plan.steps[i]
        sends, recvs, buf = [], [], None
        if step.send is not None:
            src = prev if step.send_from_buffer else self.kv
            sends.append((step.send.peer, _gather(src, step.send.rows).contiguous()))
        if step.recv is not None:
            buf = self.bufs[i % 2][: step.recv.tokens]
            recvs.append((step.recv.peer, buf))
        what = f"KV exchange of step {i} (distance {step.distance}, origin rank {step.origin})"
        return post(self.group, what, sends, recvs, TAG_KV), buf

    def __iter__(self):
        """Yields ``(step, kv source)`` with the next step's exchange already in flight."""
        steps = self.plan.steps
        pending = self.post(0, None)
        for i, step in enumerate(steps):
            batch, buf = pending
            batch.wait()
            if i + 1 < len(steps):
                pending = self.post(i + 1, buf)
            yield step, (self.kv if i == 0 else buf)


def run_forward(plan: RankPlan, q, kv, group, kernel, scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for step, src in _KVStream(plan, kv, group):
        for causal, q_rows, kv_rows, cu_q, cu_k in _calls(step):
            o, l = kernel.forward(
                _gather(q, q_rows), _gather(src[:, 0], kv_rows), _gather(src[:, 1], kv_rows),
                cu_q, cu_k, _max_len(cu_q), _max_len(cu_k), causal, scale,
            )
            for (s, e), off in zip(q_rows, cu_q):
                merge_(out[s:e], lse[s:e], o[off:off + e - s], l[off:off + e - s])
    return out, lse


def run_backward(plan: RankPlan, dout, q, kv, out, lse, group, kernel, scale):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    in_flight: list[tuple[Batch, Step, torch.Tensor | None]] = []

    def land(batch: Batch, step: Step, recv: torch.Tensor | None) -> None:
        batch.wait()
        if recv is not None:
            off = 0
            for s, e in step.grad_recv.rows:
                dkv[s:e] += recv[off:off + e - s]
                off += e - s

    for i, (step, src) in enumerate(_KVStream(plan, kv, group)):
        if i == 0:
            target = dkv
        elif src is not None:
            target = torch.zeros(src.shape, dtype=torch.float32, device=src.device)
        for causal, q_rows, kv_rows, cu_q, cu_k in _calls(step):
            g_q, g_k, g_v = kernel.backward(
                _gather(dout, q_rows), _gather(q, q_rows), _gather(src[:, 0], kv_rows), _gather(src[:, 1], kv_rows),
                _gather(out, q_rows), _gather(lse, q_rows), cu_q, cu_k, _max_len(cu_q), _max_len(cu_k), causal, scale,
            )
            for (s, e), off in zip(q_rows, cu_q):
                dq[s:e] += g_q[off:off + e - s]
            for (s, e), off in zip(kv_rows, cu_k):
                target[s:e, 0] += g_k[off:off + e - s]
                target[s:e, 1] += g_v[off:off + e - s]
        sends, recvs, recv = [], [], None
        if step.grad_send is not None:
            sends.append((step.grad_send.peer, _gather(target, step.grad_send.rows).contiguous()))
        if step.grad_recv is not None:
            recv = dkv.new_empty((step.grad_recv.tokens,) + tuple(dkv.shape[1:]))
            recvs.append((step.grad_recv.peer, recv))
        what = f"dK/dV return of step {i} (distance {step.distance})"
        in_flight.append((post(group, what, sends, recvs, TAG_GRAD), step, recv))
        if len(in_flight) > 1:
            land(*in_flight.pop(0))
    for item in in_flight:
        land(*item)
    return dq, dkv

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

from ..merge import merge as _merge
from ..plan import RankPlan, Step
from .p2p import TAG_GRAD, TAG_KV, Batch, post

__all__ = ["run_forward", "run_backward", "forward_step", "backward_step"]


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


def _scatter(dst: torch.Tensor, rows, src: torch.Tensor, add: bool = False) -> None:
    """Write (or add) packed ``src`` rows back to ``dst`` at the row ranges ``rows``."""
    off = 0
    for s, e in rows:
        if add:
            dst[s:e] += src[off:off + e - s]
        else:
            dst[s:e] = src[off:off + e - s]
        off += e - s


def forward_step(step: Step, q, src, out, lse, kernel, scale) -> None:
    """Compute one step's block pairs on KV ``src`` and merge them into fp32 ``out``/``lse``.

    At step 0 the causal segments cover every local query row exactly once, so the first
    call initialises the accumulators; every later result is merged (finite LSE on both sides).
    """
    merge = getattr(kernel, "merge", _merge)
    for causal, q_rows, kv_rows, cu_q, cu_k in _calls(step):
        o, l = kernel.forward(
            _gather(q, q_rows), _gather(src[:, 0], kv_rows), _gather(src[:, 1], kv_rows),
            cu_q, cu_k, _max_len(cu_q), _max_len(cu_k), causal, scale,
        )
        if step.distance == 0 and causal:
            _scatter(out, q_rows, o)
            _scatter(lse, q_rows, l)
        else:
            o, l = merge(_gather(out, q_rows), _gather(lse, q_rows), o, l, cu_q)
            _scatter(out, q_rows, o)
            _scatter(lse, q_rows, l)


def backward_step(step: Step, dout, q, src, out, lse, dq, dsrc, kernel, scale) -> None:
    """Add one step's gradients: dq into fp32 ``dq``, dK/dV into fp32 ``dsrc`` (rows of ``src``)."""
    for causal, q_rows, kv_rows, cu_q, cu_k in _calls(step):
        g_q, g_k, g_v = kernel.backward(
            _gather(dout, q_rows), _gather(q, q_rows), _gather(src[:, 0], kv_rows), _gather(src[:, 1], kv_rows),
            _gather(out, q_rows), _gather(lse, q_rows), cu_q, cu_k, _max_len(cu_q), _max_len(cu_k), causal, scale,
        )
        _scatter(dq, q_rows, g_q, add=True)
        _scatter(dsrc[:, 0], kv_rows, g_k, add=True)
        _scatter(dsrc[:, 1], kv_rows, g_v, add=True)


def run_forward(plan: RankPlan, q, kv, group, kernel, scale):
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for step, src in _KVStream(plan, kv, group):
        forward_step(step, q, src, out, lse, kernel, scale)
    return out, lse


def run_backward(plan: RankPlan, dout, q, kv, out, lse, group, kernel, scale):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    in_flight: list[tuple[Batch, Step, torch.Tensor | None]] = []

    def land(batch: Batch, step: Step, recv: torch.Tensor | None) -> None:
        batch.wait()
        if recv is not None:
            _scatter(dkv, step.grad_recv.rows, recv, add=True)

    for i, (step, src) in enumerate(_KVStream(plan, kv, group)):
        if i == 0:
            target = dkv
        else:  # dK/dV partial of this step's buffer (no buffer: nothing read, nothing to return)
            target = None if src is None else torch.zeros(src.shape, dtype=torch.float32, device=src.device)
        if step.segments:
            backward_step(step, dout, q, src, out, lse, dq, target, kernel, scale)
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

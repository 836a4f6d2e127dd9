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

Host path: a plan is turned once into :class:`PlanExec` (kept in this module's :data:`EXECS`, per plan
object, dropped with it: :class:`ringattn._memo.IdentityMemo`): per step at
most two kernel calls (:class:`~ringattn.kernels.VarlenCall`, the causal and the dense segments; under a
sliding window one per distinct window pair, i.e. per piece read across, never per document),
and every set of rows the step reads or writes as :class:`Rows` — a slice when the rows are one
contiguous run (the causal segments of a rank's own pieces always are), otherwise one
``index_select`` / ``index_copy_`` / ``index_add_`` with an index tensor built once per device. So
the host work of a call grows with the number of plan steps, never with documents or segments, and
nothing in forward or backward reads a device tensor back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._memo import IdentityMemo
from ..kernels import VarlenCall
from ..merge import merge as _torch_merge
from ..plan import RankPlan, Step
from .p2p import TAG_GRAD, TAG_KV, Batch, post

__all__ = [
    "run_forward",
    "run_backward",
    "forward_step",
    "backward_step",
    "plan_exec",
    "PlanExec",
    "StepExec",
    "Rows",
    "EXECS",
]

Range = tuple[int, int]

#: per plan object: its :class:`PlanExec` (see the module docstring)
EXECS: IdentityMemo[PlanExec] = IdentityMemo("executor view per plan")


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows ``ranges`` (in order) of a tensor's first dimension: a view when they form one run.

    ``span`` is ``(start, end)`` when the ranges are consecutive, else None and the rows go through
    an int64 index tensor built once per device (:meth:`index`).

    >>> import torch
    >>> Rows(((0, 4), (4, 6))).span                    # one run: a view
    (0, 6)
    >>> gap = Rows(((0, 2), (5, 7)))
    >>> gap.span, gap.take(torch.arange(10)).tolist()   # one index_select
    (None, [0, 1, 5, 6])
    """

    ranges: tuple[Range, ...]
    count: int = field(init=False)
    span: Range | None = field(init=False)
    _index: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        r = self.ranges
        object.__setattr__(self, "count", sum(e - s for s, e in r))
        run = all(a[1] == b[0] for a, b in zip(r, r[1:]))
        object.__setattr__(self, "span", (r[0][0], r[-1][1]) if r and run else None)

    def index(self, device) -> torch.Tensor:
        key = torch.device(device)
        idx = self._index.get(key)
        if idx is None:
            starts = torch.tensor([s for s, _ in self.ranges], dtype=torch.int64)
            lengths = torch.tensor([e - s for s, e in self.ranges], dtype=torch.int64)
            offsets = torch.cumsum(lengths, 0) - lengths  # position of each range in the packed order
            idx = torch.arange(self.count, dtype=torch.int64) + torch.repeat_interleave(starts - offsets, lengths)
            idx = self._index[key] = idx.to(key)
        return idx

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` in order (a view for a span)."""
        if self.span is not None:
            return x[self.span[0] : self.span[1]]
        return x.index_select(0, self.index(x.device))

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Write packed ``src`` to these rows of ``dst`` (rows must be distinct)."""
        if self.span is not None:
            dst[self.span[0] : self.span[1]].copy_(src)
        else:
            dst.index_copy_(0, self.index(dst.device), src.to(dst.dtype))

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Add packed ``src`` to these rows of ``dst`` (repeated rows accumulate)."""
        if self.span is not None:
            dst[self.span[0] : self.span[1]].add_(src)
        else:
            dst.index_add_(0, self.index(dst.device), src.to(dst.dtype))


@dataclass(frozen=True, eq=False)
class Call:
    """One kernel call of a step: its query rows, its KV rows (in the step's KV source) and segments."""

    q: Rows
    kv: Rows
    varlen: VarlenCall
    init: bool  # step 0's causal call: covers every local query row once, initialises out/lse


@dataclass(frozen=True, eq=False)
class StepExec:
    calls: tuple[Call, ...]
    send: Rows | None  # KV rows leaving at this step (in the local KV or the previous buffer)
    grad_send: Rows | None  # rows of this step's buffer whose dK/dV partial goes back
    grad_recv: Rows | None  # local KV rows whose dK/dV partial arrives


@dataclass(frozen=True, eq=False)
class PlanExec:
    """Everything the executor derives from a :class:`RankPlan`, built once per plan."""

    steps: tuple[StepExec, ...]


def _groups(segments) -> list[list]:
    """The step's segments as kernel calls: one call per ``(causal, window)`` pair, causal first (at most two
    calls without a window), split further only where a window makes one query part read several key
    ranges of the same origin (their query rows overlap, and a call's rows must be distinct)."""
    groups: dict[tuple, list[list]] = {}
    for seg in sorted(segments, key=lambda s: not s.causal):  # stable: plan order within causal / dense
        subs = groups.setdefault((seg.causal, seg.window), [])
        for sub in subs:
            if sub[-1].q[1] <= seg.q[0]:
                sub.append(seg)
                break
        else:
            subs.append([seg])
    return [sub for subs in groups.values() for sub in subs]


def _calls(step: Step, local_tokens: int) -> tuple[Call, ...]:
    calls = []
    for segs in _groups(step.segments):
        cu_q, cu_k = [0], [0]
        for s in segs:
            cu_q.append(cu_q[-1] + s.q[1] - s.q[0])
            cu_k.append(cu_k[-1] + s.kv[1] - s.kv[0])
        q_rows = Rows(tuple(s.q for s in segs))
        causal, window = segs[0].causal, segs[0].window
        init = step.distance == 0 and causal
        if init and q_rows.span != (0, local_tokens):
            raise AssertionError(f"planner: step 0's causal segments must cover rows [0, {local_tokens}) in order")
        calls.append(
            Call(q_rows, Rows(tuple(s.kv for s in segs)), VarlenCall(tuple(cu_q), tuple(cu_k), causal, window), init)
        )
    return tuple(calls)


def _rows(transfer) -> Rows | None:
    return None if transfer is None else Rows(transfer.rows)


def plan_exec(plan: RankPlan) -> PlanExec:
    """The executor's view of ``plan`` (built on first use, then kept for the plan object in :data:`EXECS`).

    Rank 1 of a 2-rank zigzag layout (documents ``[0, 5)``, ``[5, 8)``, ``[8, 16)``; see
    :mod:`ringattn.plan`): step 0 is one causal call over its three document parts, step 1 one
    dense call of local query row 0 against the 4 received KV rows; every row set is one span, so
    the executor takes views (no index tensor):

    >>> from ringattn import DocLayout, rank_plan
    >>> layout = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2)
    >>> ex = plan_exec(rank_plan(layout, 1))
    >>> [[(c.varlen.cu_q, c.varlen.cu_k, c.varlen.causal, c.init) for c in st.calls] for st in ex.steps]
    [[((0, 1, 4, 8), (0, 1, 4, 8), True, True)], [((0, 1), (0, 4), False, False)]]
    >>> ex.steps[1].send.span, ex.steps[1].grad_send.span, ex.steps[1].grad_recv.span
    ((4, 8), (0, 4), (4, 8))
    >>> plan_exec(rank_plan(layout, 1)) is ex           # the same plan object, the same PlanExec
    True
    """
    return EXECS.get(
        plan,
        lambda: PlanExec(
            tuple(
                StepExec(_calls(s, plan.local_tokens), _rows(s.send), _rows(s.grad_send), _rows(s.grad_recv))
                for s in plan.steps
            )
        ),
    )


def _kv_stream(plan: RankPlan, ex: PlanExec, kv: torch.Tensor, group):
    """Yields ``(i, kv source)`` for every step, the next step's exchange already in flight."""
    n = plan.max_recv_tokens
    bufs = [kv.new_empty((n,) + tuple(kv.shape[1:])) for _ in range(2)] if n else []

    def post_step(i: int, prev):
        step = plan.steps[i]
        sends, recvs, buf = [], [], None
        if step.send is not None:
            src = prev if step.send_from_buffer else kv
            sends.append((step.send.peer, ex.steps[i].send.take(src).contiguous()))
        if step.recv is not None:
            buf = bufs[i % 2][: step.recv.tokens]
            recvs.append((step.recv.peer, buf))
        what = f"KV exchange of step {i} (distance {step.distance}, origin rank {step.origin})"
        return post(group, what, sends, recvs, TAG_KV), buf

    pending = post_step(0, None)
    for i in range(len(plan.steps)):
        batch, buf = pending
        batch.wait()
        if i + 1 < len(plan.steps):
            pending = post_step(i + 1, buf)
        yield i, (kv if i == 0 else buf)


def forward_step(step: StepExec, q, src, out, lse, kernel, scale) -> None:
    """Compute one step's calls on KV ``src`` and merge them into fp32 ``out``/``lse``.

    Step 0's causal call covers every local query row, so it initialises the accumulators; every
    other result is merged (finite LSE on both sides) — by the kernel's fused merge when it has one.
    """
    fused = getattr(kernel, "merge", None)
    for call in step.calls:
        o, l = kernel.forward(call.q.take(q), call.kv.take(src[:, 0]), call.kv.take(src[:, 1]), call.varlen, scale)
        if call.init:
            out.copy_(o)
            lse.copy_(l)
            continue
        acc_o, acc_l = call.q.take(out), call.q.take(lse)
        o, l = fused(acc_o, acc_l, o, l, call.varlen) if fused else _torch_merge(acc_o, acc_l, o, l)
        call.q.put(out, o)
        call.q.put(lse, l)


def backward_step(step: StepExec, dout, q, src, out, lse, dq, dsrc, kernel, scale) -> None:
    """Add one step's gradients: dq into fp32 ``dq``, dK/dV into fp32 ``dsrc`` (rows of ``src``)."""
    for call in step.calls:
        g_q, g_k, g_v = kernel.backward(
            call.q.take(dout),
            call.q.take(q),
            call.kv.take(src[:, 0]),
            call.kv.take(src[:, 1]),
            call.q.take(out),
            call.q.take(lse),
            call.varlen,
            scale,
        )
        call.q.add(dq, g_q)
        call.kv.add(dsrc[:, 0], g_k)
        call.kv.add(dsrc[:, 1], g_v)


def run_forward(plan: RankPlan, q, kv, group, kernel, scale):
    ex = plan_exec(plan)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for i, src in _kv_stream(plan, ex, kv, group):
        forward_step(ex.steps[i], q, src, out, lse, kernel, scale)
    return out, lse


def run_backward(plan: RankPlan, dout, q, kv, out, lse, group, kernel, scale):
    ex = plan_exec(plan)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    in_flight: list[tuple[Batch, Rows | None, torch.Tensor | None]] = []

    def land(batch: Batch, rows: Rows | None, recv: torch.Tensor | None) -> None:
        batch.wait()
        if recv is not None:
            rows.add(dkv, recv)

    for i, src in _kv_stream(plan, ex, kv, group):
        step, sx = plan.steps[i], ex.steps[i]
        if i == 0:
            target = dkv
        else:  # dK/dV partial of this step's buffer (no buffer: nothing read, nothing to return)
            target = None if src is None else torch.zeros(src.shape, dtype=torch.float32, device=src.device)
        if sx.calls:
            backward_step(sx, dout, q, src, out, lse, dq, target, kernel, scale)
        sends, recvs, recv = [], [], None
        if step.grad_send is not None:
            sends.append((step.grad_send.peer, sx.grad_send.take(target).contiguous()))
        if step.grad_recv is not None:
            recv = dkv.new_empty((step.grad_recv.tokens,) + tuple(dkv.shape[1:]))
            recvs.append((step.grad_recv.peer, recv))
        what = f"dK/dV return of step {i} (distance {step.distance})"
        in_flight.append((post(group, what, sends, recvs, TAG_GRAD), sx.grad_recv, recv))
        if len(in_flight) > 1:
            land(*in_flight.pop(0))
    for item in in_flight:
        land(*item)
    return dq, dkv

"""The original all-pairs planner (O(CP^2) pure Python), kept as an independent oracle.

tests/test_plan.py checks that ``ringattn.plan.build_plan`` (which builds each rank's plan
from a per-layout index) produces exactly the same plans as this straightforward
construction over every (reader, origin) pair.
"""

from __future__ import annotations

from ringattn.layout import DocLayout, doc_segments
from ringattn.plan.types import COMM_SHAPES, DEFAULT_COMM, Plan, PlanStats, Range, RankPlan, Segment, Step, Transfer

__all__ = ["reference_plan"]


# ---------------------------------------------------------------------------- helpers
def _merge_ranges(ranges) -> tuple[Range, ...]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def _rows_of(ranges: tuple[Range, ...], sub: tuple[Range, ...]) -> tuple[Range, ...]:
    """Row ranges, inside a buffer laid out as the sorted ``ranges``, of the global ``sub``."""
    rows = []
    covered = 0
    offset = 0
    for s, e in ranges:
        for ss, se in sub:
            lo, hi = max(s, ss), min(e, se)
            if lo < hi:
                rows.append((offset + lo - s, offset + hi - s))
                covered += hi - lo
        offset += e - s
    if covered != sum(e - s for s, e in sub):
        raise AssertionError(f"planner: ranges {sub} are not inside the buffer {ranges}")
    return _merge_ranges(rows)


def _contiguous_rows(ranges: tuple[Range, ...], sub: tuple[Range, ...]) -> Range:
    rows = _rows_of(ranges, sub)
    if len(rows) != 1:
        raise AssertionError(f"planner: KV {sub} is not contiguous in buffer {ranges}")
    return rows[0]


def _reads(layout: DocLayout, x: int, o: int):
    """Block pairs of rank ``x``'s queries against rank ``o``'s KV.

    Yields ``(q_local_range, kv_global_ranges, causal)``; for ``o != x`` the KV ranges of one
    query range are merged (they are contiguous in any sorted buffer of ``o``'s tokens).
    """
    cu = layout.cu_seqlens
    q_off = 0
    for a in layout.pieces[x]:
        a0, a1 = a
        if o == x:
            for s, e, _ in doc_segments(cu, a0, a1):
                yield (q_off + s - a0, q_off + e - a0), ((s, e),), True
        d = layout.doc_of(a0)
        ds, de = cu[d], cu[d + 1]
        kv = [(max(b0, ds), b1) for b0, b1 in layout.pieces[o] if (b0, b1) != a and ds < b1 <= a0]
        if kv:
            q_len = min(a1, de) - a0
            yield (q_off, q_off + q_len), _merge_ranges(kv), False
        q_off += a1 - a0


def _pair_counts(layout: DocLayout, x: int) -> tuple[int, int]:
    """(computed, skipped) (q piece, KV piece) pairs of the same sample for rank ``x``."""
    cu = layout.cu_seqlens
    computed = total = 0
    all_pieces = [p for ps in layout.pieces for p in ps]
    for a0, a1 in layout.pieces[x]:
        d = layout.doc_of(a0)
        sample = a0 // layout.sample_len
        for b0, b1 in all_pieces:
            if b0 // layout.sample_len != sample:
                continue
            total += 1
            if (b0, b1) == (a0, a1) or (cu[d] < b1 <= a0):
                computed += 1
    return computed, total - computed


# ---------------------------------------------------------------------------- planner
def reference_plan(layout: DocLayout, comm: str = DEFAULT_COMM) -> Plan:
    """The global plan of ``layout`` for comm shape ``comm``, built over all rank pairs."""
    if comm not in COMM_SHAPES:
        raise ValueError(f"comm: expected one of {COMM_SHAPES}, got {comm!r}")
    cp = layout.cp_size
    pieces = layout.pieces

    # reads[x][o] = list of (q rows, kv global ranges, causal)
    reads = [[list(_reads(layout, x, o)) for o in range(cp)] for x in range(cp)]
    need = [
        [_merge_ranges(r for _, kv, _ in reads[x][o] for r in kv) if o != x else () for o in range(cp)]
        for x in range(cp)
    ]  # need[x][o]: global KV of o that x reads

    def need_at(o: int, t: int) -> tuple[Range, ...]:
        return need[(o + t) % cp][o]

    # buffer contents at distance t for origin o (what arrives at rank o + t)
    if comm == "plain":
        distances = list(range(1, cp))
        content = {(o, t): _merge_ranges(pieces[o]) for o in range(cp) for t in distances}
    elif comm == "ring":
        last = max((t for t in range(1, cp) for o in range(cp) if need_at(o, t)), default=0)
        distances = list(range(1, last + 1))
        content = {}
        for o in range(cp):
            acc: tuple[Range, ...] = ()
            for t in reversed(distances):
                acc = _merge_ranges(acc + need_at(o, t))
                content[(o, t)] = acc
    else:  # direct
        distances = [t for t in range(1, cp) if any(need_at(o, t) for o in range(cp))]
        content = {(o, t): need_at(o, t) for o in range(cp) for t in distances}

    rank_plans = []
    for x in range(cp):
        steps = [Step(0, x, tuple(Segment(q, _contiguous_rows(pieces[x], kv), c) for q, kv, c in reads[x][x]))]
        for t in distances:
            o = (x - t) % cp
            buf = content[(o, t)]
            segments = tuple(Segment(q, _contiguous_rows(buf, kv), False) for q, kv, _ in reads[x][o])
            src_peer = (x - 1) % cp if comm in ("plain", "ring") else o
            recv = Transfer(src_peer, ((0, sum(e - s for s, e in buf)),)) if buf else None
            # what leaves x at distance t
            if comm in ("plain", "ring"):
                dst, out_origin = (x + 1) % cp, (x + 1 - t) % cp
                out = content[(out_origin, t)]
                from_buffer = t > 1
                src_layout = content[(out_origin, t - 1)] if from_buffer else pieces[x]
            else:
                dst, out_origin, from_buffer = (x + t) % cp, x, False
                out = content[(x, t)]
                src_layout = pieces[x]
            send = Transfer(dst, _rows_of(src_layout, out)) if out else None
            mine = need[x][o]
            grad_send = Transfer(o, _rows_of(buf, mine)) if mine else None
            reader = (x + t) % cp
            theirs = need[reader][x]
            grad_recv = Transfer(reader, _rows_of(pieces[x], theirs)) if theirs else None
            steps.append(Step(t, o, segments, recv, send, from_buffer, grad_send, grad_recv))
        rank_plans.append(RankPlan(x, cp, comm, layout.local_tokens(x), tuple(steps)))

    pairs = [_pair_counts(layout, x) for x in range(cp)]
    stats = PlanStats(
        comm=comm,
        cp_size=cp,
        tokens=tuple(rp.local_tokens for rp in rank_plans),
        work=tuple(rp.work for rp in rank_plans),
        pairs_computed=tuple(p[0] for p in pairs),
        pairs_skipped=tuple(p[1] for p in pairs),
        kv_recv_tokens=tuple(rp.kv_recv_tokens for rp in rank_plans),
        kv_send_tokens=tuple(sum(s.send.tokens for s in rp.steps if s.send) for rp in rank_plans),
        step_distances=tuple(s.distance for s in rank_plans[0].steps),
        kv_recv_per_step=tuple(tuple(s.recv.tokens if s.recv else 0 for s in rp.steps) for rp in rank_plans),
        kv_send_per_step=tuple(tuple(s.send.tokens if s.send else 0 for s in rp.steps) for rp in rank_plans),
    )
    return Plan(comm, tuple(rank_plans), stats)

"""The planner under a sliding window: only the block pairs and KV rows the window lets a query read.

With a window of ``W`` keys (transformers' ``sliding_window``: the query at document position ``i``
sees the keys at positions ``j`` with ``i - W < j <= i``), a piece's first part ``[qs, qe)`` in its
document (starting at ``a``) reads, of the tokens before it, exactly ``[max(a, qs - W + 1), qs)``;
the parts of later documents start at their document's first token and read nothing before
themselves. So, per layout and window, :class:`WindowIndex` lists every piece's reads as global
ranges of earlier pieces (``reads[i]``: ``(piece j, start, end)``), and a rank's plan is built from
ranges instead of whole pieces:

* step 0: the causal blocks of the rank's own pieces, each masked by the window ``(W-1, 0)``, and
  the reads of its own earlier pieces;
* a remote origin's KV arrives as the sorted union of the ranges the reader needs (``direct``), or
  of the ranges every rank at least ``t`` steps downstream needs (``ring``), or its whole pieces
  (``plain``); a rank sends and receives back the dK/dV of exactly those rows;
* every read ``(q part, key range)`` is one dense segment with its query rows trimmed to those whose
  window reaches the keys (rows ``[qs, min(qe, ke + W - 1))``), masked by the window pair
  ``(W - 1 - delta, delta)`` with ``delta = q_end - k_end`` (flash_attn's convention: aligned to the
  segment's bottom-right corner; the trimming keeps ``left >= 0`` and leaves no fully masked row).

A block pair with no unmasked entry under the window is neither computed nor sent, and a rank
receives at most ``W - 1`` rows per document edge it reads across, whatever the document's length.
The window is part of the plan's cache key; a window at least as long as the longest document masks
nothing and is planned as no window (:func:`effective_window`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from ..ranges import PieceLayout
from .types import Range, RankPlan, Segment, Step, Transfer

__all__ = ["WindowIndex", "effective_window", "build_rank_windowed"]


def effective_window(layout: PieceLayout, window: int | None) -> int | None:
    """``window``, or None where it masks nothing (at least the longest document); ``ValueError`` if not a
    positive int."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"window: expected a positive int (the keys a query may attend to, itself included) or "
            f"None, got {window!r}; pass the layer's sliding window, or None on full-attention layers"
        )
    return None if window >= layout.longest_document else window


def _union(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted, touching or overlapping ranges merged."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


class _Rows:
    """A buffer holding sorted disjoint global ranges back to back: the row of a global token in it."""

    __slots__ = ("starts", "ranges", "offsets", "tokens")

    def __init__(self, ranges: tuple[Range, ...]):
        self.ranges = ranges
        self.starts = [s for s, _ in ranges]
        self.offsets = []
        n = 0
        for s, e in ranges:
            self.offsets.append(n)
            n += e - s
        self.tokens = n

    def rows(self, a: int, b: int) -> Range:
        """Rows of global ``[a, b)`` (inside one stored range)."""
        k = bisect_right(self.starts, a) - 1
        s = self.ranges[k][0]
        return (self.offsets[k] + a - s, self.offsets[k] + b - s)

    def rows_of(self, ranges: Iterable[Range]) -> tuple[Range, ...]:
        """Rows of every global range (each inside one stored range), merged."""
        return _union(self.rows(a, b) for a, b in ranges)


class WindowIndex:
    """Per layout and window: pieces sorted globally and every piece's reads (see the module docstring)."""

    def __init__(self, layout: PieceLayout, window: int):
        cu, cp, w = layout.cu_seqlens, layout.cp_size, window
        self.cp, self.cu, self.window = cp, cu, w
        items = sorted((s, e, r) for r, ps in enumerate(layout.pieces) for s, e in ps)
        self.starts = [it[0] for it in items]
        self.ends = ends = [it[1] for it in items]
        self.owner = [it[2] for it in items]
        self.of_rank: list[list[int]] = [[] for _ in range(cp)]
        self.local = [0] * len(items)
        off = [0] * cp
        #: reads[i]: (j, start, end) global ranges of earlier pieces that piece i's first part reads
        self.reads: list[list[tuple[int, int, int]]] = []
        #: read_by[j]: (reader rank, start, end) ranges of piece j that other pieces read
        self.read_by: list[list[tuple[int, int, int]]] = [[] for _ in items]
        self.distances_seen: set[int] = set()
        d = 0
        for i, (s, e, r) in enumerate(items):
            self.of_rank[r].append(i)
            self.local[i] = off[r]
            off[r] += e - s
            while cu[d + 1] <= s:
                d += 1
            lo = max(cu[d], s - w + 1)
            mine = []
            if lo < s:
                for j in range(bisect_right(ends, lo), i):  # pieces ending after lo, before this one
                    a = max(self.starts[j], lo)
                    mine.append((j, a, ends[j]))
                    self.read_by[j].append((r, a, ends[j]))
                    if self.owner[j] != r:
                        self.distances_seen.add((r - self.owner[j]) % cp)
            self.reads.append(mine)
        self.sample_len = layout.sample_len
        self.per_sample: dict[int, int] = {}
        for s in self.starts:
            b = s // layout.sample_len
            self.per_sample[b] = self.per_sample.get(b, 0) + 1

    def distances(self) -> tuple[int, ...]:
        """Step distances ``(reader - origin) % cp`` with something to read."""
        return tuple(sorted(self.distances_seen))

    def local_rows(self, ranges: Iterable[Range], pieces_of_owner: list[int]) -> tuple[Range, ...]:
        """Rows, in the owner's local KV, of global ranges inside its pieces, merged."""
        starts = [self.starts[i] for i in pieces_of_owner]
        out = []
        for a, b in ranges:
            i = pieces_of_owner[bisect_right(starts, a) - 1]
            out.append((self.local[i] + a - self.starts[i], self.local[i] + b - self.starts[i]))
        return _union(out)

    def pair_counts(self, x: int) -> tuple[int, int]:
        """(computed, skipped) (q piece, KV piece) pairs of the same sample for rank ``x``."""
        computed = total = 0
        for i in self.of_rank[x]:
            total += self.per_sample[self.starts[i] // self.sample_len]
            computed += 1 + len(self.reads[i])
        return computed, total - computed


def _read_segment(q_off: int, qs: int, qe: int, a: int, b: int, kv_rows: Range, w: int) -> Segment:
    """The dense segment of query part ``[qs, qe)`` (local rows from ``q_off``) reading keys ``[a, b)``."""
    end = min(qe, b + w - 1)  # rows after it see none of these keys
    delta = end - b
    return Segment((q_off, q_off + end - qs), kv_rows, False, (w - 1 - delta, delta))


def build_rank_windowed(layout: PieceLayout, ix: WindowIndex, x: int, comm: str) -> RankPlan:
    """Rank ``x``'s plan under ``ix.window`` (comm ``direct``, ``ring`` or ``plain``)."""
    cp, cu, w = ix.cp, ix.cu, ix.window
    own: list[Segment] = []
    own_reads: list[Segment] = []
    remote: dict[int, list[tuple[Range, int, int, int]]] = {}  # origin -> (q rows of the part, qe, a, b)
    need: dict[int, list[Range]] = {}
    q_off = 0
    for i in ix.of_rank[x]:
        s, e = ix.starts[i], ix.ends[i]
        d = bisect_right(cu, s) - 1
        a, dd = s, d
        while a < e:  # causal blocks under the window, one per document part
            b = min(e, cu[dd + 1])
            rows = (q_off + a - s, q_off + b - s)
            own.append(Segment(rows, rows, True, (w - 1, 0)))
            a, dd = b, dd + 1
        qe = min(e, cu[d + 1])
        for j, ka, kb in ix.reads[i]:
            o = ix.owner[j]
            if o == x:
                kv = (ix.local[j] + ka - ix.starts[j], ix.local[j] + kb - ix.starts[j])
                own_reads.append(_read_segment(q_off, s, qe, ka, kb, kv, w))
            else:
                remote.setdefault(o, []).append((q_off, s, qe, ka, kb))
                need.setdefault(o, []).append((ka, kb))
        q_off += e - s
    theirs: dict[int, list[Range]] = {}
    for i in ix.of_rank[x]:
        for y, ka, kb in ix.read_by[i]:
            if y != x:
                theirs.setdefault(y, []).append((ka, kb))
    mine = ix.of_rank[x]
    steps = [Step(0, x, tuple(own + own_reads))]

    def segments(o: int, buf: _Rows) -> tuple[Segment, ...]:
        return tuple(_read_segment(q0, qs, qe, ka, kb, buf.rows(ka, kb), w) for q0, qs, qe, ka, kb in remote.get(o, ()))

    if comm == "direct":
        for t in ix.distances():
            o, y = (x - t) % cp, (x + t) % cp
            buf = _Rows(_union(need[o])) if o in need else None
            out = ix.local_rows(_union(theirs[y]), mine) if y in theirs else None
            steps.append(
                Step(
                    t,
                    o,
                    segments(o, buf) if buf else (),
                    Transfer(o, ((0, buf.tokens),)) if buf else None,
                    Transfer(y, out) if out else None,
                    False,
                    Transfer(o, ((0, buf.tokens),)) if buf else None,
                    Transfer(y, out) if out else None,
                )
            )
        return RankPlan(x, cp, comm, layout.local_tokens(x), tuple(steps), w)

    # ring / plain: neighbour forwarding; content(o, t) is what arrives at rank o + t at step t
    full = comm == "plain"
    by_distance: dict[int, dict[int, list[Range]]] = {}  # origin -> distance -> ranges read at that distance
    if not full:
        for j, reads in enumerate(ix.read_by):
            o = ix.owner[j]
            for y, ka, kb in reads:
                if y != o:
                    by_distance.setdefault(o, {}).setdefault((y - o) % cp, []).append((ka, kb))
    last = cp - 1 if full else max(ix.distances(), default=0)

    def content(o: int, t: int) -> tuple[Range, ...]:
        if full:
            return tuple(layout.pieces[o])
        return _union(r for dist, ranges in by_distance.get(o, {}).items() if dist >= t for r in ranges)

    prev: _Rows | None = None
    for t in range(1, last + 1):
        o, y = (x - t) % cp, (x + t) % cp
        held = content(o, t)
        buf = _Rows(held) if held else None
        outgoing = content((x + 1 - t) % cp, t)
        if not outgoing:
            send = None
        elif t == 1:
            send = Transfer((x + 1) % cp, ix.local_rows(outgoing, mine))
        else:
            send = Transfer((x + 1) % cp, prev.rows_of(outgoing))
        grad_send = Transfer(o, buf.rows_of(need[o])) if o in need else None
        grad_recv = Transfer(y, ix.local_rows(_union(theirs[y]), mine)) if y in theirs else None
        steps.append(
            Step(
                t,
                o,
                segments(o, buf) if buf else (),
                Transfer((x - 1) % cp, ((0, buf.tokens),)) if buf else None,
                send,
                t > 1,
                grad_send,
                grad_recv,
            )
        )
        prev = buf
    return RankPlan(x, cp, comm, layout.local_tokens(x), tuple(steps), w)

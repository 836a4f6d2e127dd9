"""The planner: from a :class:`~ringattn.layout.DocLayout` to each rank's steps (see :mod:`ringattn.plan`).

A rank's plan is built from what that rank needs only: the KV it reads from every origin
and what the other ranks read of its own KV (for its sends and dK/dV returns). Both come
from a per-layout :class:`_Index` over the layout's pieces, built once per layout in
``O(pieces log pieces)`` and shared by all ranks and comm shapes, so planning one rank costs
about the size of its own reads instead of all ``CP^2`` rank pairs.

Caching: :func:`rank_plan` returns the same :class:`RankPlan` object for a given
``(layout, rank, comm)`` on every call; :func:`build_plan` assembles those objects and the exact
:class:`PlanStats`. Both live in this module's :data:`PLANS` memory, keyed by the layout object's
identity and dropped with it (:class:`ringattn._memo.IdentityMemo`): nothing is written into the
layout, and nothing hashes it, so a repeated call costs a dict lookup, not time proportional to
documents.

Reading rule (pieces of a rank are sorted and disjoint, and together partition the tokens):
rank ``x`` reads a piece ``b`` of another rank, in the document ``d`` holding ``b``'s last
token, iff ``x`` has a piece starting inside ``d`` at or after ``b``'s end; it reads ``b``'s
part inside ``d``. The start of ``x``'s last piece in ``d`` therefore decides everything ``x``
reads of ``d``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .._memo import IdentityMemo
from ..ranges import PieceLayout
from .types import COMM_SHAPES, DEFAULT_COMM, Plan, PlanStats, Range, RankPlan, Segment, Step, Transfer
from .window import WindowIndex, build_rank_windowed, effective_window

__all__ = ["build_plan", "rank_plan", "direct_accounting", "pieces_accounting", "Accounting", "PLANS"]

#: per layout object: its :class:`_Index` and every plan built for it (see the module docstring)
PLANS: IdentityMemo[dict] = IdentityMemo("plans per layout")


def _merged(rows) -> tuple[Range, ...]:
    """Touching or overlapping sorted row ranges merged (input sorted by start)."""
    out: list[list[int]] = []
    for s, e in rows:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


class _Index:
    """Per-layout facts every rank's plan is built from (see the module docstring).

    Global pieces sorted by start (``starts``, ``ends``, ``owner``); per piece: the document of
    its first token (``dfirst``), the start of its part in the document of its last token
    (``cstart``: what another rank may read of it), its row in its owner's local order
    (``local``), the first piece index whose KV its queries may read (``lo``: pieces
    ``lo .. i-1``); per document: readers (rank -> start of its last piece starting in it).
    """

    def __init__(self, layout: PieceLayout):
        cu = layout.cu_seqlens
        cp = layout.cp_size
        self.cp, self.cu = cp, cu
        items = sorted((s, e, r) for r, ps in enumerate(layout.pieces) for s, e in ps)
        n = len(items)
        self.starts = starts = [it[0] for it in items]
        self.ends = ends = [it[1] for it in items]
        self.owner = [it[2] for it in items]
        of_rank: list[list[int]] = [[] for _ in range(cp)]
        local = [0] * n
        dfirst = [0] * n
        dlast = [0] * n
        cstart = [0] * n
        lo = list(range(n))
        off = [0] * cp
        readers: dict[int, dict[int, int]] = {}  # doc -> {rank: start of its last piece starting in it}
        first_end: dict[int, dict[int, int]] = {}  # doc -> {rank: end of its first piece ending in it}
        d = dl = 0
        lo_doc, lo_d = -1, 0
        for i in range(n):
            s, e, r = items[i]
            of_rank[r].append(i)
            local[i] = off[r]
            off[r] += e - s
            while cu[d + 1] <= s:
                d += 1
            if dl < d:
                dl = d
            while cu[dl + 1] < e:
                dl += 1
            dfirst[i], dlast[i] = d, dl
            ds = cu[d]
            cstart[i] = s if s > cu[dl] else cu[dl]
            if s > ds:
                if lo_doc != d:
                    lo_doc, lo_d = d, bisect_right(ends, ds, 0, i)
                lo[i] = lo_d
                readers.setdefault(d, {})[r] = s
            first_end.setdefault(dl, {}).setdefault(r, e)
        self.of_rank, self.local, self.dfirst, self.dlast, self.cstart, self.lo = (
            of_rank,
            local,
            dfirst,
            dlast,
            cstart,
            lo,
        )
        self.readers = readers
        self.first_end = first_end
        # pieces per sample (pair counts of PlanStats)
        self.sample_len = layout.sample_len
        self.per_sample: dict[int, int] = {}
        for s in starts:
            b = s // layout.sample_len
            self.per_sample[b] = self.per_sample.get(b, 0) + 1
        self._reader_lists: dict[int, tuple[list[int], list[int]]] = {}
        self._distances: tuple[int, ...] | None = None
        self._maxdist: list[int] | None = None

    # ------------------------------------------------------------------ who reads what
    def reader_list(self, d: int) -> tuple[list[int], list[int]]:
        """Readers of document ``d`` sorted by their last start, descending: (negated starts, ranks)."""
        got = self._reader_lists.get(d)
        if got is None:
            pairs = sorted(((-s, r) for r, s in self.readers.get(d, {}).items()))
            got = ([p[0] for p in pairs], [p[1] for p in pairs])
            self._reader_lists[d] = got
        return got

    def readers_of(self, i: int) -> list[int]:
        """Ranks other than its owner that read piece ``i``."""
        neg, ranks = self.reader_list(self.dlast[i])
        k = bisect_right(neg, -self.ends[i])  # readers whose last start >= ends[i]
        o = self.owner[i]
        return [r for r in ranks[:k] if r != o]

    def distances(self) -> tuple[int, ...]:
        """Step distances ``(reader - origin) % cp`` with something to read (comm ``direct``)."""
        if self._distances is None:
            cp, full = self.cp, (1 << self.cp) - 1
            mask = 0
            for d, readers in self.readers.items():
                owners = self.first_end[d]  # owners of readable parts, with their smallest end
                order = sorted((e, o) for o, e in owners.items())
                ends_sorted = [e for e, _ in order]
                cum = [0]
                for _, o in order:  # bit (-o) % cp: rotating left by y puts it at (y - o) % cp
                    cum.append(cum[-1] | (1 << ((-o) % cp)))
                for y, last_start in readers.items():
                    m = cum[bisect_right(ends_sorted, last_start)] & ~(1 << ((-y) % cp))
                    if m:
                        mask |= ((m << y) | (m >> (cp - y))) & full if y else m
            self._distances = tuple(t for t in range(1, cp) if mask >> t & 1)
        return self._distances

    def maxdist(self) -> list[int]:
        """Per piece: the largest distance ``(reader - owner) % cp`` of a rank reading it (0: none)."""
        if self._maxdist is None:
            cp = self.cp
            out = [0] * len(self.starts)
            for i in range(len(self.starts)):
                o = self.owner[i]
                best = 0
                for y in self.readers_of(i):
                    t = (y - o) % cp
                    if t > best:
                        best = t
                out[i] = best
            self._maxdist = out
        return self._maxdist

    # ------------------------------------------------------------------ one rank
    def reads(self, x: int):
        """Rank ``x``'s block pairs.

        Returns ``(own, remote, need)``: ``own`` the step-0 segments; ``remote[o]`` a list of
        ``(q rows, first piece, last piece)`` (the pieces of ``o`` that q range reads, in
        order); ``need[o]`` the sorted pieces of ``o`` that ``x`` reads.
        """
        cu, starts, ends, owner, lo = self.cu, self.starts, self.ends, self.owner, self.lo
        own: list[Segment] = []
        remote: dict[int, list] = {}
        need: dict[int, list[int]] = {}
        q_off = 0
        cur_doc, k = -1, 0
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for i in self.of_rank[x]:
            s, e = starts[i], ends[i]
            d = self.dfirst[i]
            # causal blocks: the piece cut at document boundaries
            a, dd = s, d
            while a < e:
                b = min(e, cu[dd + 1])
                own.append(Segment((q_off + a - s, q_off + b - s), (q_off + a - s, q_off + b - s), True))
                a, dd = b, dd + 1
            if lo[i] < i:
                if d != cur_doc:
                    cur_doc, k = d, lo[i]
                    first, last = {}, {}
                while k < i:
                    o = owner[k]
                    if o not in first:
                        first[o] = k
                    last[o] = k
                    if o != x:
                        need.setdefault(o, []).append(k)
                    k += 1
                q = (q_off, q_off + min(e, cu[d + 1]) - s)
                for o, f in first.items():
                    if o == x:
                        own.append(
                            Segment(
                                q,
                                (
                                    self.local[f] + self.cstart[f] - starts[f],
                                    self.local[last[o]] + ends[last[o]] - starts[last[o]],
                                ),
                                False,
                            )
                        )
                    else:
                        remote.setdefault(o, []).append((q, f, last[o]))
            q_off += e - s
        return own, remote, need

    def read_by_others(self, x: int) -> dict[int, list[int]]:
        """``theirs[y]``: the sorted pieces of ``x`` that rank ``y`` reads."""
        theirs: dict[int, list[int]] = {}
        for i in self.of_rank[x]:
            for y in self.readers_of(i):
                theirs.setdefault(y, []).append(i)
        return theirs

    def local_rows(self, pieces: list[int]) -> tuple[Range, ...]:
        """Rows, in the owner's local KV, of the readable parts of ``pieces`` (merged)."""
        return _merged(
            [
                (self.local[i] + self.cstart[i] - self.starts[i], self.local[i] + self.ends[i] - self.starts[i])
                for i in pieces
            ]
        )


@dataclass(frozen=True)
class Accounting:
    """Per-rank counts of the ``direct`` plan (what :class:`PlanStats` reports for it): work
    (unmasked score entries), KV tokens received (= dK/dV rows returned) and sent (= dK/dV
    rows arriving), the number of exchange steps, and block pairs given to the kernel."""

    work: tuple[int, ...]
    kv_recv: tuple[int, ...]
    kv_send: tuple[int, ...]
    steps: int
    segments: tuple[int, ...]


def direct_accounting(layout: PieceLayout) -> Accounting:
    """Exact counts of ``build_plan(layout, "direct").stats``, computed from the pieces alone
    (vectorised, ``O(pieces log pieces)``) instead of building any step."""
    return pieces_accounting(layout.cu_seqlens, layout.cp_size, layout.pieces, layout.sample_len)


def pieces_accounting(
    cu_seqlens: Sequence[int], cp: int, pieces: Sequence[Iterable[Range]], sample_len: int | None = None
) -> Accounting:
    """:func:`direct_accounting` of ``pieces`` (per rank, in any order). Touching pieces of a rank
    count as one, as a layout holds them, except across sample boundaries (``sample_len``;
    default: none merged across any boundary of ``cu_seqlens``' samples is assumed).

    numpy, not torch: these are a few dozen small integer ops, and torch's intra-op thread
    pool costs more in wake-ups on a busy host than the ops themselves.
    """
    flat = sorted((s, e, r) for r, ps in enumerate(pieces) for s, e in ps)
    t = np.array(flat, dtype=np.int64).reshape(-1, 3)
    starts, ends, owner = t[:, 0], t[:, 1], t[:, 2]
    if sample_len is not None and starts.size > 1:  # merge touching pieces of one rank within a sample
        cont = (owner[1:] == owner[:-1]) & (starts[1:] == ends[:-1]) & (starts[1:] % sample_len != 0)
        if cont.any():
            keep = np.concatenate(([True], ~cont))
            last = np.concatenate((keep[1:], [True]))
            starts, ends, owner = starts[keep], ends[last], owner[keep]
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    big = int(cu[-1]) + 2  # > any token position: (doc, value) pairs encode as doc * big + value
    lens = cu[1:] - cu[:-1]
    prefix = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens * (lens + 1) // 2, out=prefix[1:])
    df = np.searchsorted(cu, starts, "right") - 1  # document of a piece's first token
    dl = np.searchsorted(cu, ends - 1, "right") - 1  # ... and of its last token
    a, b = starts - cu[df], ends - cu[dl]
    work = np.zeros(cp, dtype=np.int64)
    np.add.at(work, owner, prefix[dl] + b * (b + 1) // 2 - prefix[df] - a * (a + 1) // 2)
    cstart = np.maximum(starts, cu[dl])  # what another rank may read of a piece starts here
    segments = np.zeros(cp, dtype=np.int64)
    np.add.at(segments, owner, dl - df + 1)  # causal blocks: one per document part
    # readers: a piece starting after its document's first token reads the document before it;
    # a rank's last such start in a document decides all it reads there
    reads = starts > cu[df]
    if not reads.any():
        return Accounting(tuple(work.tolist()), (0,) * cp, (0,) * cp, 0, tuple(segments.tolist()))
    rkey = df[reads] * cp + owner[reads]
    rcell, last_idx = np.unique(rkey[::-1], return_index=True)  # last occurrence = largest start
    last_start = starts[reads][::-1][last_idx]
    r_doc, r_rank = rcell // cp, rcell % cp
    # readable parts (pieces ending inside a read document): owners' first ends, own tokens before
    ckey = dl * cp + owner
    pos = np.searchsorted(rcell, ckey)
    pos_c = np.minimum(pos, rcell.size - 1)
    mine = rcell[pos_c] == ckey  # the piece's owner reads the piece's document
    own_ls = np.where(mine, last_start[pos_c], -1)
    before = ends <= own_ls
    own_before = np.zeros(rcell.size, dtype=np.int64)
    np.add.at(own_before, pos_c[before], (ends - cstart)[before])
    recv = np.zeros(cp, dtype=np.int64)
    np.add.at(recv, r_rank, last_start - cu[r_doc] - own_before)
    # sends: a readable part goes to every other rank whose last start is at or after its end
    ls_flat = np.sort(r_doc * big + last_start)
    count = (
        np.searchsorted(ls_flat, (dl + 1) * big, "left")
        - np.searchsorted(ls_flat, dl * big + ends, "left")
        - (own_ls >= ends)
    )
    send = np.zeros(cp, dtype=np.int64)
    np.add.at(send, owner, count * (ends - cstart))
    # one block per (reading piece, rank holding earlier KV of its document), itself included:
    # the ranks whose first readable part in the document ends at or before the piece's start
    fkey = dl * cp + owner
    fcell, first_idx = np.unique(fkey, return_index=True)  # first occurrence = smallest end
    f_doc, f_rank, first_end = fcell // cp, fcell % cp, ends[first_idx]
    forder = np.argsort(f_doc * big + first_end, kind="stable")
    fe_flat = f_doc[forder] * big + first_end[forder]
    qd, qs = df[reads], starts[reads]
    held = np.searchsorted(fe_flat, qd * big + qs, "right") - np.searchsorted(fe_flat, qd * big, "left")
    np.add.at(segments, owner[reads], held)
    # steps: distances (reader - origin) % cp at which some reader reads some origin's part
    # (a reader reads every rank whose first readable part ends at or before its last start)
    fe_rank = f_rank[forder]
    lo = np.searchsorted(fe_flat, r_doc * big, "left")
    n_read = np.searchsorted(fe_flat, r_doc * big + last_start, "right") - lo
    idx = np.arange(int(n_read.sum())) - np.repeat(np.cumsum(n_read) - n_read - lo, n_read)
    dist_mask = np.zeros(cp, dtype=bool)
    dist_mask[(np.repeat(r_rank, n_read) - fe_rank[idx]) % cp] = True
    dist_mask[0] = False
    return Accounting(
        tuple(work.tolist()), tuple(recv.tolist()), tuple(send.tolist()), int(dist_mask.sum()), tuple(segments.tolist())
    )


def _layout_cache(layout: PieceLayout) -> dict:
    return PLANS.get(layout, dict)


def _index(layout: PieceLayout) -> _Index:
    cache = _layout_cache(layout)
    ix = cache.get("index")
    if ix is None:
        ix = cache["index"] = _Index(layout)
    return ix


class _Buffer:
    """A receive buffer: some pieces of one origin, in order; ``row[i]`` is where the readable
    part of piece ``i`` starts (``full``: whole pieces are stored, as the plain ring sends them)."""

    __slots__ = ("row", "tokens")

    def __init__(self, ix: _Index, pieces, full: bool = False):
        self.row: dict[int, int] = {}
        n = 0
        for i in pieces:
            s = ix.starts[i] if full else ix.cstart[i]
            self.row[i] = n + ix.cstart[i] - s
            n += ix.ends[i] - s
        self.tokens = n

    def span(self, ix: _Index, f: int, l: int) -> Range:
        """Rows from the readable part of piece ``f`` to the end of piece ``l``."""
        return (self.row[f], self.row[l] + ix.ends[l] - ix.cstart[l])

    def rows(self, ix: _Index, pieces, full: bool = False) -> tuple[Range, ...]:
        """Rows of the readable parts (``full``: the whole pieces) of ``pieces`` (merged)."""
        if full:
            return _merged(
                [(self.row[i] - ix.cstart[i] + ix.starts[i], self.row[i] + ix.ends[i] - ix.cstart[i]) for i in pieces]
            )
        return _merged([(self.row[i], self.row[i] + ix.ends[i] - ix.cstart[i]) for i in pieces])


def _build_rank(layout: PieceLayout, ix: _Index, x: int, comm: str) -> RankPlan:
    cp = ix.cp
    own, remote, need = ix.reads(x)
    theirs = ix.read_by_others(x)
    steps = [Step(0, x, tuple(own))]
    local_n = layout.local_tokens(x)

    if comm == "direct":
        for t in ix.distances():
            o, y = (x - t) % cp, (x + t) % cp
            mine = need.get(o)
            buf = _Buffer(ix, mine) if mine else None
            segs = tuple(Segment(q, buf.span(ix, f, l), False) for q, f, l in remote.get(o, ())) if buf else ()
            recv = Transfer(o, ((0, buf.tokens),)) if buf else None
            out = theirs.get(y)
            rows_out = ix.local_rows(out) if out else None
            send = Transfer(y, rows_out) if out else None
            grad_send = Transfer(o, buf.rows(ix, mine)) if buf else None
            grad_recv = Transfer(y, rows_out) if out else None
            steps.append(Step(t, o, segs, recv, send, False, grad_send, grad_recv))
        return RankPlan(x, cp, comm, local_n, tuple(steps))

    # ring / plain: neighbour forwarding; buffer (o, t) is what arrives at rank o + t at step t
    full = comm == "plain"
    if full:
        last = cp - 1

        def content(o: int, t: int) -> list[int]:
            return ix.of_rank[o]
    else:
        maxdist = ix.maxdist()
        last = max(maxdist, default=0)

        def content(o: int, t: int) -> list[int]:
            return [i for i in ix.of_rank[o] if maxdist[i] >= t]

    prev: _Buffer | None = None  # the buffer received at the previous step (origin x + 1 - t)
    for t in range(1, last + 1):
        o, y = (x - t) % cp, (x + t) % cp
        pieces_in = content(o, t)
        buf = _Buffer(ix, pieces_in, full) if pieces_in else None
        segs = tuple(Segment(q, buf.span(ix, f, l), False) for q, f, l in remote.get(o, ())) if buf else ()
        recv = Transfer((x - 1) % cp, ((0, buf.tokens),)) if buf else None
        out = content((x + 1 - t) % cp, t)
        if not out:
            send = None
        elif t == 1:  # from the local KV
            send = Transfer(
                (x + 1) % cp,
                _merged(
                    [
                        (
                            ix.local[i] + (0 if full else ix.cstart[i] - ix.starts[i]),
                            ix.local[i] + ix.ends[i] - ix.starts[i],
                        )
                        for i in out
                    ]
                ),
            )
        else:  # forwarded from the previous step's buffer
            send = Transfer((x + 1) % cp, prev.rows(ix, out, full))
        mine = need.get(o)
        grad_send = Transfer(o, buf.rows(ix, mine)) if mine else None
        read = theirs.get(y)
        grad_recv = Transfer(y, ix.local_rows(read)) if read else None
        steps.append(Step(t, o, segs, recv, send, t > 1, grad_send, grad_recv))
        prev = buf
    return RankPlan(x, cp, comm, local_n, tuple(steps))


def _window_index(layout: PieceLayout, window: int) -> WindowIndex:
    cache = _layout_cache(layout)
    ix = cache.get(("window index", window))
    if ix is None:
        ix = cache[("window index", window)] = WindowIndex(layout, window)
    return ix


def rank_plan(layout: PieceLayout, rank: int, comm: str = DEFAULT_COMM, window: int | None = None) -> RankPlan:
    """The plan of one CP rank, built from what that rank needs and kept for the layout object
    (:data:`PLANS`); for a hybrid layout, the ring plan of its ring rank (kept for ``layout.ring_layout``).

    The same :class:`RankPlan` object comes back for a given ``(layout, rank, comm, window)``. ``window``:
    a sliding window of that many keys (see :mod:`ringattn.plan.window`); one at least as long as the
    longest document masks nothing and gives the plan without a window.
    """
    if layout.ulysses_size > 1:
        ring_rank, _ = layout.split(rank)
        return rank_plan(layout.ring_layout, ring_rank, comm, window)
    cache = _layout_cache(layout)
    key = (rank, comm) if window is None else (rank, comm, window)
    rp = cache.get(key)
    if rp is None:
        if comm not in COMM_SHAPES:
            raise ValueError(f"comm: expected one of {COMM_SHAPES}, got {comm!r}")
        if not 0 <= rank < layout.cp_size:
            raise ValueError(
                f"rank: expected 0 <= rank < cp_size={layout.cp_size}, got {rank}; pass this process's "
                "rank in the CP group (dist.get_rank(cp_group))"
            )
        w = effective_window(layout, window)
        if w is None and window is not None:
            rp = rank_plan(layout, rank, comm)
        elif w is None:
            rp = _build_rank(layout, _index(layout), rank, comm)
        else:
            rp = build_rank_windowed(layout, _window_index(layout, w), rank, comm)
        cache[key] = rp
    return rp


def _pair_counts(ix: _Index, x: int) -> tuple[int, int]:
    """(computed, skipped) (q piece, KV piece) pairs of the same sample for rank ``x``."""
    computed = total = 0
    for i in ix.of_rank[x]:
        total += ix.per_sample[ix.starts[i] // ix.sample_len]
        computed += 1 + (i - ix.lo[i])
    return computed, total - computed


def build_plan(layout: PieceLayout, comm: str = DEFAULT_COMM, window: int | None = None) -> Plan:
    """Every rank's plan for comm shape ``comm`` (and sliding ``window``) with the exact :class:`PlanStats`
    (kept for the layout object).

    Training needs only :func:`rank_plan`; this is for statistics, the inspector and benchmarks.
    A hybrid layout (``ulysses_size > 1``) is planned over its ring ranks (``layout.ring_layout``).
    """
    if layout.ulysses_size > 1:
        return build_plan(layout.ring_layout, comm, window)
    if comm not in COMM_SHAPES:
        raise ValueError(f"comm: expected one of {COMM_SHAPES}, got {comm!r}")
    cache = _layout_cache(layout)
    plan = cache.get(("plan", comm, window))
    if plan is not None:
        return plan
    w = effective_window(layout, window)
    if w is None and window is not None:
        plan = cache[("plan", comm, window)] = build_plan(layout, comm)
        return plan
    rank_plans = tuple(rank_plan(layout, x, comm, w) for x in range(layout.cp_size))
    if w is None:
        ix = _index(layout)
        pairs = [_pair_counts(ix, x) for x in range(layout.cp_size)]
    else:
        wx = _window_index(layout, w)
        pairs = [wx.pair_counts(x) for x in range(layout.cp_size)]
    stats = PlanStats(
        comm=comm,
        cp_size=layout.cp_size,
        tokens=tuple(rp.local_tokens for rp in rank_plans),
        work=tuple(rp.work for rp in rank_plans),
        pairs_computed=tuple(p[0] for p in pairs),
        pairs_skipped=tuple(p[1] for p in pairs),
        kv_recv_tokens=tuple(rp.kv_recv_tokens for rp in rank_plans),
        kv_send_tokens=tuple(rp.kv_send_tokens for rp in rank_plans),
        step_distances=tuple(s.distance for s in rank_plans[0].steps),
        kv_recv_per_step=tuple(tuple(s.recv.tokens if s.recv else 0 for s in rp.steps) for rp in rank_plans),
        kv_send_per_step=tuple(tuple(s.send.tokens if s.send else 0 for s in rp.steps) for rp in rank_plans),
        grad_send_tokens=tuple(rp.grad_send_tokens for rp in rank_plans),
        grad_recv_tokens=tuple(rp.grad_recv_tokens for rp in rank_plans),
        segments=tuple(rp.num_segments for rp in rank_plans),
        window=w,
    )
    plan = cache[("plan", comm, window)] = Plan(comm, rank_plans, stats)
    return plan

"""``auto``: the layout with the least predicted step time under a cost model.

The solver builds a small, fixed portfolio of candidate layouts that all hold equal tokens per
rank per sample (so Megatron's ``[s/CP, b]`` shapes hold), prices each one exactly with the
cost model (:class:`ringattn.cost.CostModel`) on the counts of its ``direct`` plan, and keeps
the cheapest (the earlier candidate on ties). Candidates, in order:

* ``zigzag`` — Megatron's order (2 chunks per rank and sample);
* ``balanced(k)`` — equal chunks dealt by work, ``k`` = 1, 2, 4, 8, 16 chunks per rank and
  sample (``k`` above the balanced strategy's default of 4 only for chunks of at least
  ``min_chunk`` tokens, see below);
* ``packed(split)`` — document-aware packing: every document that fits a rank's share of its
  sample and is light enough stays whole on one rank (it then exchanges nothing); a document
  that is too long or too heavy is cut into ``2m`` equal chunks paired head with tail
  (chunk ``i`` with chunk ``2m-1-i``, equal work per pair, as zigzag pairs a sample's chunks;
  one-token chunks and a lone middle chunk where a rank's share is smaller than the document
  allows), over as few pairs ``m`` as fitting and balance need: "too heavy" means more than
  ``split`` times the mean work per rank (``split`` = none, 1, 1/4, 1/16), and chunks stay at
  least ``min_chunk`` tokens unless fitting needs smaller ones. The units (whole documents
  and pairs) are placed heaviest first on the rank with the least predicted time (compute and
  estimated exchange) that has room left in that sample; a unit that fits nowhere goes where
  most room is left, and overfull ranks then hand the first tokens of a document (the
  cheapest to move: least work, and only that prefix is read back) to ranks with room.

Exact pricing is cheap (:func:`ringattn.plan.pieces_accounting`, vectorised),
and candidates are priced in order of their compute lower bound (busiest rank's compute), so
a candidate that cannot beat the best found is never priced. Everything is integer
arithmetic or floating point in a fixed order: every rank derives the same layout.

``min_chunk`` (512 tokens, or half a rank's share of a sample when that is smaller) keeps
chunks large enough for block kernels to run efficiently: the cost model does not price
per-segment overheads, so the portfolio never cuts finer than that unless a document must be
split to fit a rank at all.

The full-attention work is what is priced (a sliding window, which the planner can also take, is
not part of the choice).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from ..cost import CostModel, default_cost_model
from ..plan import pieces_accounting
from ..ranges import Range, merge_adjacent, pieces_work, work_prefix
from .balanced import DEFAULT_CHUNKS_PER_RANK, balanced_assignment
from .base import Assignment, Rule, chunk_rule
from .zigzag import zigzag_pieces

__all__ = ["Auto", "MIN_CHUNK", "SPLITS", "BALANCED_CHUNKS", "auto_assignment", "candidates", "merged_pieces"]

MIN_CHUNK = 512
#: ``packed`` candidates: a document heavier than ``split`` x the mean work per rank is split into pairs
SPLITS = (None, 1.0, 0.25, 0.0625)
#: ``balanced`` candidates: chunks per rank and sample
BALANCED_CHUNKS = (1, 2, 4, 8, 16)


class Unit(NamedTuple):
    """What the packer places on one rank: a whole document, a head/tail pair or a lone middle chunk.

    ``neg_work``: minus its work (units are placed heaviest first, ties by ``start``); ``sample``: the
    sample holding it; ``ranges``: its token ranges; ``read_tokens`` / ``sent_tokens``: estimates of the
    KV tokens its rank will receive / send for it; ``tokens``: its size.
    """

    neg_work: int
    start: int
    sample: int
    ranges: list[Range]
    read_tokens: int
    sent_tokens: int
    tokens: int


class Packer:
    """The ``packed`` construction (see the module docstring) for one ``split``."""

    def __init__(
        self,
        cu: Sequence[int],
        prefix: Sequence[int],
        num_samples: int,
        sample_len: int,
        ring: int,
        cost: CostModel,
        min_chunk: int,
    ):
        self.cu, self.prefix = cu, prefix
        self.num_samples, self.sample_len, self.ring = num_samples, sample_len, ring
        self.share = sample_len // ring  # tokens of a sample each rank holds
        self.min_chunk = min_chunk
        self.seconds_per_entry = cost.seconds_per_entry
        self.kv_bytes = cost.kv_bytes_per_token
        self.grad_bytes = cost.grad_bytes_per_token
        self.bandwidth = cost.profile.p2p_bandwidth

    def pairs_per_doc(self, split: float | None) -> list[int]:
        """``m`` per document: 1 keeps it whole, ``m > 1`` cuts it into ``m`` head/tail pairs."""
        cu, share = self.cu, self.share
        mean = self.prefix[-1] / self.ring
        out = []
        for d in range(len(cu) - 1):
            n = cu[d + 1] - cu[d]
            w = n * (n + 1) // 2
            fit = -(-n // share)
            m = fit
            if split is not None and w > split * mean:
                m = max(m, math.ceil(w / (split * mean)))
            m = max(min(m, n // (2 * self.min_chunk)), fit)
            out.append(m)
        return out

    @staticmethod
    def _work(a: int, s: int, e: int) -> int:
        """Work of ``[s, e)`` inside the document starting at ``a``."""
        x, y = s - a, e - a
        return (y * (y + 1) - x * (x + 1)) // 2

    def units(self, pairs: list[int]) -> list[Unit]:
        """The units of every document, heaviest first (ties: earliest start)."""
        out = []
        for d, m in enumerate(pairs):
            a, e = self.cu[d], self.cu[d + 1]
            b = a // self.sample_len
            if m == 1:
                out.append(Unit(-self._work(a, a, e), a, b, [(a, e)], 0, 0, e - a))
                continue
            n = e - a
            k = min(2 * m, n)  # chunks (one token each where a rank's share is tiny)
            cuts = [a + n * j // k for j in range(k + 1)]
            for p in range(k // 2):
                h0, h1, t0, t1 = cuts[p], cuts[p + 1], cuts[k - 1 - p], cuts[k - p]
                w = self._work(a, h0, h1) + self._work(a, t0, t1)
                ranges = [(h0, h1), (t0, t1)] if h1 < t0 else [(h0, t1)]
                out.append(
                    Unit(
                        -w,
                        h0,
                        b,
                        ranges,
                        t0 - a - (h1 - h0),
                        (h1 - h0) * (k // 2 - 1) + (t1 - t0) * p,
                        h1 - h0 + t1 - t0,
                    )
                )
            if k % 2:  # the middle chunk on its own
                c0, c1 = cuts[k // 2], cuts[k // 2 + 1]
                out.append(Unit(-self._work(a, c0, c1), c0, b, [(c0, c1)], c0 - a, (c1 - c0) * (k // 2), c1 - c0))
        out.sort(key=lambda u: (u.neg_work, u.start))
        return out

    def build(self, pairs: list[int]) -> tuple[list[list[Range]], list[int]]:
        """``(pieces per rank (unsorted, touching ones not merged), work per rank)``."""
        ring, share = self.ring, self.share
        spe, kvb, gb, bw = self.seconds_per_entry, self.kv_bytes, self.grad_bytes, self.bandwidth
        work = [0] * ring
        compute = [0.0] * ring
        reads = [0] * ring  # estimated KV tokens received
        sends = [0] * ring  # ... and sent
        room = [[share] * ring for _ in range(self.num_samples)]
        held: list[list[list[list[int]]]] = [[[] for _ in range(ring)] for _ in range(self.num_samples)]
        version = [0] * ring
        heap = [(0.0, r, 0) for r in range(ring)]  # (predicted time, rank, version)

        def time_of(r: int) -> float:
            return max(compute[r], max(2 * reads[r] * kvb + sends[r] * gb, 2 * sends[r] * kvb + reads[r] * gb) / bw)

        for unit in self.units(pairs):
            rooms = room[unit.sample]
            stash = []
            chosen = -1
            while heap:
                t, r, v = heapq.heappop(heap)
                if v != version[r]:
                    continue
                if rooms[r] >= unit.tokens:
                    chosen = r
                    break
                stash.append((t, r, v))
            if chosen < 0:  # fits nowhere: where most room is left (then the least time, the lowest rank)
                chosen = max(range(ring), key=lambda x: (rooms[x], -time_of(x), -x))
                stash = [e for e in stash if e[1] != chosen]
            for entry in stash:
                heapq.heappush(heap, entry)
            r = chosen
            work[r] -= unit.neg_work
            compute[r] = work[r] * spe
            reads[r] += unit.read_tokens
            sends[r] += unit.sent_tokens
            rooms[r] -= unit.tokens
            held[unit.sample][r].append([list(x) for x in unit.ranges])
            version[r] += 1
            heapq.heappush(heap, (time_of(r), r, version[r]))

        # overfull ranks hand document prefixes to ranks with room (same sample): to the ranks with
        # room in order of their predicted time, from the unit whose first range starts earliest in
        # its document (the prefix moved carries the least work and is all the donor reads back)
        for b in range(self.num_samples):
            rooms = room[b]
            over = [r for r in range(ring) if rooms[r] < 0]
            if not over:
                continue
            under = sorted((x for x in range(ring) if rooms[x] > 0), key=lambda x: (time_of(x), x))
            k = 0
            for r in over:
                us = held[b][r]
                while rooms[r] < 0:
                    j = min(range(len(us)), key=lambda i: (us[i][0][0] - self._doc_start(us[i][0][0]), us[i][0][0]))
                    first = us[j][0]
                    dst = under[k]
                    delta = min(-rooms[r], rooms[dst], first[1] - first[0])
                    moved = self._work(self._doc_start(first[0]), first[0], first[0] + delta)
                    work[r] -= moved
                    work[dst] += moved
                    compute[r], compute[dst] = work[r] * spe, work[dst] * spe
                    held[b][dst].append([[first[0], first[0] + delta]])
                    first[0] += delta
                    if first[0] == first[1]:
                        us[j].pop(0)
                        if not us[j]:
                            us.pop(j)
                    rooms[r] += delta
                    rooms[dst] -= delta
                    if rooms[dst] == 0:
                        k += 1
        pieces = [[(s, e) for b in range(self.num_samples) for u in held[b][r] for s, e in u] for r in range(ring)]
        return pieces, work

    def _doc_start(self, t: int) -> int:
        return self.cu[bisect.bisect_right(self.cu, t) - 1]


def merged_pieces(pieces, sample_len: int) -> tuple[tuple[Range, ...], ...]:
    """Per rank: sorted, touching pieces merged within a sample (as a ``DocLayout`` holds them)."""
    return tuple(merge_adjacent(p, sample_len) for p in pieces)


def candidates(
    cu: Sequence[int], ring: int, sample_len: int, cost: CostModel, min_chunk: int = MIN_CHUNK
) -> Iterator[tuple[str, Sequence, list[int]]]:
    """Yield ``(name, pieces, work per rank)`` of the portfolio, in order (see the module docstring);
    a rank's pieces may be unsorted and touching ones unmerged (``merged_pieces`` fixes both)."""
    num_samples = cu[-1] // sample_len
    share = sample_len // ring
    floor = max(1, min(min_chunk, share // 2))
    prefix = work_prefix(cu)
    zz = zigzag_pieces(num_samples, sample_len, ring)
    yield "zigzag", zz, [pieces_work(cu, prefix, p) for p in zz]  # pieces below: sorted and merged by the caller
    for k in BALANCED_CHUNKS:
        if sample_len % (k * ring) == 0 and (k <= DEFAULT_CHUNKS_PER_RANK or sample_len // (k * ring) >= floor):
            held, load = balanced_assignment(cu, num_samples, sample_len, ring, k, prefix)
            yield f"balanced({k})", held, load
    packer = Packer(cu, prefix, num_samples, sample_len, ring, cost, floor)
    seen = []
    for split in SPLITS:
        pairs = packer.pairs_per_doc(split)
        if pairs in seen:  # same cuts as a finer-grained candidate already built: same layout
            continue
        seen.append(pairs)
        yield (f"packed({'none' if split is None else split})",) + packer.build(pairs)


def auto_assignment(
    cu: Sequence[int], ring: int, sample_len: int, cost: CostModel, ulysses_size: int = 1
) -> Assignment:
    """The candidate with the least predicted step time (``direct`` plan) for ``ring`` ring ranks, and its name.

    With ``ulysses_size = U > 1`` the ``ring`` ranks are the ring ranks of a ``U x ring`` hybrid
    layout and candidates are priced with :meth:`ringattn.cost.CostModel.ring_model`: ``Hq/U``
    query heads, the KV heads each Ulysses rank carries, the ring's link. The all-to-alls are
    left out: every CP rank holds the same number of tokens, so they cost every candidate the
    same and the order of the full model's step times (:meth:`CostModel.predict`) is this one
    (on a two-level profile: when the node size and ``U`` divide one another, so that every ring
    rank's Ulysses group has the same peers on other nodes).
    """
    cost = cost.ring_model(ulysses_size, ring * ulysses_size)
    spe = cost.seconds_per_entry
    scored = [
        (max(work) * spe, order, name, pieces)
        for order, (name, pieces, work) in enumerate(candidates(cu, ring, sample_len, cost))
    ]
    scored.sort(key=lambda c: (c[0], c[1]))
    best = None
    for bound, order, name, pieces in scored:  # the busiest rank's compute bounds a candidate's step time
        if best is not None and bound > best[0]:
            break
        acc = pieces_accounting(cu, ring, pieces, sample_len)
        step = max(
            cost.rank_seconds(
                acc.work[r], acc.kv_recv[r], acc.kv_send[r], acc.kv_send[r], acc.kv_recv[r], acc.steps, acc.segments[r]
            )[2]
            for r in range(ring)
        )
        if best is None or (step, order) < (best[0], best[1]):
            best = (step, order, name, pieces)
    return Assignment(merged_pieces(best[3], sample_len), best[2])


@dataclass(frozen=True)
class Auto:
    """The least predicted step time under ``cost`` (default: :func:`ringattn.cost.default_cost_model`
    for the Ulysses size: 400 TFLOP/s, 450 GB/s, Hq=32, Hkv=8, D=128, bf16); the layout's
    ``auto_choice`` names the winning candidate. With ``ulysses_size > 1`` the ring ranks' pieces are
    priced with the model's head split (``ValueError`` if its heads cannot split over the Ulysses ranks).
    """

    cost: CostModel | None = None
    name: ClassVar[str] = "auto"

    def __post_init__(self) -> None:
        if self.cost is not None and not isinstance(self.cost, CostModel):
            raise ValueError(
                f"cost: expected a ringattn.cost.CostModel, got {type(self.cost).__name__}; pass "
                "CostModel(profile, num_heads, num_kv_heads, head_dim, dtype) or None for the default"
            )

    def rules(self, ring_size: int, ring_name: str) -> list[Rule]:
        return [chunk_rule(ring_size, ring_name)]  # its candidates need no more than zigzag's chunks

    def assign(self, cu_seqlens: Sequence[int], sample_len: int, ring_size: int, ulysses_size: int) -> Assignment:
        cost = self.cost if self.cost is not None else default_cost_model(ulysses_size)
        return auto_assignment(cu_seqlens, ring_size, sample_len, cost, ulysses_size)

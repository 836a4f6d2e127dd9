"""``balanced``: document-aware equal chunks dealt by attention work.

Every sample is cut into ``chunks_per_rank * R`` equal chunks, weighed by their attention work
(unmasked score entries of their queries), and dealt out so that every rank holds ``chunks_per_rank``
chunks of every sample (equal token counts) and about the same work: heaviest chunk first, to the rank
with the least work so far that still has room (ties to the lower rank). Deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .._validate import positive_int
from ..ranges import Range, chunk_works, merge_adjacent, work_prefix
from .base import Assignment, Rule, chunk_rule

__all__ = ["Balanced", "DEFAULT_CHUNKS_PER_RANK", "balanced_assignment"]

DEFAULT_CHUNKS_PER_RANK = 4


def balanced_assignment(
    cu: Sequence[int],
    num_samples: int,
    sample_len: int,
    ring: int,
    chunks_per_rank: int,
    prefix: Sequence[int] | None = None,
) -> tuple[list[list[Range]], list[int]]:
    """The dealing: per rank its chunks (unsorted) and its total work."""
    if prefix is None:
        prefix = work_prefix(cu)
    n = chunks_per_rank * ring
    chunk = sample_len // n
    load = [0] * ring
    held: list[list[Range]] = [[] for _ in range(ring)]
    for b in range(num_samples):
        base = b * sample_len
        weights = chunk_works(cu, prefix, base, chunk, n)
        room = [chunks_per_rank] * ring
        heap = [(load[r], r) for r in range(ring)]  # ranks with room, by (work so far, rank)
        heapq.heapify(heap)
        neg = [-w for w in weights]
        for c in sorted(range(n), key=neg.__getitem__):  # heaviest first; stable: ties by position
            _, r = heapq.heappop(heap)
            held[r].append((base + c * chunk, base + (c + 1) * chunk))
            load[r] += weights[c]
            room[r] -= 1
            if room[r]:
                heapq.heappush(heap, (load[r], r))
    return held, load


@dataclass(frozen=True)
class Balanced:
    """Equal chunks dealt by work, ``chunks_per_rank`` of every sample per rank (default 4).

    >>> Balanced(chunks_per_rank=2).assign([0, 5, 8, 16], sample_len=16, ring_size=2, ulysses_size=1).pieces
    (((8, 16),), ((0, 8),))
    """

    chunks_per_rank: int = DEFAULT_CHUNKS_PER_RANK
    name: ClassVar[str] = "balanced"

    def __post_init__(self) -> None:
        positive_int("chunks_per_rank", self.chunks_per_rank)

    def rules(self, ring_size: int, ring_name: str) -> list[Rule]:
        m = self.chunks_per_rank * ring_size
        return [
            chunk_rule(ring_size, ring_name),
            Rule(
                m,
                lambda s: (
                    f"sample_len: expected a multiple of chunks_per_rank*{ring_name}={m} for "
                    f"strategy='balanced', got {s}"
                ),
            ),
        ]

    def assign(self, cu_seqlens: Sequence[int], sample_len: int, ring_size: int, ulysses_size: int) -> Assignment:
        held, _ = balanced_assignment(
            cu_seqlens, cu_seqlens[-1] // sample_len, sample_len, ring_size, self.chunks_per_rank
        )
        return Assignment(tuple(merge_adjacent(p, sample_len) for p in held))

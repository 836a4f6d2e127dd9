"""``zigzag``: Megatron's order. Every sample is cut into ``2R`` equal chunks; ring rank ``r`` holds chunks
``r`` and ``2R-1-r`` of every sample (``get_batch_on_this_cp_rank``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..ranges import Range, merge_adjacent
from .base import Assignment, Rule, chunk_rule

__all__ = ["Zigzag", "zigzag_pieces"]


def zigzag_pieces(num_samples: int, sample_len: int, ring: int) -> tuple[tuple[Range, ...], ...]:
    """Chunks ``r`` and ``2R-1-r`` of every sample; adjacent chunks (rank ``R-1``) form one piece."""
    chunk = sample_len // (2 * ring)
    return tuple(
        merge_adjacent(
            [
                (b * sample_len + c * chunk, b * sample_len + (c + 1) * chunk)
                for b in range(num_samples)
                for c in (r, 2 * ring - 1 - r)
            ],
            sample_len,
        )
        for r in range(ring)
    )


@dataclass(frozen=True)
class Zigzag:
    """Megatron's zigzag order (2 chunks of every sample per rank, paired head with tail).

    >>> Zigzag().assign([0, 5, 8, 16], sample_len=16, ring_size=2, ulysses_size=1).pieces
    (((0, 4), (12, 16)), ((4, 12),))
    """

    name: ClassVar[str] = "zigzag"

    def rules(self, ring_size: int, ring_name: str) -> list[Rule]:
        return [chunk_rule(ring_size, ring_name)]

    def assign(self, cu_seqlens: Sequence[int], sample_len: int, ring_size: int, ulysses_size: int) -> Assignment:
        return Assignment(zigzag_pieces(cu_seqlens[-1] // sample_len, sample_len, ring_size))

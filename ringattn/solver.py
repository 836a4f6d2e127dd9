"""Former home of the ``auto`` solver, now :mod:`ringattn.sharding.auto`; kept so that existing imports work."""

from __future__ import annotations

from collections.abc import Sequence

from .cost import CostModel
from .layout import DocLayout
from .sharding.auto import BALANCED_CHUNKS, MIN_CHUNK, SPLITS, auto_assignment, candidates, merged_pieces

__all__ = ["MIN_CHUNK", "SPLITS", "BALANCED_CHUNKS", "auto_layout", "candidates", "merged_pieces"]


def auto_layout(cu: Sequence[int], cp: int, sample_len: int, cost: CostModel, ulysses_size: int = 1) -> DocLayout:
    """The layout of ``cp`` ring ranks that ``strategy="auto"`` solves
    (:func:`ringattn.sharding.auto.auto_assignment`)."""
    dealt = auto_assignment(cu, cp, sample_len, cost, ulysses_size)
    return DocLayout(tuple(cu), cp, sample_len, "auto", dealt.pieces, auto_choice=dealt.choice)

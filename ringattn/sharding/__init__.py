"""Sharding strategies: which tokens ("pieces") each ring rank holds.

Strategies are small frozen objects (:class:`Zigzag`, :class:`Balanced`, :class:`Auto`) that give the
sample-length rules they need and every ring rank's pieces (:mod:`.base`); :class:`ringattn.DocLayout`
is built from what they return. The strings ``"zigzag"``, ``"balanced"`` and ``"auto"`` (with
``chunks_per_rank=`` / ``cost=``) are aliases of the objects (:data:`ALIASES`, :func:`resolve`), and any
object that follows the :class:`Strategy` protocol can be passed as ``strategy=``:

>>> from ringattn import DocLayout
>>> from ringattn.sharding import Balanced
>>> a = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2, strategy=Balanced(chunks_per_rank=2))
>>> b = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2, strategy="balanced", chunks_per_rank=2)
>>> a == b, a.strategy
(True, 'balanced')

Modules: :mod:`.base` (the protocol), :mod:`.zigzag`, :mod:`.balanced`, :mod:`.auto` (the cost-driven
solver, formerly ``ringattn.solver``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .auto import Auto
from .balanced import DEFAULT_CHUNKS_PER_RANK, Balanced
from .base import Assignment, Rule, Strategy
from .zigzag import Zigzag

__all__ = [
    "Strategy",
    "Rule",
    "Assignment",
    "Zigzag",
    "Balanced",
    "Auto",
    "ALIASES",
    "STRATEGIES",
    "resolve",
    "DEFAULT_CHUNKS_PER_RANK",
]

#: strategy name -> the strategy object for ``(chunks_per_rank, cost)`` (each alias reads only what it uses)
ALIASES: dict[str, Callable[[Any, Any], Strategy]] = {
    "zigzag": lambda chunks_per_rank, cost: Zigzag(),
    "balanced": lambda chunks_per_rank, cost: Balanced(
        DEFAULT_CHUNKS_PER_RANK if chunks_per_rank is None else chunks_per_rank
    ),
    "auto": lambda chunks_per_rank, cost: Auto(cost),
}
#: the strategy names ``strategy=`` accepts
STRATEGIES = tuple(ALIASES)


def resolve(strategy: str | Strategy, chunks_per_rank: int | None = None, cost: Any = None) -> Strategy:
    """The strategy object for ``strategy`` (a name of :data:`STRATEGIES` or an object); ``ValueError`` otherwise.

    ``chunks_per_rank`` is read by ``"balanced"`` only and ``cost`` by ``"auto"`` only (the other names
    ignore them, as they always did); with a strategy object, give them to the object instead.
    """
    if isinstance(strategy, str):
        if strategy not in ALIASES:
            raise ValueError(
                f"strategy: expected one of {STRATEGIES} or a ringattn.sharding strategy object, got {strategy!r}"
            )
        return ALIASES[strategy](chunks_per_rank, cost)
    if not isinstance(strategy, Strategy):
        raise ValueError(
            f"strategy: expected one of {STRATEGIES} or a ringattn.sharding strategy object, got "
            f"{type(strategy).__name__}"
        )
    for name, value, where in (
        ("chunks_per_rank", chunks_per_rank, "Balanced(chunks_per_rank=...)"),
        ("cost", cost, "Auto(cost=...)"),
    ):
        if value is not None:
            raise ValueError(f"{name}: give it to the strategy object ({where}), not beside strategy={strategy!r}")
    return strategy

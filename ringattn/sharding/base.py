"""What a sharding strategy is: the sample-length rules it needs and the pieces it deals out.

A strategy is a small frozen object (:class:`ringattn.sharding.Zigzag`, :class:`~ringattn.sharding.Balanced`,
:class:`~ringattn.sharding.Auto`, or your own) with

* ``name``: what :attr:`ringattn.DocLayout.strategy` records;
* ``rules(ring_size, ring_name)``: the :class:`Rule` s a sample length must satisfy (``sample_len %
  modulus == 0``, checked in order; the message names the first broken one);
* ``assign(cu_seqlens, sample_len, ring_size, ulysses_size)``: the :class:`Assignment`, i.e. every ring
  rank's pieces, sorted, touching ones merged within a sample (:func:`ringattn.ranges.merge_adjacent`),
  equal in number of tokens per ring rank (the layout splits a ring rank's tokens over its ``ulysses_size``
  Ulysses ranks); deterministic, so every rank derives the same pieces from the same batch.

:meth:`ringattn.DocLayout.from_cu_seqlens` validates the documents and the sample length against the
rules, then builds the layout from the assignment: a strategy never builds a layout itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from ..ranges import Range

__all__ = ["Rule", "Assignment", "Strategy"]


class Rule(NamedTuple):
    """``sample_len % modulus == 0``; ``message(sample_len)`` says what is wrong when it is not."""

    modulus: int
    message: Callable[[int], str]


class Assignment(NamedTuple):
    """Every ring rank's sorted pieces, and for a strategy that chooses among candidates, its choice."""

    pieces: tuple[tuple[Range, ...], ...]
    choice: str | None = None


@runtime_checkable
class Strategy(Protocol):
    """A sharding strategy (see the module docstring)."""

    name: str

    def rules(self, ring_size: int, ring_name: str) -> list[Rule]: ...

    def assign(self, cu_seqlens: Sequence[int], sample_len: int, ring_size: int, ulysses_size: int) -> Assignment: ...


def chunk_rule(ring_size: int, ring_name: str) -> Rule:
    """The rule every built-in strategy shares: a sample cuts into ``2 * ring_size`` equal chunks."""
    m = 2 * ring_size
    return Rule(m, lambda s: f"sample_len: expected a multiple of 2*{ring_name}={m}, got {s}")

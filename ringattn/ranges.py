"""Token ranges and pieces: the small values every layer below attention works with.

A *piece* is a global token range ``(start, end)`` of the flattened ``[b*s]`` micro-batch held by one
rank; a rank's pieces are sorted, disjoint and never cross a sample boundary. ``cu_seqlens`` are the
global document boundaries (``0, ..., b*s``, every sample boundary included).

:class:`PieceLayout` is what the planner and the cost model read of a layout: the fields and queries
of :class:`ringattn.layout.DocLayout`, which sits above them in the data flow and implements it (so
neither needs the class itself).

>>> list(doc_segments([0, 5, 8, 16], 3, 10))       # [3, 10) cut at the document boundaries
[(3, 5, 0), (5, 8, 1), (8, 10, 2)]
>>> work_prefix([0, 5, 8, 16])                      # causal score entries of the first d documents
[0, 15, 21, 57]
>>> merge_adjacent([(4, 8), (0, 4), (12, 16)], sample_len=16)
((0, 8), (12, 16))
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "Range",
    "PieceLayout",
    "as_int_list",
    "doc_segments",
    "work_prefix",
    "chunk_works",
    "merge_adjacent",
    "pieces_work",
]

Range = tuple[int, int]


@runtime_checkable
class PieceLayout(Protocol):
    """The fields and queries of a layout the planner and the cost model read (:class:`ringattn.DocLayout`).

    ``pieces[r]``: ring rank ``r``'s sorted pieces; ``ulysses_size`` Ulysses ranks share each ring rank's
    tokens (``cp_size = ulysses_size * ring_size``); ``ring_layout``: the same pieces as a pure ring of
    ``ring_size`` ranks (the layout itself when ``ulysses_size == 1``).
    """

    cu_seqlens: tuple[int, ...]
    cp_size: int
    sample_len: int
    pieces: tuple[tuple[Range, ...], ...]
    ulysses_size: int

    @property
    def ring_size(self) -> int: ...

    @property
    def longest_document(self) -> int: ...

    @property
    def ring_layout(self) -> PieceLayout: ...

    def split(self, rank: int) -> tuple[int, int]: ...

    def local_tokens(self, rank: int) -> int: ...


def as_int_list(cu_seqlens: Sequence[int] | torch.Tensor) -> list[int]:
    """``cu_seqlens`` (ints or a 1-D integer tensor) as a list of Python ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens: expected integers, got dtype {cu_seqlens.dtype}")
        return [int(x) for x in cu_seqlens.tolist()]
    return [int(x) for x in cu_seqlens]


def doc_segments(cu: Sequence[int], start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(s, e, d)``: the range ``[start, end)`` cut at the document boundaries ``cu``; ``d`` is
    the index of the document holding ``[s, e)``."""
    d = bisect.bisect_right(cu, start) - 1
    while start < end:
        e = min(end, cu[d + 1])
        yield start, e, d
        start, d = e, d + 1


def work_prefix(cu: Sequence[int]) -> list[int]:
    """``C[d]``: unmasked score entries of documents ``0 .. d-1`` (``len(cu)`` entries)."""
    out = [0]
    for a, b in zip(cu, cu[1:]):
        n = b - a
        out.append(out[-1] + n * (n + 1) // 2)
    return out


def chunk_works(cu: Sequence[int], prefix: Sequence[int], base: int, chunk: int, n: int) -> list[int]:
    """Work of the ``n`` chunks ``[base + c*chunk, base + (c+1)*chunk)`` (one pass over the boundaries)."""
    d = bisect.bisect_right(cu, base) - 1
    last_doc = len(cu) - 2
    nxt = cu[d + 1]
    cum = []
    for t in range(base, base + n * chunk + 1, chunk):
        while d < last_doc and nxt <= t:
            d += 1
            nxt = cu[d + 1]
        m = t - cu[d]
        cum.append(prefix[d] + m * (m + 1) // 2)
    return [b - a for a, b in zip(cum, cum[1:])]


def merge_adjacent(pieces: Iterable[Range], sample_len: int) -> tuple[Range, ...]:
    """``pieces`` sorted, touching ones merged except across a sample boundary (as a layout holds them)."""
    out: list[Range] = []
    for start, end in sorted(pieces):
        if out and out[-1][1] == start and start % sample_len:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


def pieces_work(cu: Sequence[int], prefix: Sequence[int], pieces: Iterable[Range]) -> int:
    """Unmasked score entries of the queries in sorted ``pieces`` (each inside one sample); ``prefix``
    is :func:`work_prefix` of ``cu``."""
    total = 0
    d = 0
    last = len(cu) - 2
    for s, e in pieces:
        while cu[d + 1] <= s:
            d += 1
        a = s - cu[d]
        de = d
        while de < last and cu[de + 1] < e:
            de += 1
        b = e - cu[de]
        total += prefix[de] + b * (b + 1) // 2 - prefix[d] - a * (a + 1) // 2
    return total

"""Which global token ranges ("pieces") each context-parallel rank holds.

A :class:`DocLayout` is global metadata, identical on every rank: the documents of the
micro-batch (``cu_seqlens`` over the flattened ``[b*s]`` tokens), the CP size, and for every
rank its pieces, in local order. Pieces of one rank are disjoint, sorted by global position,
and never cross a sample boundary; downstream code (plan, comm) works from pieces only.

Strategies:

* ``zigzag`` — every sample is cut into ``2*cp`` equal chunks; rank ``r`` holds chunks ``r``
  and ``2*cp-1-r`` of every sample (Megatron's ``get_batch_on_this_cp_rank`` order).
* ``balanced`` — document-aware: every sample is cut into ``chunks_per_rank * cp`` equal
  chunks, weighed by their attention work (unmasked score entries of their queries), and
  dealt out so that every rank holds ``chunks_per_rank`` chunks of every sample (equal token
  counts) and about the same work: heaviest chunk first, to the rank with the least work so
  far that still has room (ties to the lower rank). Deterministic, so every rank derives the
  same layout.
* ``auto`` — the least step time predicted by a cost model (:mod:`ringattn.cost`) among a
  portfolio of zigzag, balanced and document-aware packed candidates (:mod:`ringattn.sharding.auto`);
  equal tokens per rank per sample, deterministic.

The strategies are objects of :mod:`ringattn.sharding` (:class:`~ringattn.sharding.Zigzag`,
:class:`~ringattn.sharding.Balanced`, :class:`~ringattn.sharding.Auto`); the names above are their
aliases. A layout is only the container of what a strategy dealt out, plus its queries: it sits above
the planner, the cost model and the strategies in the data flow (they read a layout through
:class:`ringattn.ranges.PieceLayout`), so :meth:`DocLayout.stats` and :meth:`DocLayout.cp_stats` are
plain calls into :mod:`ringattn.plan`.

Hybrid context parallelism (Ulysses x ring, ``ulysses_size = U > 1``): the CP group of
``cp_size = U * R`` ranks is ``R`` ring ranks of ``U`` Ulysses ranks each, CP rank
``c = ring_rank * U + ulysses_rank``. ``pieces`` are the chosen strategy's pieces for the ``R``
ring ranks; each ring rank's local tokens (its pieces' concatenation) are split into ``U``
equal contiguous parts, part ``u`` held by Ulysses rank ``u``. Attention gathers a ring
rank's tokens with an all-to-all over heads and runs the ring plan of :attr:`DocLayout.ring_layout`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ._validate import positive_int
from .agreement import signature
from .cost import CostModel
from .eod import cu_seqlens_from_tokens, position_ids_from_cu_seqlens
from .plan import DEFAULT_COMM, CPStats, PlanStats, build_plan, cp_stats
from .ranges import Range, as_int_list, doc_segments
from .sharding import DEFAULT_CHUNKS_PER_RANK, STRATEGIES, Rule, Strategy, resolve

__all__ = ["DocLayout", "STRATEGIES", "DEFAULT_CHUNKS_PER_RANK", "doc_segments", "Range"]


def _check_split(cp_size, ulysses_size) -> int:
    """``ring_size`` for a valid CP split, else ``ValueError``."""
    positive_int("cp_size", cp_size, " (the number of ranks in the CP group)")
    positive_int("ulysses_size", ulysses_size, " (1 for a pure ring)")
    if cp_size % ulysses_size:
        raise ValueError(
            f"ulysses_size: expected a divisor of cp_size={cp_size}, got {ulysses_size}; build the layout "
            "with the Ulysses size of your CP groups (ringattn.new_cp_groups(U) with U dividing cp_size)"
        )
    return cp_size // ulysses_size


def _sample_len_rules(strategy: Strategy, ring: int, ulysses_size: int, num_samples: int) -> list[Rule]:
    """The rules a sample length must satisfy, in the order checked: the strategy's, then the Ulysses split's.

    The one source of the sample-length rules: :meth:`DocLayout.from_cu_seqlens` checks them and
    :meth:`DocLayout.required_multiple` combines them (what the adapters pad to).
    """
    u = ulysses_size
    rules = list(strategy.rules(ring, "cp_size" if u == 1 else "ring_size"))
    if u > 1:
        # each ring rank's tokens (num_samples * sample_len / R, an integer once the first rule holds) split into U
        # equal parts: with R | s, U | n*s/R  <=>  (R*U / gcd(U, n)) | s
        rules.append(
            Rule(
                ring * u // math.gcd(u, num_samples),
                lambda s: (
                    f"ulysses_size: each ring rank's {num_samples * s // ring} tokens "
                    f"(total {num_samples * s} / ring_size "
                    f"{ring}) must split into ulysses_size={u} equal parts"
                ),
            )
        )
    return rules


@dataclass(frozen=True)
class DocLayout:
    """Documents and CP pieces of one micro-batch.

    cu_seqlens: global document boundaries, ``(0, ..., num_samples*sample_len)``.
    cp_size: the whole CP size (``ulysses_size * ring_size``).
    sample_len: tokens per sample (every multiple of it is a document boundary).
    strategy: the name of the strategy that chose the pieces (``"zigzag"``, ``"balanced"``, ``"auto"``).
    pieces: ``pieces[r]`` is ring rank ``r``'s tuple of ``(start, end)`` global token ranges,
        sorted; ring rank ``r``'s local tokens are their concatenation (with
        ``ulysses_size == 1`` ring ranks are the CP ranks).
    ulysses_size: Ulysses ranks per ring rank (1: pure ring); see the module docstring.
    auto_choice: with ``strategy="auto"``, the solver's winning candidate (e.g. ``"packed(0.25)"``);
        not part of the layout's identity (equality, :attr:`fingerprint`).

    Build it with :meth:`from_cu_seqlens` or :meth:`from_tokens`, the same on every rank. One
    sample of 16 tokens holding three documents (``[0, 5)``, ``[5, 8)``, ``[8, 16)``) over 2 CP
    ranks, zigzag: the sample is cut into 4 chunks of 4 tokens, rank 0 holds chunks 0 and 3,
    rank 1 chunks 1 and 2 (one piece, as they touch):

    >>> from ringattn import DocLayout
    >>> layout = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2)
    >>> layout
    DocLayout(strategy='zigzag', cp_size=2, samples=1, sample_len=16, docs=3, local_tokens=8)
    >>> layout.pieces
    (((0, 4), (12, 16)), ((4, 12),))

    A rank shards any per-token tensor of the flattened batch with :meth:`local_indices` and
    feeds RoPE the reset :meth:`position_ids` (token 4 is the last of the first document; the
    second and third documents start at tokens 5 and 8):

    >>> layout.local_indices(1).tolist()
    [4, 5, 6, 7, 8, 9, 10, 11]
    >>> layout.position_ids(1).tolist()
    [4, 0, 1, 2, 0, 1, 2, 3]

    The plan's exact accounting (:meth:`stats`): rank 0 does 36 of the 57 unmasked score
    entries, and each rank receives 4 KV tokens (the part of the other rank's KV its queries read):

    >>> layout.stats()
    PlanStats(comm='direct', cp=2, steps=1, imbalance=1.263, work=[36, 21], kv_recv_tokens=[4, 4], pairs_skipped=[3, 1])

    The document-aware ``balanced`` strategy (here 2 chunks of 4 tokens per rank) keeps every
    document of this sample on one rank, so nothing is exchanged:

    >>> balanced = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2, strategy="balanced", chunks_per_rank=2)
    >>> balanced.pieces, balanced.stats().num_steps
    ((((8, 16),), ((0, 8),)), 0)

    Hybrid CP: ``cp_size=4`` as 2 Ulysses x 2 ring ranks; CP rank ``c`` is ring rank ``c // 2``,
    Ulysses rank ``c % 2`` and holds half of its ring rank's tokens:

    >>> hybrid = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=4, ulysses_size=2)
    >>> [hybrid.split(c) for c in range(4)]
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> [hybrid.rank_pieces(c) for c in range(4)]
    [((0, 4),), ((12, 16),), ((4, 8),), ((8, 12),)]
    >>> hybrid.ring_layout.pieces == layout.pieces
    True
    """

    cu_seqlens: tuple[int, ...]
    cp_size: int
    sample_len: int
    strategy: str
    pieces: tuple[tuple[Range, ...], ...]
    ulysses_size: int = 1
    auto_choice: str | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: Sequence[int] | torch.Tensor,
        cp_size: int,
        *,
        sample_len: int | None = None,
        strategy: str | Strategy = "zigzag",
        chunks_per_rank: int | None = None,
        ulysses_size: int = 1,
        cost: CostModel | None = None,
    ) -> DocLayout:
        """Build a layout from global document boundaries.

        cu_seqlens: ints (list or 1-D tensor) starting at 0, strictly increasing, ending at the
            total token count; every multiple of ``sample_len`` must be a boundary.
        cp_size: the whole CP size; with ``ulysses_size = U`` it is ``U * R`` for ``R`` ring ranks.
        strategy: a name of :data:`STRATEGIES` or a strategy object of :mod:`ringattn.sharding`
            (``Zigzag()``, ``Balanced(chunks_per_rank=...)``, ``Auto(cost=...)``, or your own).
        sample_len: tokens per sample (default: the total, i.e. one sample); must be divisible
            by ``2 * R`` (zigzag) or ``chunks_per_rank * R`` (balanced), ``R = cp_size // ulysses_size``,
            and split each ring rank's tokens in ``ulysses_size`` equal parts: exactly the multiples
            of :meth:`required_multiple`.
        chunks_per_rank: chunks of every sample each rank holds with ``strategy="balanced"``
            (default 4); ignored by zigzag, which always uses 2, and by auto (with a strategy object,
            pass it to the object: ``Balanced(chunks_per_rank=...)``).
        ulysses_size: Ulysses ranks per ring rank (default 1: pure ring); must divide ``cp_size``
            and each ring rank's token count (``total / R``).
        cost: the :class:`ringattn.cost.CostModel` whose predicted step time ``strategy="auto"``
            minimises (see :mod:`ringattn.sharding.auto`); default :func:`ringattn.cost.default_cost_model`
            (400 TFLOP/s, 450 GB/s, Hq=32, Hkv=8, D=128, bf16). Ignored by the other strategies.
            With ``ulysses_size > 1`` the ring ranks' pieces are solved as a ring of ``R`` ranks,
            priced with the model's head split (``Hq/U`` heads; ``ValueError`` if its heads cannot
            split over ``U`` ranks).
        """
        ring = _check_split(cp_size, ulysses_size)
        chosen = resolve(strategy, chunks_per_rank, cost)
        cu = as_int_list(cu_seqlens)
        if len(cu) < 2:
            raise ValueError(
                f"cu_seqlens: expected at least 2 entries, got {cu}; pass the document boundaries from 0 "
                "to the token count, e.g. [0, 5, 16] for documents of 5 and 11 tokens"
            )
        if cu[0] != 0:
            raise ValueError(
                f"cu_seqlens: expected to start at 0, got {cu[0]}; pass the document boundaries from 0 "
                "to the token count (cumulative document lengths with a leading 0)"
            )
        for i in range(1, len(cu)):
            if cu[i] <= cu[i - 1]:
                raise ValueError(
                    f"cu_seqlens: expected strictly increasing values, got {cu[i - 1]} then {cu[i]} at index {i}; "
                    "boundaries are cumulative document lengths and every document has at least one token"
                )
        total = cu[-1]
        if sample_len is None:
            sample_len = total
        positive_int("sample_len", sample_len, " (the tokens per sample: the batch's sequence length)")
        if total % sample_len:
            raise ValueError(
                f"cu_seqlens: expected to end at a multiple of sample_len={sample_len} (the token count), got {total}; "
                "pass sample_len= the tokens per sample (the batch's sequence length)"
            )
        rules = _sample_len_rules(chosen, ring, ulysses_size, total // sample_len)
        for modulus, message in rules:
            if sample_len % modulus:
                need = math.lcm(*(m for m, _ in rules))
                raise ValueError(
                    f"{message(sample_len)}; pad every sample to a multiple of {need} (DocLayout."
                    f"required_multiple({cp_size}, strategy={chosen.name!r}, ulysses_size={ulysses_size}, "
                    f"num_samples={total // sample_len}) = {need}; shard_batch pads to it by itself)"
                )
        bounds = set(cu)
        missing = [b for b in range(sample_len, total, sample_len) if b not in bounds]
        if missing:
            b = missing[0]
            d = bisect.bisect_right(cu, b) - 1
            raise ValueError(
                f"cu_seqlens: sample boundaries must be document boundaries; missing {missing[:4]}: document {d} "
                f"([{cu[d]}, {cu[d + 1]})) crosses the boundary of samples {b // sample_len - 1} and "
                f"{b // sample_len} at token {b} (sample_len="
                f"{sample_len}); end it there, splitting it into [{cu[d]}, {b}) and [{b}, {cu[d + 1]}) (a document "
                "cannot span two samples)"
            )
        dealt = chosen.assign(cu, sample_len, ring, ulysses_size)
        return cls(tuple(cu), cp_size, sample_len, chosen.name, dealt.pieces, ulysses_size, dealt.choice)

    @classmethod
    def from_tokens(
        cls,
        tokens: torch.Tensor,
        eod_id: int,
        cp_size: int,
        *,
        strategy: str | Strategy = "zigzag",
        chunks_per_rank: int | None = None,
        ulysses_size: int = 1,
        cost: CostModel | None = None,
    ) -> DocLayout:
        """Layout of ``tokens [b, s]`` whose documents end with ``eod_id`` (see :mod:`ringattn.eod`)."""
        cu = cu_seqlens_from_tokens(tokens, eod_id)
        return cls.from_cu_seqlens(
            cu,
            cp_size,
            sample_len=int(tokens.shape[1]),
            strategy=strategy,
            chunks_per_rank=chunks_per_rank,
            ulysses_size=ulysses_size,
            cost=cost,
        )

    @staticmethod
    def required_multiple(
        cp_size: int,
        *,
        strategy: str | Strategy = "zigzag",
        chunks_per_rank: int | None = None,
        ulysses_size: int = 1,
        num_samples: int = 1,
    ) -> int:
        """The sample lengths :meth:`from_cu_seqlens` accepts with these arguments are exactly the
        positive multiples of this number (pad samples up to one).

        ``lcm(2R, chunks_per_rank*R (balanced), R*U / gcd(U, num_samples))`` for ``R = cp_size //
        ulysses_size`` ring ranks and ``U = ulysses_size``: zigzag cuts a sample into ``2R`` chunks,
        balanced into ``chunks_per_rank*R``, and each ring rank's tokens of all ``num_samples``
        samples must split into ``U`` equal parts. The value for ``num_samples=1`` (the default)
        suits any number of samples. Invalid arguments raise the ``ValueError`` the layout would.

        >>> DocLayout.required_multiple(4)                        # zigzag: 2*4 chunks per sample
        8
        >>> DocLayout.required_multiple(4, strategy="balanced")  # 4 chunks per rank by default
        16
        >>> DocLayout.required_multiple(8, ulysses_size=4)        # 2 ring ranks' s/2 tokens in 4 parts
        8
        >>> DocLayout.required_multiple(8, ulysses_size=4, num_samples=2)
        4
        """
        ring = _check_split(cp_size, ulysses_size)
        chosen = resolve(strategy, chunks_per_rank)
        positive_int("num_samples", num_samples)
        return math.lcm(*(m for m, _ in _sample_len_rules(chosen, ring, ulysses_size, num_samples)))

    # ------------------------------------------------------------------ queries
    @cached_property
    def fingerprint(self) -> int:
        """62-bit hash of the layout's metadata, identical on every rank that built the same layout."""
        return signature(
            (self.cu_seqlens, self.cp_size, self.sample_len, self.strategy, self.pieces, self.ulysses_size)
        )

    @property
    def ring_size(self) -> int:
        """Ring ranks: ``cp_size // ulysses_size`` (``cp_size`` for a pure ring)."""
        return self.cp_size // self.ulysses_size

    @cached_property
    def ring_layout(self) -> DocLayout:
        """The layout of the ring ranks alone (``ulysses_size=1``, ``cp_size=ring_size``, same pieces):
        what the planner and the ring executor run on. ``self`` for a pure ring; built once per layout,
        so its plans are planned once too."""
        if self.ulysses_size == 1:
            return self
        return DocLayout(
            self.cu_seqlens, self.ring_size, self.sample_len, self.strategy, self.pieces, auto_choice=self.auto_choice
        )

    def split(self, rank: int) -> tuple[int, int]:
        """``(ring_rank, ulysses_rank)`` of CP rank ``rank`` (``rank = ring_rank * ulysses_size + ulysses_rank``)."""
        self._check_rank(rank)
        return divmod(rank, self.ulysses_size)

    def rank_pieces(self, rank: int) -> tuple[Range, ...]:
        """Global token ranges CP rank ``rank`` holds, in local order (``pieces[rank]`` for a pure ring)."""
        ring_rank, u = self.split(rank)
        pieces = self.pieces[ring_rank]
        if self.ulysses_size == 1:
            return pieces
        n = sum(e - s for s, e in pieces) // self.ulysses_size
        lo, hi, off, out = u * n, (u + 1) * n, 0, []
        for s, e in pieces:
            a, b = max(s, s + lo - off), min(e, s + hi - off)
            if a < b:
                out.append((a, b))
            off += e - s
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def num_samples(self) -> int:
        return self.total_tokens // self.sample_len

    @property
    def num_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    @cached_property
    def longest_document(self) -> int:
        """Tokens of the longest document (a sliding window at least this long masks nothing)."""
        cu = self.cu_seqlens
        return max(b - a for a, b in zip(cu, cu[1:]))

    @cached_property
    def _ring_tokens(self) -> tuple[int, ...]:
        return tuple(sum(e - s for s, e in pieces) for pieces in self.pieces)

    def local_tokens(self, rank: int) -> int:
        """Number of tokens CP rank ``rank`` holds (counted once per layout: it is read on every call)."""
        ring_rank, _ = self.split(rank)
        return self._ring_tokens[ring_rank] // self.ulysses_size

    def doc_of(self, token: int) -> int:
        """Index of the document holding global token ``token``."""
        return bisect.bisect_right(self.cu_seqlens, token) - 1

    def local_indices(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[local_tokens(rank)]``: global token indices held by CP rank ``rank``, local order.

        Shard any per-token tensor of the flattened batch with ``x.reshape(-1, ...)[idx]``.
        """
        return torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in self.rank_pieces(rank)]).to(device)

    def position_ids(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[local_tokens(rank)]``: reset position ids (offset within the document)."""
        return position_ids_from_cu_seqlens(self.cu_seqlens, self.total_tokens)[self.local_indices(rank)].to(device)

    def stats(self, comm: str | None = None, window: int | None = None) -> PlanStats:
        """Per-rank tokens, attention work, block pairs and KV traffic (:class:`ringattn.plan.PlanStats`)
        of the plan shape ``comm`` (default: the library's default shape), under a sliding ``window``
        (None: none). With ``ulysses_size > 1``
        these are the ring plan's, per ring rank (each of its Ulysses ranks runs that ring on its
        share of the heads); :meth:`cp_stats` gives bytes per CP rank, all-to-alls included."""
        return build_plan(self.ring_layout, comm or DEFAULT_COMM, window).stats

    def cp_stats(
        self,
        heads: int,
        kv_heads: int,
        head_dim: int,
        itemsize: int = 2,
        comm: str | None = None,
        node_size: int | None = None,
        window: int | None = None,
    ) -> CPStats:
        """Per CP rank all-to-all bytes and ring KV bytes, forward and backward
        (:class:`ringattn.plan.CPStats`) for ``heads`` query heads, ``kv_heads`` KV heads of
        ``head_dim`` elements of ``itemsize`` bytes (2: bf16/fp16); with ``node_size`` (CP
        ranks per node) also the bytes coming from other nodes; under a sliding ``window``."""
        return cp_stats(self, heads, kv_heads, head_dim, itemsize, comm or DEFAULT_COMM, node_size, window)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.cp_size:
            raise ValueError(
                f"rank: expected 0 <= rank < cp_size={self.cp_size}, got {rank}; pass this process's rank "
                "in the CP group (dist.get_rank(cp_group))"
            )

    def __repr__(self) -> str:  # the full tuples are long; keep the repr readable
        hybrid = f", ulysses_size={self.ulysses_size}, ring_size={self.ring_size}" if self.ulysses_size > 1 else ""
        return (
            f"DocLayout(strategy={self.strategy!r}, cp_size={self.cp_size}{hybrid}, samples={self.num_samples}, "
            f"sample_len={self.sample_len}, docs={self.num_docs}, local_tokens={self.local_tokens(0)})"
        )

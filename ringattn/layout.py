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
  portfolio of zigzag, balanced and document-aware packed candidates (:mod:`ringattn.solver`);
  equal tokens per rank per sample, deterministic.

Hybrid context parallelism (Ulysses x ring, ``ulysses_size = U > 1``): the CP group of
``cp_size = U * R`` ranks is ``R`` ring ranks of ``U`` Ulysses ranks each, CP rank
``c = ring_rank * U + ulysses_rank``. ``pieces`` are the chosen strategy's pieces for the ``R``
ring ranks; each ring rank's local tokens (its pieces' concatenation) are split into ``U``
equal contiguous parts, part ``u`` held by Ulysses rank ``u``. Attention gathers a ring
rank's tokens with an all-to-all over heads and runs the ring plan of :attr:`DocLayout.ring_layout`.
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .eod import cu_seqlens_from_tokens, position_ids_from_cu_seqlens

if TYPE_CHECKING:  # type names only: layout sits before plan and cost in the data flow (no runtime import)
    from .cost import CostModel
    from .plan import CPStats, PlanStats

__all__ = ["DocLayout", "STRATEGIES", "doc_segments"]

STRATEGIES = ("zigzag", "balanced", "auto")
DEFAULT_CHUNKS_PER_RANK = 4

Range = tuple[int, int]


def _as_int_list(cu_seqlens) -> list[int]:
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


def _chunk_works(cu: list[int], prefix: list[int], base: int, chunk: int, n: int) -> list[int]:
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


def _merge_adjacent(pieces: list[Range], sample_len: int) -> tuple[Range, ...]:
    out: list[Range] = []
    for start, end in sorted(pieces):
        if out and out[-1][1] == start and start % sample_len:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


def balanced_assignment(cu: list[int], num_samples: int, sample_len: int, cp: int, chunks_per_rank: int,
                        prefix: list[int] | None = None) -> tuple[list[list[Range]], list[int]]:
    """The balanced strategy's dealing: per rank its chunks (unsorted) and its total work."""
    if prefix is None:
        prefix = work_prefix(cu)
    n = chunks_per_rank * cp
    chunk = sample_len // n
    load = [0] * cp
    held: list[list[Range]] = [[] for _ in range(cp)]
    for b in range(num_samples):
        base = b * sample_len
        weights = _chunk_works(cu, prefix, base, chunk, n)
        room = [chunks_per_rank] * cp
        heap = [(load[r], r) for r in range(cp)]  # ranks with room, by (work so far, rank)
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


def _balanced_pieces(cu: list[int], num_samples: int, sample_len: int, cp: int,
                     chunks_per_rank: int) -> tuple[tuple[Range, ...], ...]:
    held, _ = balanced_assignment(cu, num_samples, sample_len, cp, chunks_per_rank)
    return tuple(_merge_adjacent(p, sample_len) for p in held)


def _zigzag_pieces(num_samples: int, sample_len: int, cp: int) -> tuple[tuple[Range, ...], ...]:
    """Chunks ``r`` and ``2cp-1-r`` of every sample; adjacent chunks (rank ``cp-1``) form one piece."""
    chunk = sample_len // (2 * cp)
    return tuple(
        _merge_adjacent([(b * sample_len + c * chunk, b * sample_len + (c + 1) * chunk)
                         for b in range(num_samples) for c in (r, 2 * cp - 1 - r)], sample_len)
        for r in range(cp)
    )


def _check_split(cp_size, strategy, chunks_per_rank, ulysses_size) -> tuple[int, int]:
    """``(ring_size, chunks_per_rank in effect)`` for valid layout arguments, else ``ValueError``."""
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
    if not isinstance(ulysses_size, int) or isinstance(ulysses_size, bool) or ulysses_size < 1:
        raise ValueError(f"ulysses_size: expected a positive int, got {ulysses_size!r}")
    if cp_size % ulysses_size:
        raise ValueError(f"ulysses_size: expected a divisor of cp_size={cp_size}, got {ulysses_size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    per_rank = 2  # zigzag: chunks r and 2R-1-r; auto: the zigzag rules (its candidates need no more)
    if strategy == "balanced":
        per_rank = DEFAULT_CHUNKS_PER_RANK if chunks_per_rank is None else chunks_per_rank
        if not isinstance(per_rank, int) or isinstance(per_rank, bool) or per_rank < 1:
            raise ValueError(f"chunks_per_rank: expected a positive int, got {chunks_per_rank!r}")
    return cp_size // ulysses_size, per_rank


def _sample_len_rules(ring: int, ulysses_size: int, strategy: str, per_rank: int, num_samples: int):
    """``[(modulus, message(sample_len))]``: a layout of ``num_samples`` samples needs ``sample_len %
    modulus == 0`` for each rule, checked in this order (the message names the first broken one).

    The one source of the sample-length rules: :meth:`DocLayout.from_cu_seqlens` checks them and
    :meth:`DocLayout.required_multiple` combines them (what the adapters pad to).
    """
    u = ulysses_size
    ring_name = "cp_size" if u == 1 else "ring_size"
    rules = [(2 * ring, lambda s: f"sample_len: expected a multiple of 2*{ring_name}={2 * ring}, got {s}")]
    if strategy == "balanced":
        rules.append((per_rank * ring, lambda s: f"sample_len: expected a multiple of chunks_per_rank*{ring_name}="
                                                 f"{per_rank * ring} for strategy='balanced', got {s}"))
    if u > 1:
        # each ring rank's tokens (num_samples * sample_len / R, an integer once the first rule holds) split into U
        # equal parts: with R | s, U | n*s/R  <=>  (R*U / gcd(U, n)) | s
        rules.append((ring * u // math.gcd(u, num_samples), lambda s: (
            f"ulysses_size: each ring rank's {num_samples * s // ring} tokens (total {num_samples * s} / ring_size "
            f"{ring}) must split into ulysses_size={u} equal parts")))
    return rules


@dataclass(frozen=True)
class DocLayout:
    """Documents and CP pieces of one micro-batch.

    cu_seqlens: global document boundaries, ``(0, ..., num_samples*sample_len)``.
    cp_size: the whole CP size (``ulysses_size * ring_size``).
    sample_len: tokens per sample (every multiple of it is a document boundary).
    strategy: the strategy that chose the pieces (``"zigzag"``, ``"balanced"`` or ``"auto"``).
    pieces: ``pieces[r]`` is ring rank ``r``'s tuple of ``(start, end)`` global token ranges,
        sorted; ring rank ``r``'s local tokens are their concatenation (with
        ``ulysses_size == 1`` ring ranks are the CP ranks).
    ulysses_size: Ulysses ranks per ring rank (1: pure ring); see the module docstring.

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
    #: (group id, signature) pairs the ranks already agreed on for this layout (see ringattn.agreement)
    agreed: set = field(default_factory=set, compare=False, hash=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: Sequence[int] | torch.Tensor,
        cp_size: int,
        *,
        sample_len: int | None = None,
        strategy: str = "zigzag",
        chunks_per_rank: int | None = None,
        ulysses_size: int = 1,
        cost: CostModel | None = None,
    ) -> DocLayout:
        """Build a layout from global document boundaries.

        cu_seqlens: ints (list or 1-D tensor) starting at 0, strictly increasing, ending at the
            total token count; every multiple of ``sample_len`` must be a boundary.
        cp_size: the whole CP size; with ``ulysses_size = U`` it is ``U * R`` for ``R`` ring ranks.
        sample_len: tokens per sample (default: the total, i.e. one sample); must be divisible
            by ``2 * R`` (zigzag) or ``chunks_per_rank * R`` (balanced), ``R = cp_size // ulysses_size``,
            and split each ring rank's tokens in ``ulysses_size`` equal parts: exactly the multiples
            of :meth:`required_multiple`.
        chunks_per_rank: chunks of every sample each rank holds with ``strategy="balanced"``
            (default 4); ignored by zigzag, which always uses 2, and by auto.
        ulysses_size: Ulysses ranks per ring rank (default 1: pure ring); must divide ``cp_size``
            and each ring rank's token count (``total / R``).
        cost: the :class:`ringattn.cost.CostModel` whose predicted step time ``strategy="auto"``
            minimises (see :mod:`ringattn.solver`); default :func:`ringattn.cost.default_cost_model`
            (400 TFLOP/s, 450 GB/s, Hq=32, Hkv=8, D=128, bf16). Ignored by the other strategies.
            With ``ulysses_size > 1`` the ring ranks' pieces are solved as a ring of ``R`` ranks,
            priced with the model's head split (``Hq/U`` heads; ``ValueError`` if its heads cannot
            split over ``U`` ranks).
        """
        cu = _as_int_list(cu_seqlens)
        ring, per_rank = _check_split(cp_size, strategy, chunks_per_rank, ulysses_size)
        if len(cu) < 2:
            raise ValueError(f"cu_seqlens: expected at least 2 entries, got {cu}")
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens: expected to start at 0, got {cu[0]}")
        for i in range(1, len(cu)):
            if cu[i] <= cu[i - 1]:
                raise ValueError(
                    f"cu_seqlens: expected strictly increasing values, got {cu[i - 1]} then {cu[i]} at index {i}"
                )
        total = cu[-1]
        if sample_len is None:
            sample_len = total
        if not isinstance(sample_len, int) or sample_len < 1:
            raise ValueError(f"sample_len: expected a positive int, got {sample_len!r}")
        if total % sample_len:
            raise ValueError(
                f"cu_seqlens: expected to end at a multiple of sample_len={sample_len} (the token count), got {total}"
            )
        for modulus, message in _sample_len_rules(ring, ulysses_size, strategy, per_rank, total // sample_len):
            if sample_len % modulus:
                raise ValueError(message(sample_len))
        bounds = set(cu)
        missing = [b for b in range(sample_len, total, sample_len) if b not in bounds]
        if missing:
            raise ValueError(
                f"cu_seqlens: sample boundaries must be document boundaries; missing {missing[:4]}"
            )
        if strategy == "auto":
            from .cost import CostModel, default_cost_model  # cost and solver sit after plan in the data flow
            from .solver import auto_layout

            if cost is None:
                cost = default_cost_model(ulysses_size)
            elif not isinstance(cost, CostModel):
                raise ValueError(f"cost: expected a ringattn.cost.CostModel, got {type(cost).__name__}")
            solved = auto_layout(cu, ring, sample_len, cost, ulysses_size)
            if ulysses_size == 1:
                return solved
            layout = cls(tuple(cu), cp_size, sample_len, strategy, solved.pieces, ulysses_size)
            object.__setattr__(layout, "_ring_layout", solved)  # its planner caches serve the ring plan
            object.__setattr__(layout, "_auto_choice", solved.auto_choice)
            return layout
        if strategy == "balanced":
            pieces = _balanced_pieces(cu, total // sample_len, sample_len, ring, per_rank)
        else:
            pieces = _zigzag_pieces(total // sample_len, sample_len, ring)
        return cls(tuple(cu), cp_size, sample_len, strategy, pieces, ulysses_size)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eod_id: int, cp_size: int, *, strategy: str = "zigzag",
                    chunks_per_rank: int | None = None, ulysses_size: int = 1,
                    cost: CostModel | None = None) -> DocLayout:
        """Layout of ``tokens [b, s]`` whose documents end with ``eod_id`` (see :mod:`ringattn.eod`)."""
        cu = cu_seqlens_from_tokens(tokens, eod_id)
        return cls.from_cu_seqlens(cu, cp_size, sample_len=int(tokens.shape[1]), strategy=strategy,
                                   chunks_per_rank=chunks_per_rank, ulysses_size=ulysses_size, cost=cost)

    @staticmethod
    def required_multiple(cp_size: int, *, strategy: str = "zigzag", chunks_per_rank: int | None = None,
                          ulysses_size: int = 1, num_samples: int = 1) -> int:
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
        ring, per_rank = _check_split(cp_size, strategy, chunks_per_rank, ulysses_size)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        return math.lcm(*(m for m, _ in _sample_len_rules(ring, ulysses_size, strategy, per_rank, num_samples)))

    # ------------------------------------------------------------------ queries
    @property
    def fingerprint(self) -> int:
        """62-bit hash of the layout's metadata, identical on every rank that built the same layout."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            from .agreement import signature

            fp = signature((self.cu_seqlens, self.cp_size, self.sample_len, self.strategy, self.pieces,
                            self.ulysses_size))
            object.__setattr__(self, "_fingerprint", fp)
        return fp

    @property
    def auto_choice(self) -> str | None:
        """With ``strategy="auto"``: the solver's winning candidate (e.g. ``"packed(0.25)"``)."""
        return self.__dict__.get("_auto_choice")

    @property
    def ring_size(self) -> int:
        """Ring ranks: ``cp_size // ulysses_size`` (``cp_size`` for a pure ring)."""
        return self.cp_size // self.ulysses_size

    @property
    def ring_layout(self) -> DocLayout:
        """The layout of the ring ranks alone (``ulysses_size=1``, ``cp_size=ring_size``, same pieces):
        what the planner and the ring executor run on. ``self`` for a pure ring."""
        if self.ulysses_size == 1:
            return self
        ring = self.__dict__.get("_ring_layout")
        if ring is None:
            ring = DocLayout(self.cu_seqlens, self.ring_size, self.sample_len, self.strategy, self.pieces)
            object.__setattr__(self, "_ring_layout", ring)
        return ring

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

    def local_tokens(self, rank: int) -> int:
        """Number of tokens CP rank ``rank`` holds (counted once per layout: it is read on every call)."""
        ring_rank, _ = self.split(rank)
        counts = self.__dict__.get("_ring_tokens")
        if counts is None:
            counts = tuple(sum(e - s for s, e in pieces) for pieces in self.pieces)
            object.__setattr__(self, "_ring_tokens", counts)
        return counts[ring_rank] // self.ulysses_size

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

    def stats(self, comm: str | None = None) -> PlanStats:
        """Per-rank tokens, attention work, block pairs and KV traffic (:class:`ringattn.plan.PlanStats`)
        of the plan shape ``comm`` (default: the library's default shape). With ``ulysses_size > 1``
        these are the ring plan's, per ring rank (each of its Ulysses ranks runs that ring on its
        share of the heads); :meth:`cp_stats` gives bytes per CP rank, all-to-alls included."""
        from .plan import DEFAULT_COMM, build_plan

        return build_plan(self.ring_layout, comm or DEFAULT_COMM).stats

    def cp_stats(self, heads: int, kv_heads: int, head_dim: int, itemsize: int = 2, comm: str | None = None,
                 node_size: int | None = None) -> CPStats:
        """Per CP rank all-to-all bytes and ring KV bytes, forward and backward
        (:class:`ringattn.plan.CPStats`) for ``heads`` query heads, ``kv_heads`` KV heads of
        ``head_dim`` elements of ``itemsize`` bytes (2: bf16/fp16); with ``node_size`` (CP
        ranks per node) also the bytes coming from other nodes."""
        from .plan import DEFAULT_COMM, cp_stats

        return cp_stats(self, heads, kv_heads, head_dim, itemsize, comm or DEFAULT_COMM, node_size)

    def __getstate__(self) -> dict:
        # per-process caches (the planner's index and rank plans, see ringattn.plan) are not copied
        # or pickled with the layout: they are rebuilt on demand from the fields
        return {k: v for k, v in self.__dict__.items() if k != "_plan_cache"}

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.cp_size:
            raise ValueError(f"rank: expected 0 <= rank < cp_size={self.cp_size}, got {rank}")

    def __repr__(self) -> str:  # the full tuples are long; keep the repr readable
        hybrid = f", ulysses_size={self.ulysses_size}, ring_size={self.ring_size}" if self.ulysses_size > 1 else ""
        return (
            f"DocLayout(strategy={self.strategy!r}, cp_size={self.cp_size}{hybrid}, samples={self.num_samples}, "
            f"sample_len={self.sample_len}, docs={self.num_docs}, local_tokens={self.local_tokens(0)})"
        )

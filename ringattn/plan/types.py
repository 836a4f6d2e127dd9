"""The plan's plain frozen dataclasses: what one rank runs and the exact accounting.

Work is counted in unmasked score entries (one query-key product per head), tokens in
KV tokens (one key and one value row per KV head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ranges import Range

__all__ = [
    "COMM_SHAPES",
    "DEFAULT_COMM",
    "Range",
    "Segment",
    "Transfer",
    "Step",
    "RankPlan",
    "PlanStats",
    "Plan",
    "band_entries",
]

COMM_SHAPES = ("plain", "ring", "direct")
#: the default shape (see the README for the measurements behind the choice)
DEFAULT_COMM = "direct"


def _sum_min(lo: int, hi: int, a: int, cap: int) -> int:
    """``sum(min(cap, r + a) for r in range(lo, hi))``."""
    if hi <= lo:
        return 0
    mid = min(max(cap - a, lo), hi)  # r < mid: r + a < cap
    return (mid - lo) * (lo + mid - 1 + 2 * a) // 2 + (hi - mid) * cap


def band_entries(sq: int, sk: int, left: int | None, right: int) -> int:
    """Unmasked entries of a ``sq x sk`` block under flash_attn's window convention: the window is aligned
    to the bottom-right corner, query row ``r`` sees key columns ``[r + sk - sq - left, r + sk - sq + right]``
    (``left=None``: no limit on the left) clipped to ``[0, sk)``.

    >>> band_entries(4, 4, None, 0), band_entries(4, 4, 1, 0)   # causal; causal with a window of 2 keys
    (10, 7)
    >>> band_entries(2, 3, 1, 2)   # queries at 3, 4 reading keys 0-2 under a window of 4 (left 4-1-2, right 2)
    5
    """
    a = sk - sq
    lo = max(0, -a - right)
    hi = min(sq, sk - a + left) if left is not None else sq
    if hi <= lo:
        return 0
    upper = _sum_min(lo, hi, a + right + 1, sk)  # sum of min(sk, r + a + right + 1)
    if left is None:
        return upper
    start = min(max(left - a, lo), hi)  # r >= start: r + a - left >= 0
    lower = (hi - start) * (start + hi - 1 + 2 * (a - left)) // 2  # sum of max(0, r + a - left)
    return upper - lower


@dataclass(frozen=True)
class Segment:
    """One block pair given to the kernel.

    q: local query rows ``[start, end)``; kv: rows ``[start, end)`` in the step's KV source
    (local KV at step 0, the received buffer otherwise). ``causal`` segments have
    ``q == kv`` ranges; non-causal ones are dense rectangles. ``window``: under a sliding
    window, the ``(left, right)`` pair of flash_attn's convention (aligned to the segment's
    bottom-right corner; see :func:`band_entries`) that masks the block; None without one.
    """

    q: Range
    kv: Range
    causal: bool
    window: tuple[int, int] | None = None

    @property
    def work(self) -> int:
        lq, lk = self.q[1] - self.q[0], self.kv[1] - self.kv[0]
        if self.window is not None:
            return band_entries(lq, lk, self.window[0], self.window[1])
        return lq * (lq + 1) // 2 if self.causal else lq * lk


@dataclass(frozen=True)
class Transfer:
    """One P2P message of KV rows (forward) or dK/dV rows (backward).

    peer: the other rank (group rank). rows: sorted row ranges it covers in the local
    tensor it is read from or added to; ``tokens`` is their total length.
    """

    peer: int
    rows: tuple[Range, ...]

    @property
    def tokens(self) -> int:
        return sum(e - s for s, e in self.rows)


@dataclass(frozen=True)
class Step:
    """What one rank does at one step distance.

    origin: rank whose KV ``segments`` read. recv: KV arriving into this step's buffer
    (``rows`` = the whole buffer). send: KV leaving at this step, read from the local KV
    (``send_from_buffer`` False) or from the previous step's buffer (ring forwarding).
    grad_send: rows of this step's buffer whose dK/dV partial goes back to ``origin``.
    grad_recv: local KV rows whose dK/dV partial arrives from the rank that read them.
    """

    distance: int
    origin: int
    segments: tuple[Segment, ...]
    recv: Transfer | None = None
    send: Transfer | None = None
    send_from_buffer: bool = False
    grad_send: Transfer | None = None
    grad_recv: Transfer | None = None

    @property
    def work(self) -> int:
        return sum(s.work for s in self.segments)


@dataclass(frozen=True)
class RankPlan:
    """One rank's steps for comm shape ``comm``; ``window``: the sliding window it was planned for (None: none)."""

    rank: int
    cp_size: int
    comm: str
    local_tokens: int
    steps: tuple[Step, ...]
    window: int | None = None

    @property
    def work(self) -> int:
        return sum(s.work for s in self.steps)

    @property
    def kv_recv_tokens(self) -> int:
        return sum(s.recv.tokens for s in self.steps if s.recv)

    @property
    def kv_send_tokens(self) -> int:
        return sum(s.send.tokens for s in self.steps if s.send)

    @property
    def num_segments(self) -> int:
        """Block pairs given to the kernel over all steps (per pass)."""
        return sum(len(s.segments) for s in self.steps)

    @property
    def grad_send_tokens(self) -> int:
        """KV rows whose fp32 dK/dV partial this rank returns to their owners (backward)."""
        return sum(s.grad_send.tokens for s in self.steps if s.grad_send)

    @property
    def grad_recv_tokens(self) -> int:
        """Own KV rows whose fp32 dK/dV partials arrive from the ranks that read them (backward)."""
        return sum(s.grad_recv.tokens for s in self.steps if s.grad_recv)

    @property
    def max_recv_tokens(self) -> int:
        return max((s.recv.tokens for s in self.steps if s.recv), default=0)

    def __repr__(self) -> str:
        window = f", window={self.window}" if self.window is not None else ""
        return (
            f"RankPlan(rank={self.rank}, comm={self.comm!r}{window}, steps={len(self.steps)}, "
            f"local_tokens={self.local_tokens}, work={self.work}, kv_recv_tokens={self.kv_recv_tokens})"
        )


@dataclass(frozen=True)
class PlanStats:
    """Exact per-rank accounting of a plan (lists indexed by rank).

    work: unmasked score entries per head. pairs_computed / pairs_skipped: (q piece, KV piece)
    pairs of the same sample with / without an unmasked entry (a dense ring computes all).
    kv_recv_tokens / kv_send_tokens: KV tokens per rank over the forward pass;
    kv_recv_per_step[r][i] / kv_send_per_step[r][i]: tokens rank r receives / sends at
    ``step_distances[i]``. grad_send_tokens / grad_recv_tokens: KV rows whose fp32 dK/dV partial
    a rank returns / receives in backward. segments: block pairs given to the kernel per pass.
    Bytes: tokens times :meth:`kv_bytes_per_token` (backward replays the forward KV exchange and
    returns fp32 dK/dV for the rows read).
    """

    comm: str
    cp_size: int
    tokens: tuple[int, ...]
    work: tuple[int, ...]
    pairs_computed: tuple[int, ...]
    pairs_skipped: tuple[int, ...]
    kv_recv_tokens: tuple[int, ...]
    kv_send_tokens: tuple[int, ...]
    step_distances: tuple[int, ...]
    kv_recv_per_step: tuple[tuple[int, ...], ...]
    kv_send_per_step: tuple[tuple[int, ...], ...]
    grad_send_tokens: tuple[int, ...] = ()
    grad_recv_tokens: tuple[int, ...] = ()
    segments: tuple[int, ...] = ()
    window: int | None = None

    @property
    def num_steps(self) -> int:
        """Steps with an exchange (step 0 is local)."""
        return sum(1 for d in self.step_distances if d > 0)

    @property
    def total_work(self) -> int:
        return sum(self.work)

    @property
    def imbalance(self) -> float:
        """Busiest rank's work over the mean work (1.0 is perfect)."""
        mean = self.total_work / self.cp_size
        return max(self.work) / mean if mean else 1.0

    @staticmethod
    def kv_bytes_per_token(num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Bytes of one KV token: a K row and a V row of ``num_kv_heads * head_dim`` elements."""
        return 2 * num_kv_heads * head_dim * itemsize

    def kv_bytes(self, rank: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Forward KV bytes received by ``rank``."""
        return self.kv_recv_tokens[rank] * self.kv_bytes_per_token(num_kv_heads, head_dim, itemsize)

    def __repr__(self) -> str:
        window = f", window={self.window}" if self.window is not None else ""
        return (
            f"PlanStats(comm={self.comm!r}{window}, cp={self.cp_size}, steps={self.num_steps}, "
            f"imbalance={self.imbalance:.3f}, "
            f"work={list(self.work)}, kv_recv_tokens={list(self.kv_recv_tokens)}, "
            f"pairs_skipped={list(self.pairs_skipped)})"
        )


@dataclass(frozen=True)
class Plan:
    comm: str
    ranks: tuple[RankPlan, ...]
    stats: PlanStats = field(repr=True)

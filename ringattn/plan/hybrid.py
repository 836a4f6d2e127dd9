"""Hybrid (Ulysses x ring) accounting: the head split rule and exact bytes per CP rank.

With ``ulysses_size = U`` every CP rank runs, per attention call:

* forward: one all-to-all of q, k and v (heads scattered over the ``U`` Ulysses ranks, the
  ring rank's tokens gathered), the ring plan of ``layout.ring_layout`` over the ``R`` ring
  ranks on its ``Hq/U`` query heads, one all-to-all of the output back;
* backward: the mirror (one all-to-all of dout, the ring backward, one of dq/dk/dv).

An all-to-all moves, from every rank to each of its ``U - 1`` peers, the rank's tokens times the
peer's share of the heads, so sent and received bytes are equal. Bytes are exact for the
implementation in :mod:`ringattn.comm.a2a` and :mod:`ringattn.comm.executor`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .types import PlanStats

__all__ = ["ulysses_heads", "CPStats", "cp_stats"]


def ulysses_heads(heads: int, kv_heads: int, ulysses_size: int) -> tuple[int, int, int]:
    """``(query heads, KV heads, KV replication)`` per Ulysses rank for ``ulysses_size`` ranks.

    ``heads % ulysses_size == 0`` is required. KV heads are split when ``kv_heads %
    ulysses_size == 0``; otherwise, when ``ulysses_size % kv_heads == 0``, each KV head is
    replicated ``ulysses_size // kv_heads`` times before the all-to-all (one KV head per rank;
    the replicas' dK/dV are summed back); otherwise ``ValueError``.
    """
    u = ulysses_size
    if heads % u:
        raise ValueError(f"heads: q heads ({heads}) must be a multiple of ulysses_size={u}")
    if kv_heads % u == 0:
        return heads // u, kv_heads // u, 1
    if u % kv_heads == 0:
        return heads // u, 1, u // kv_heads
    raise ValueError(f"heads: k/v heads ({kv_heads}) must be a multiple or a divisor of ulysses_size={u} "
                     "(split or replicated over the Ulysses ranks)")


@dataclass(frozen=True)
class CPStats:
    """Exact per-CP-rank accounting of one attention call (tuples indexed by CP rank).

    ring: the ring plan's :class:`PlanStats` (indexed by ring rank). heads / kv_heads: the
    model's; ``kv_heads_per_rank`` KV heads travel around each ring (replicated ones
    included). tokens: local tokens. work: unmasked score entries times query heads.
    a2a_fwd_bytes: bytes a rank sends to (= receives from) its Ulysses peers in the forward
    all-to-alls (q/k/v in, output back); a2a_bwd_bytes: backward (dout in, dq/dk/dv back; the
    dK/dV of replicated KV heads travel in fp32).
    ring_fwd_bytes: KV bytes a rank receives over the ring in forward; ring_bwd_bytes:
    backward (the KV exchange replayed, plus the fp32 dK/dV partials of its rows coming back).
    """

    comm: str
    ulysses_size: int
    ring_size: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    kv_heads_per_rank: int
    kv_replication: int
    ring: PlanStats
    tokens: tuple[int, ...]
    work: tuple[int, ...]
    a2a_fwd_bytes: tuple[int, ...]
    a2a_bwd_bytes: tuple[int, ...]
    ring_fwd_bytes: tuple[int, ...]
    ring_bwd_bytes: tuple[int, ...]

    @property
    def cp_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def num_steps(self) -> int:
        """Ring exchange steps (the all-to-alls are two more phases in each direction when ``U > 1``)."""
        return self.ring.num_steps

    @property
    def imbalance(self) -> float:
        """Busiest rank's work over the mean (Ulysses ranks of a ring rank share its work evenly)."""
        return self.ring.imbalance

    @property
    def fwd_bytes(self) -> tuple[int, ...]:
        return tuple(a + r for a, r in zip(self.a2a_fwd_bytes, self.ring_fwd_bytes))

    @property
    def total_bytes(self) -> tuple[int, ...]:
        """Forward plus backward bytes received per rank (all-to-all and ring)."""
        return tuple(a + b + c + d for a, b, c, d in
                     zip(self.a2a_fwd_bytes, self.a2a_bwd_bytes, self.ring_fwd_bytes, self.ring_bwd_bytes))

    def __repr__(self) -> str:
        return (f"CPStats(comm={self.comm!r}, ulysses={self.ulysses_size}, ring={self.ring_size}, "
                f"imbalance={self.imbalance:.3f}, steps={self.num_steps}, a2a_fwd_bytes={list(self.a2a_fwd_bytes)}, "
                f"ring_fwd_bytes={list(self.ring_fwd_bytes)})")


def cp_stats(layout, heads: int, kv_heads: int, head_dim: int, itemsize: int, comm: str) -> CPStats:
    """:class:`CPStats` of ``layout`` (any ``ulysses_size``) for the given heads and element size."""
    from .build import build_plan

    u, r = layout.ulysses_size, layout.ring_size
    if heads % kv_heads:
        raise ValueError(f"heads: q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    hq, hkv, rep = ulysses_heads(heads, kv_heads, u)
    plan = build_plan(layout.ring_layout, comm)
    st = plan.stats
    row = head_dim * itemsize
    kv_row = PlanStats.kv_bytes_per_token(hkv, head_dim, itemsize)
    grad_row = PlanStats.kv_bytes_per_token(hkv, head_dim, 4)  # dK/dV partials travel in fp32
    # replicated KV heads send their dK/dV back in fp32 (summed after the all-to-all, see ringattn.attention)
    kv_grad_row = head_dim * (4 if rep > 1 else itemsize)
    tokens, work, a2a, a2a_b, ring_f, ring_b = [], [], [], [], [], []
    for c in range(layout.cp_size):
        rr, _ = divmod(c, u)
        n = layout.local_tokens(c)
        tokens.append(n)
        work.append(st.work[rr] * hq)
        # to each of the U-1 peers: q, k, v heads of the peer's share in, output heads of mine back
        a2a.append((u - 1) * n * ((hq + 2 * hkv) + hq) * row)
        a2a_b.append((u - 1) * n * (2 * hq * row + 2 * hkv * kv_grad_row))  # dout in; dq, dk, dv back
        ring_f.append(st.kv_recv_tokens[rr] * kv_row)
        grads = sum(s.grad_recv.tokens for s in plan.ranks[rr].steps if s.grad_recv)
        ring_b.append(st.kv_recv_tokens[rr] * kv_row + grads * grad_row)
    return CPStats(comm, u, r, heads, kv_heads, head_dim, itemsize, hkv, rep, st, tuple(tokens), tuple(work),
                   tuple(a2a), tuple(a2a_b), tuple(ring_f), tuple(ring_b))

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

from ..ranges import PieceLayout
from .build import build_plan
from .types import PlanStats

__all__ = ["ulysses_heads", "CPStats", "cp_stats"]


def ulysses_heads(heads: int, kv_heads: int, ulysses_size: int) -> tuple[int, int, int]:
    """``(query heads, KV heads, KV replication)`` per Ulysses rank for ``ulysses_size`` ranks.

    ``heads % ulysses_size == 0`` is required. KV heads are split when ``kv_heads %
    ulysses_size == 0``; otherwise, when ``ulysses_size % kv_heads == 0``, each KV head is
    replicated ``ulysses_size // kv_heads`` times before the all-to-all (one KV head per rank;
    the replicas' dK/dV are summed back); otherwise ``ValueError``.

    >>> ulysses_heads(32, 8, 4)     # Llama-3-8B-like heads over 4 Ulysses ranks: KV heads split
    (8, 2, 1)
    >>> ulysses_heads(32, 8, 16)    # 16 ranks: each KV head replicated twice, one per rank
    (2, 1, 2)
    """
    u = ulysses_size
    if heads % u:
        raise ValueError(
            f"heads: q heads ({heads}) must be a multiple of ulysses_size={u}; use a Ulysses size that "
            "divides the query heads (the all-to-all scatters heads)"
        )
    if kv_heads % u == 0:
        return heads // u, kv_heads // u, 1
    if u % kv_heads == 0:
        return heads // u, 1, u // kv_heads
    raise ValueError(
        f"heads: k/v heads ({kv_heads}) must be a multiple or a divisor of ulysses_size={u} "
        "(split or replicated over the Ulysses ranks); use a Ulysses size that divides, or is a multiple "
        "of, the KV heads"
    )


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
    node_size: CP ranks per node (0: not given); inter_fwd_bytes / inter_bwd_bytes: the part of
    the above (all-to-all and ring) a rank receives from peers on other nodes.
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
    node_size: int = 0
    inter_fwd_bytes: tuple[int, ...] = ()
    inter_bwd_bytes: tuple[int, ...] = ()

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
        return tuple(
            a + b + c + d
            for a, b, c, d in zip(self.a2a_fwd_bytes, self.a2a_bwd_bytes, self.ring_fwd_bytes, self.ring_bwd_bytes)
        )

    @property
    def inter_total_bytes(self) -> tuple[int, ...]:
        """Forward plus backward bytes received from other nodes per rank (0 without ``node_size``)."""
        return tuple(a + b for a, b in zip(self.inter_fwd_bytes, self.inter_bwd_bytes))

    def __repr__(self) -> str:
        return (
            f"CPStats(comm={self.comm!r}, ulysses={self.ulysses_size}, ring={self.ring_size}, "
            f"imbalance={self.imbalance:.3f}, steps={self.num_steps}, a2a_fwd_bytes={list(self.a2a_fwd_bytes)}, "
            f"ring_fwd_bytes={list(self.ring_fwd_bytes)})"
        )


def cp_stats(
    layout: PieceLayout,
    heads: int,
    kv_heads: int,
    head_dim: int,
    itemsize: int,
    comm: str,
    node_size: int | None = None,
    window: int | None = None,
) -> CPStats:
    """:class:`CPStats` of ``layout`` (any ``ulysses_size``) for the given heads and element size.

    node_size: CP ranks per node (consecutive CP ranks share a node); bytes from a peer on
    another node are counted in ``inter_fwd_bytes`` / ``inter_bwd_bytes`` (all 0 without it).
    window: a sliding window (the ring plan's, see :func:`ringattn.plan.build_plan`).
    """
    u, r = layout.ulysses_size, layout.ring_size
    if heads % kv_heads:
        raise ValueError(
            f"heads: q heads ({heads}) must be a multiple of k/v heads ({kv_heads}); pass the model's "
            "num_attention_heads and num_key_value_heads"
        )
    if node_size is not None and (not isinstance(node_size, int) or node_size < 1):
        raise ValueError(f"node_size: expected a positive int, got {node_size!r}; pass the CP ranks per node, or None")
    hq, hkv, rep = ulysses_heads(heads, kv_heads, u)
    plan = build_plan(layout.ring_layout, comm, window)
    st = plan.stats
    row = head_dim * itemsize
    kv_row = PlanStats.kv_bytes_per_token(hkv, head_dim, itemsize)
    grad_row = PlanStats.kv_bytes_per_token(hkv, head_dim, 4)  # dK/dV partials travel in fp32
    # replicated KV heads send their dK/dV back in fp32 (summed after the all-to-all, see ringattn.attention)
    kv_grad_row = head_dim * (4 if rep > 1 else itemsize)

    def remote(a: int, b: int) -> bool:
        return node_size is not None and a // node_size != b // node_size

    cols = {k: [] for k in ("tokens", "work", "a2a_f", "a2a_b", "ring_f", "ring_b", "inter_f", "inter_b")}
    for c in range(layout.cp_size):
        rr, uu = divmod(c, u)
        n = layout.local_tokens(c)
        # from each of the U-1 peers: its tokens of my q/k/v heads in, my tokens of its output heads back;
        # backward: dout in, dq and dk/dv back
        per_peer_f = n * ((hq + 2 * hkv) + hq) * row
        per_peer_b = n * (2 * hq * row + 2 * hkv * kv_grad_row)
        far = sum(1 for j in range(u) if j != uu and remote(c, rr * u + j))
        ring_f = ring_b = inter_f = inter_b = 0
        for step in plan.ranks[rr].steps:  # ring peers are ring ranks; the CP rank is peer * U + my Ulysses rank
            if step.recv:
                b = step.recv.tokens * kv_row
                ring_f, ring_b = ring_f + b, ring_b + b  # backward replays the forward exchange
                if remote(c, step.recv.peer * u + uu):
                    inter_f, inter_b = inter_f + b, inter_b + b
            if step.grad_recv:
                b = step.grad_recv.tokens * grad_row
                ring_b += b
                inter_b += b if remote(c, step.grad_recv.peer * u + uu) else 0
        for key, val in (
            ("tokens", n),
            ("work", st.work[rr] * hq),
            ("a2a_f", (u - 1) * per_peer_f),
            ("a2a_b", (u - 1) * per_peer_b),
            ("ring_f", ring_f),
            ("ring_b", ring_b),
            ("inter_f", inter_f + far * per_peer_f),
            ("inter_b", inter_b + far * per_peer_b),
        ):
            cols[key].append(val)
    t = {k: tuple(v) for k, v in cols.items()}
    return CPStats(
        comm,
        u,
        r,
        heads,
        kv_heads,
        head_dim,
        itemsize,
        hkv,
        rep,
        st,
        t["tokens"],
        t["work"],
        t["a2a_f"],
        t["a2a_b"],
        t["ring_f"],
        t["ring_b"],
        node_size or 0,
        t["inter_f"],
        t["inter_b"],
    )

"""The cost model: prices a layout's forward + backward attention from its plan's exact counts (see
:mod:`ringattn.cost`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .._validate import positive_int
from ..plan import DEFAULT_COMM, CPStats, PlanStats, build_plan, cp_stats, ulysses_heads
from ..ranges import PieceLayout
from .profiles import DEFAULT_PROFILE, HardwareProfile, preset

__all__ = [
    "CostModel",
    "Prediction",
    "default_cost_model",
    "flops_per_entry",
    "FWD_BWD_FACTOR",
    "A2A_PER_LAYER",
    "EXCHANGES_PER_STEP",
]


def flops_per_entry(num_heads: int, head_dim: int) -> int:
    """Forward FLOPs of one unmasked score entry over all query heads (QK^T and PV)."""
    return 4 * head_dim * num_heads


#: forward + backward compute over forward compute
FWD_BWD_FACTOR = 3.5


#: forward + backward all-to-alls of a hybrid layer (q/k/v in, output back, d(output) in, dq/dk/dv back)
A2A_PER_LAYER = 4
#: small exchanges in ``profile.latency`` (forward KV, backward KV, dK/dV per ring step); one all-to-all counts as one
EXCHANGES_PER_STEP = 3


@dataclass(frozen=True)
class Prediction:
    """The model's per-rank and step-level prediction (seconds; tuples indexed by CP rank).

    comm_s, bytes_in, bytes_out: the ring's KV exchange (P2P); a2a_s, a2a_bytes: the
    all-to-alls of a hybrid layout (bytes a rank sends to, = receives from, its Ulysses peers,
    forward + backward; all 0 for a pure ring). time_s includes both. steps: ring exchange steps.
    """

    comm: str
    compute_s: tuple[float, ...]
    comm_s: tuple[float, ...]
    time_s: tuple[float, ...]
    bytes_in: tuple[int, ...]
    bytes_out: tuple[int, ...]
    steps: int
    step_s: float
    ideal_s: float
    efficiency: float
    ulysses_size: int = 1
    a2a_s: tuple[float, ...] = ()
    a2a_bytes: tuple[int, ...] = ()

    @property
    def busiest(self) -> int:
        """The rank that sets the step time (lowest rank on ties)."""
        return max(range(len(self.time_s)), key=lambda r: (self.time_s[r], -r))

    @property
    def ring_size(self) -> int:
        return len(self.time_s) // self.ulysses_size

    def __repr__(self) -> str:
        b = self.busiest
        split = f", {self.ulysses_size}x{self.ring_size}" if self.ulysses_size > 1 else ""
        a2a = f", all-to-all {self.a2a_s[b] * 1e3:.3f} ms" if self.ulysses_size > 1 else ""
        return (
            f"Prediction(comm={self.comm!r}{split}, step={self.step_s * 1e3:.3f} ms, "
            f"efficiency={self.efficiency:.3f}, "
            f"busiest rank {b}: compute {self.compute_s[b] * 1e3:.3f} ms, comm {self.comm_s[b] * 1e3:.3f} ms{a2a}, "
            f"steps {self.steps})"
        )


def _spans_nodes(ranks, node_size: int) -> bool:
    return len({c // node_size for c in ranks}) > 1


@dataclass(frozen=True)
class CostModel:
    """Prices a layout's forward + backward attention (the model is stated in :mod:`ringattn.cost`).

    profile: a :class:`HardwareProfile` or a preset name. num_heads / num_kv_heads / head_dim /
    dtype: the attention shape (defaults: Hq=32, Hkv=8, D=128, bfloat16).
    """

    profile: HardwareProfile | str = field(default_factory=lambda: DEFAULT_PROFILE)
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype | str = torch.bfloat16

    def __post_init__(self):
        prof = self.profile
        if isinstance(prof, str):
            prof = preset(prof)
        if not isinstance(prof, HardwareProfile):
            raise ValueError(
                f"profile: expected a HardwareProfile or a preset name, got {type(prof).__name__}; pass "
                "a name of ringattn.cost.PRESETS or HardwareProfile.load(path)"
            )
        object.__setattr__(self, "profile", prof)
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"heads: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); pass your model's attention heads and KV heads"
            )
        dt = self.dtype
        if isinstance(dt, str):
            dt = getattr(torch, dt, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(
                f"dtype: expected a floating torch dtype or its name, got {self.dtype!r}; pass e.g. "
                "torch.bfloat16 or 'bfloat16'"
            )
        object.__setattr__(self, "dtype", dt)

    # ------------------------------------------------------------------ unit prices
    @property
    def seconds_per_entry(self) -> float:
        """Forward + backward seconds of one unmasked score entry (all heads)."""
        return FWD_BWD_FACTOR * flops_per_entry(self.num_heads, self.head_dim) / self.profile.flops

    @property
    def kv_bytes_per_token(self) -> int:
        return PlanStats.kv_bytes_per_token(self.num_kv_heads, self.head_dim, self.dtype.itemsize)

    @property
    def grad_bytes_per_token(self) -> int:
        """fp32 dK/dV bytes of one KV token."""
        return PlanStats.kv_bytes_per_token(self.num_kv_heads, self.head_dim, 4)

    def rank_seconds(
        self, work: int, kv_recv: int, kv_send: int, grad_recv: int, grad_send: int, steps: int, segments: int = 0
    ) -> tuple[float, float, float]:
        """``(compute, communication, time)`` seconds of one rank from its exact counts."""
        compute = work * self.seconds_per_entry + segments * self.profile.segment_overhead
        kvb, gb = self.kv_bytes_per_token, self.grad_bytes_per_token
        comm = max(2 * kv_recv * kvb + grad_recv * gb, 2 * kv_send * kvb + grad_send * gb) / self.profile.p2p_bandwidth
        return compute, comm, max(compute, comm) + steps * self.profile.latency

    # ------------------------------------------------------------------ hybrid
    def ring_bandwidth(self, ulysses_size: int = 1, cp_size: int | None = None) -> float:
        """Bytes/s of the ring's exchange in a ``ulysses_size x (cp_size / ulysses_size)`` split:
        ``p2p_bandwidth``, or on a two-level profile ``a2a_bandwidth`` (the node's link) when
        every ring lies on one node (see :mod:`ringattn.cost`)."""
        prof = self.profile
        if not prof.node_size:
            return prof.p2p_bandwidth
        u, r = self._split(ulysses_size, cp_size)
        if any(_spans_nodes(range(j, u * r, u), prof.node_size) for j in range(u)):
            return prof.p2p_bandwidth
        return prof.all_to_all_bandwidth

    def ring_model(self, ulysses_size: int = 1, cp_size: int | None = None) -> CostModel:
        """The model of the ring that every Ulysses rank runs in a ``ulysses_size x (cp_size /
        ulysses_size)`` split: ``Hq/U`` query heads, the KV heads each rank carries after split
        or replication (:func:`ringattn.plan.ulysses_heads`), and the ring's link
        (:meth:`ring_bandwidth`) as a one-level profile. ``self`` for a pure ring on a one-level
        profile. ``ValueError`` if the heads cannot be split over ``ulysses_size`` ranks.
        ``cp_size`` is needed with a two-level profile (``profile.node_size > 0``) only.
        """
        u, _ = self._split(ulysses_size, cp_size, need_cp=False)
        if u == 1 and not self.profile.node_size:
            return self
        try:
            hq, hkv, _ = ulysses_heads(self.num_heads, self.num_kv_heads, u)
        except ValueError as exc:
            raise ValueError(
                f"cost: the model's heads (num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}) "
                f"cannot run ulysses_size={u}: {exc}; price it with a CostModel of your model's "
                "heads"
            ) from exc
        prof = replace(self.profile, p2p_bandwidth=self.ring_bandwidth(u, cp_size), node_size=0)
        return CostModel(prof, hq, hkv, self.head_dim, self.dtype)

    def a2a_seconds(self, nbytes: int, near_peers: int, far_peers: int) -> float:
        """Seconds of all-to-all traffic of ``nbytes`` a rank sends to (= receives from)
        ``near_peers`` Ulysses peers on its node and ``far_peers`` on other nodes, equal bytes to
        each (see :mod:`ringattn.cost`; on a one-level profile every peer is near)."""
        prof = self.profile
        peers = near_peers + far_peers
        if not peers:
            return 0.0
        near, far = nbytes * near_peers / peers, nbytes * far_peers / peers
        return max(near / prof.all_to_all_bandwidth, far / prof.p2p_bandwidth)

    def _split(self, ulysses_size, cp_size, need_cp=True) -> tuple[int, int]:
        positive_int("ulysses_size", ulysses_size)
        if cp_size is None:
            if need_cp and self.profile.node_size:
                raise ValueError(
                    f"cp_size: needed to price a split on the two-level profile {self.profile.name!r} "
                    f"(node_size={self.profile.node_size}); pass cp_size="
                )
            return ulysses_size, 0
        if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1 or cp_size % ulysses_size:
            raise ValueError(f"cp_size: expected a positive multiple of ulysses_size={ulysses_size}, got {cp_size!r}")
        return ulysses_size, cp_size // ulysses_size

    # ------------------------------------------------------------------ predictions
    def predict_stats(self, stats: PlanStats) -> Prediction:
        """The prediction from a plan's exact accounting (a pure ring of ``stats.cp_size`` ranks on
        ``p2p_bandwidth``; :meth:`predict` takes the node size into account)."""
        cp = stats.cp_size
        grad_recv = stats.grad_recv_tokens or (0,) * cp
        grad_send = stats.grad_send_tokens or (0,) * cp
        segments = stats.segments or (0,) * cp
        per = [
            self.rank_seconds(
                stats.work[r],
                stats.kv_recv_tokens[r],
                stats.kv_send_tokens[r],
                grad_recv[r],
                grad_send[r],
                stats.num_steps,
                segments[r],
            )
            for r in range(cp)
        ]
        kvb, gb = self.kv_bytes_per_token, self.grad_bytes_per_token
        compute = tuple(p[0] for p in per)
        step = max(p[2] for p in per)
        ideal = sum(compute) / cp
        return Prediction(
            comm=stats.comm,
            compute_s=compute,
            comm_s=tuple(p[1] for p in per),
            time_s=tuple(p[2] for p in per),
            bytes_in=tuple(2 * stats.kv_recv_tokens[r] * kvb + grad_recv[r] * gb for r in range(cp)),
            bytes_out=tuple(2 * stats.kv_send_tokens[r] * kvb + grad_send[r] * gb for r in range(cp)),
            steps=stats.num_steps,
            step_s=step,
            ideal_s=ideal,
            efficiency=ideal / step if step > 0 else 1.0,
            a2a_s=(0.0,) * cp,
            a2a_bytes=(0,) * cp,
        )

    def predict_cp_stats(self, st: CPStats) -> Prediction:
        """The prediction of a (hybrid) layout from its exact per-CP-rank accounting
        (:func:`ringattn.plan.cp_stats` with this model's heads, head dim and dtype)."""
        if (st.heads, st.kv_heads, st.head_dim, st.itemsize) != (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.dtype.itemsize,
        ):
            raise ValueError(
                f"stats: counted for Hq={st.heads} Hkv={st.kv_heads} D={st.head_dim} itemsize "
                f"{st.itemsize}, the model has Hq={self.num_heads} Hkv={self.num_kv_heads} "
                f"D={self.head_dim} itemsize {self.dtype.itemsize}"
            )
        u, cp = st.ulysses_size, st.cp_size
        ring = self.ring_model(u, cp).predict_stats(st.ring)  # per ring rank, on Hq/U heads and the ring's link
        n = self.profile.node_size
        a2a_bytes = tuple(f + b for f, b in zip(st.a2a_fwd_bytes, st.a2a_bwd_bytes))
        a2a, time = [], []
        fixed = A2A_PER_LAYER * self.profile.latency / EXCHANGES_PER_STEP if u > 1 else 0.0
        for c in range(cp):
            rr, j = divmod(c, u)
            far = sum(1 for k in range(u) if k != j and n and (rr * u + k) // n != c // n)
            a2a.append(self.a2a_seconds(a2a_bytes[c], u - 1 - far, far) + fixed)
            time.append(ring.time_s[rr] + a2a[-1])
        per = lambda xs: tuple(xs[c // u] for c in range(cp))  # noqa: E731  ring rank -> its U CP ranks
        compute = per(ring.compute_s)
        step = max(time)
        ideal = sum(compute) / cp
        return Prediction(
            comm=st.comm,
            compute_s=compute,
            comm_s=per(ring.comm_s),
            time_s=tuple(time),
            bytes_in=per(ring.bytes_in),
            bytes_out=per(ring.bytes_out),
            steps=ring.steps,
            step_s=step,
            ideal_s=ideal,
            efficiency=ideal / step if step > 0 else 1.0,
            ulysses_size=u,
            a2a_s=tuple(a2a),
            a2a_bytes=a2a_bytes,
        )

    def predict(self, layout: PieceLayout, comm: str | None = None, window: int | None = None) -> Prediction:
        """Per-CP-rank compute, exchange, all-to-all (hybrid layouts) and predicted seconds of
        ``layout`` with plan shape ``comm`` (default: the library's default), and the step's time
        and efficiency, under a sliding ``window`` (its exact work and traffic). ``ValueError`` if the model's
        heads cannot be split over the layout's ``ulysses_size``."""
        if not isinstance(layout, PieceLayout):
            raise ValueError(
                f"layout: expected a DocLayout, got {type(layout).__name__}; build one with DocLayout.from_cu_seqlens"
            )
        comm = comm or DEFAULT_COMM
        if layout.ulysses_size == 1 and not self.profile.node_size:
            return self.predict_stats(build_plan(layout, comm, window).stats)
        self.ring_model(layout.ulysses_size, layout.cp_size)  # the heads' ValueError names the model
        return self.predict_cp_stats(
            cp_stats(layout, self.num_heads, self.num_kv_heads, self.head_dim, self.dtype.itemsize, comm, window=window)
        )


def default_cost_model(ulysses_size: int = 1) -> CostModel:
    """The model ``strategy="auto"`` uses without ``cost``: :data:`DEFAULT_PROFILE`, Hq=32, Hkv=8, D=128, bf16.

    For a Ulysses size those heads cannot split (``ulysses_size`` not dividing 32, or not a
    multiple or divisor of 8), Hq = 4 x ``ulysses_size`` and Hkv = ``ulysses_size``: the same 4:1
    grouping, one KV head per Ulysses rank.
    """
    try:
        ulysses_heads(32, 8, ulysses_size)
    except ValueError:
        return CostModel(DEFAULT_PROFILE, 4 * ulysses_size, ulysses_size)
    return CostModel(DEFAULT_PROFILE)

"""A cost model for one attention layer's forward + backward under a layout and plan shape.

:class:`HardwareProfile` holds the few numbers the model needs: the sustained attention kernel
rate and the link bandwidths (a few named presets, with their sources, or measured on this
machine with ``python -m ringattn.cost --calibrate``). :class:`CostModel` adds the attention
shape (heads, KV heads, head dim, dtype) and prices a layout:

* compute (forward + backward) = 3.5 x forward FLOPs, forward FLOPs = ``4 * head_dim * num_heads``
  per unmasked score entry (the plan's exact work: QK^T and PV, 2 FLOPs per multiply-add each;
  backward ~2.5x forward: dQ, dK, dV and the recomputed scores), at ``profile.flops``;
* communication = the forward KV exchange + its replay in backward + the fp32 dK/dV partials
  returned for the rows read, at ``profile.p2p_bandwidth`` bytes/s per rank and direction: a
  rank's link time is ``max(bytes in, bytes out) / p2p_bandwidth`` with
  bytes in = 2 x KV received + fp32 dK/dV arriving for its own KV, and
  bytes out = 2 x KV sent + fp32 dK/dV it returns (bf16 KV: about 4x the forward KV bytes for a
  rank that sends as much as it receives);
* a rank's time = ``max(compute, communication) + steps * latency`` (the exchange of the next
  step is overlapped with the current step's compute, as the executor does); the step's time
  is the busiest rank's; efficiency = ideal / step time with ideal = total compute / CP.

One optional term goes beyond that default: ``profile.segment_overhead`` seconds per block pair
given to the kernel (fixed per-segment cost: a kernel call or a partly filled tile), added to a
rank's compute. It is 0 in the presets, so the default model is exactly the one above;
``--calibrate`` measures it, which matters on CPU, where every segment is a separate kernel call.

All counts come from the plan (:class:`ringattn.plan.PlanStats`), exact for every comm shape.

Hybrid Ulysses x ring layouts (``ulysses_size = U > 1``, ``R = cp / U`` ring ranks), per CP rank
``c = ring_rank * U + ulysses_rank``:

* compute = its ring rank's work (the ring plan of ``layout.ring_layout``) on ``Hq/U`` query
  heads: the ``U`` Ulysses ranks of a ring rank share its work equally (each runs all of it on
  its share of the heads); the per-segment overhead counts the ring rank's segments;
* the ring exchange is priced as above on the KV heads each Ulysses rank carries around its
  ring (``Hkv/U`` when split, 1 when replicated: :func:`ringattn.plan.ulysses_heads`); ``R = 1``
  (pure Ulysses) has no exchange and no ring steps;
* all-to-all = the bytes a rank sends to (= receives from) its ``U - 1`` Ulysses peers, forward
  (q/k/v in, output back) and backward (d(output) in, dq/dk/dv back, the dK/dV of replicated KV
  heads in fp32), exactly :class:`ringattn.plan.CPStats`' ``a2a_fwd_bytes + a2a_bwd_bytes``, at
  ``profile.a2a_bandwidth`` bytes/s per rank (``p2p_bandwidth`` when it is ``None``). The
  all-to-alls sit before and after the ring in both passes and overlap nothing (as in the
  implementation), so they are *added*:
  ``time = max(compute, ring exchange) + ring steps * latency + all-to-all + 4 * latency / 3``
  (four all-to-alls per forward + backward, each charged one small exchange: ``latency`` is three
  per ring step, see ``--calibrate``). With ``U = 1`` this is exactly the ring model above.

Two-level clusters (``profile.node_size = n > 0``: ``n`` consecutive CP ranks per node):
``a2a_bandwidth`` is then the link *inside* a node (NVLink, HCCS) and ``p2p_bandwidth`` the link
*between* nodes (InfiniBand, RoCE). An all-to-all's bytes to peers on the rank's node move at
``a2a_bandwidth``, those to other nodes at ``p2p_bandwidth``, concurrently (its time is the larger
of the two); a ring whose ranks lie on one node exchanges at ``a2a_bandwidth``, a ring that spans
nodes at ``p2p_bandwidth`` (its steps are synchronised and every step of every comm shape has a
transfer that crosses nodes, which gates it). ``node_size = 0`` (the default, all presets but the
``*-nvlink-ib400`` ones) is one level: the ring at ``p2p_bandwidth``, all-to-alls at
``a2a_bandwidth``. The two-level rule assumes a switched node (NVSwitch: a rank's bandwidth does
not depend on how many peers it talks to); calibrate a full-mesh node (HCCS) with the all-to-all
over the ranks you will use as Ulysses group (``--calibrate --node-size``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from .layout import DocLayout
from .plan import DEFAULT_COMM, CPStats, PlanStats, build_plan, ulysses_heads

__all__ = ["HardwareProfile", "CostModel", "Prediction", "PRESETS", "DEFAULT_PROFILE", "preset", "default_cost_model",
           "flops_per_entry"]


def _positive(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class HardwareProfile:
    """What the cost model needs to know of the hardware.

    flops: sustained attention kernel rate in FLOP/s, forward + backward counted as 3.5x the
        forward FLOPs (what ``--calibrate`` measures with the selected kernel backend).
    p2p_bandwidth: point-to-point bytes/s per rank and direction (the KV exchange); with
        ``node_size > 0``: between nodes.
    a2a_bandwidth: all-to-all bytes/s per rank (hybrid Ulysses x ring CP; ``None``: as P2P); with
        ``node_size > 0``: inside a node.
    latency: fixed seconds per exchange step of a forward + backward pass.
    name, source: a label and where the figures come from.
    segment_overhead: fixed seconds per block pair given to the kernel (forward + backward);
        0 in the presets (the default model), measured by ``--calibrate``.
    node_size: CP ranks per node of a two-level cluster (consecutive CP ranks share a node);
        0 (default): one level. See :mod:`ringattn.cost` for how each link is priced.
    """

    flops: float
    p2p_bandwidth: float
    a2a_bandwidth: float | None = None
    latency: float = 0.0
    name: str = "custom"
    source: str = ""
    segment_overhead: float = 0.0
    node_size: int = 0

    def __post_init__(self):
        object.__setattr__(self, "flops", _positive("flops", self.flops))
        object.__setattr__(self, "p2p_bandwidth", _positive("p2p_bandwidth", self.p2p_bandwidth))
        object.__setattr__(self, "a2a_bandwidth", _positive("a2a_bandwidth", self.a2a_bandwidth, allow_none=True))
        for name in ("latency", "segment_overhead"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.name, str) or not isinstance(self.source, str):
            raise ValueError("name/source: expected strings")
        if isinstance(self.node_size, bool) or not isinstance(self.node_size, int) or self.node_size < 0:
            raise ValueError(f"node_size: expected an int >= 0 (0: one-level cluster), got {self.node_size!r}")

    @property
    def all_to_all_bandwidth(self) -> float:
        """``a2a_bandwidth``, or the P2P bandwidth where none is given."""
        return self.a2a_bandwidth if self.a2a_bandwidth is not None else self.p2p_bandwidth

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> "HardwareProfile":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (expected some of {sorted(known)})")
        missing = [k for k in ("flops", "p2p_bandwidth") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        return cls(**data)

    @classmethod
    def load(cls, path) -> "HardwareProfile":
        """A profile from a JSON file (as ``python -m ringattn.cost --calibrate`` writes)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as exc:
            raise ValueError(f"profile: cannot read {path!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile: {path!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, where=f"profile {path}")


_NVLINK = ("NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional per GPU = 450 GB/s per direction "
           "(https://glennklockwood.com/garden/processors/h100; H200 same NVLink 4: "
           "https://lzwjava.github.io/nvidia-h200-gpu-specs-en); measured unidirectional P2P ~380 GB/s "
           "(https://github.com/NVIDIA/nccl/issues/1264)")
_IB400 = ("400 Gb/s InfiniBand NDR, one NIC per GPU = 50 GB/s per direction "
          "(ConnectX-7 400 Gb/s per GPU in DGX H100; 50 GB/s: https://github.com/deepseek-ai/DeepSeek-V3/issues/28)")
_H_FLOPS = ("sustained attention fwd+bwd ~400 TFLOP/s: between FlashAttention-2 (~370 TFLOP/s fwd, hdim 128) and "
            "FlashAttention-3 (~650 TFLOP/s fwd) on H100 SXM5, whose dense BF16 peak is 989 TFLOP/s "
            "(FA-3 figures as charted in the FA-3 paper/blog; peak: https://glennklockwood.com/garden/processors/h100); "
            "H200 has the same GH100 compute (https://lzwjava.github.io/nvidia-h200-gpu-specs-en)")
_910B_FLOPS = ("sustained attention ~160 TFLOP/s: an assumed 50% of the ~320 TFLOP/s FP16 peak reported for the "
               "Ascend 910B (https://boardor.com/blog/huawei-ascend-910b-outperforms-h20-910c-approaches-h100, "
               "a secondary source; Huawei's own datasheet was not available to us) - calibrate on your cluster")
_HCCS = ("HCCS: one link of the 8-NPU full mesh, 56 GB/s (392 GB/s over 7 peers per 910B die, derived from "
         "the 784 GB/s reported for the two-die 910C: https://www.besthub.dev/articles/"
         "huawei-ascend-ai-chip-detailed-specs-comparison-2025-2028-roadmap-a247a4760c30; secondary, unverified) "
         "- calibrate on your cluster")
_ROCE = ("RoCE: one 200GE NPU port per NPU = 25 GB/s per direction (Atlas 800T A2: one NPU port per NPU, "
         "https://www.hiascend.com/document/detail/zh/mindcluster/730/deployer/deployerug/deployer_0025.html; "
         "200GE per port assumed) - calibrate on your cluster")
_NODE8 = ("two levels: 8 GPUs per node on NVSwitch, non-blocking, any GPU to any other concurrently at the full "
          "NVLink rate (HGX H100 8-GPU, NVIDIA's announcement as reposted at https://www.dynasys.com.hk/blog/"
          "introducing-nvidia-hgx-h100-an-accelerated-server-platform-for-ai-and-high-performance-computing/; "
          "H200 the same baseboard design), all-to-alls inside a node at the NVLink figure; one ConnectX-7 "
          "400 Gb/s port per GPU between nodes (DGX H100 User Guide, network modules: "
          "https://www.easymanua.ls/nvidia/dgx-h100/manual?p=19)")
_NODE8_910B = ("two levels: 8 NPUs per node (Atlas 800T A2) on the HCCS full mesh, all-to-alls inside a node priced "
               "at ONE HCCS link (exact for 2 Ulysses ranks, a lower bound for more: a U-rank all-to-all on the "
               "mesh uses U-1 links, up to 392 GB/s at U=8) - calibrate with --calibrate --node-size 8")

#: named profiles; ``flops`` is a *sustained* attention rate, not the datasheet peak
PRESETS: dict[str, HardwareProfile] = {
    "h100-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h100-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h100-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h100-ib400", f"{_H_FLOPS}; {_IB400}"),
    "h200-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h200-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h200-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h200-ib400", f"{_H_FLOPS}; {_IB400}"),
    "ascend910b-hccs": HardwareProfile(160e12, 56e9, 56e9, 0.0, "ascend910b-hccs", f"{_910B_FLOPS}; {_HCCS}"),
    "ascend910b-roce": HardwareProfile(160e12, 25e9, 25e9, 0.0, "ascend910b-roce", f"{_910B_FLOPS}; {_ROCE}"),
    # two-level clusters (node_size > 0): a2a_bandwidth inside a node, p2p_bandwidth between nodes
    "h100-nvlink-ib400": HardwareProfile(400e12, 50e9, 450e9, 0.0, "h100-nvlink-ib400",
                                         f"{_H_FLOPS}; {_NVLINK}; {_IB400}; {_NODE8}", node_size=8),
    "h200-nvlink-ib400": HardwareProfile(400e12, 50e9, 450e9, 0.0, "h200-nvlink-ib400",
                                         f"{_H_FLOPS}; {_NVLINK}; {_IB400}; {_NODE8}", node_size=8),
    "ascend910b-hccs-roce": HardwareProfile(160e12, 25e9, 56e9, 0.0, "ascend910b-hccs-roce",
                                            f"{_910B_FLOPS}; {_HCCS}; {_ROCE}; {_NODE8_910B}", node_size=8),
}
#: the profile ``strategy="auto"`` uses without a cost model: 400 TFLOP/s and 450 GB/s (one H100/H200 NVLink node)
DEFAULT_PROFILE = PRESETS["h100-nvlink"]


def preset(name: str) -> HardwareProfile:
    """A named profile from :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"profile: expected one of {sorted(PRESETS)} or a JSON path, got {name!r}")
    return PRESETS[name]


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
        return (f"Prediction(comm={self.comm!r}{split}, step={self.step_s * 1e3:.3f} ms, "
                f"efficiency={self.efficiency:.3f}, "
                f"busiest rank {b}: compute {self.compute_s[b] * 1e3:.3f} ms, comm {self.comm_s[b] * 1e3:.3f} ms{a2a}, "
                f"steps {self.steps})")


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
            raise ValueError(f"profile: expected a HardwareProfile or a preset name, got {type(prof).__name__}")
        object.__setattr__(self, "profile", prof)
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"heads: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        dt = self.dtype
        if isinstance(dt, str):
            dt = getattr(torch, dt, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch dtype or its name, got {self.dtype!r}")
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

    def rank_seconds(self, work: int, kv_recv: int, kv_send: int, grad_recv: int, grad_send: int,
                     steps: int, segments: int = 0) -> tuple[float, float, float]:
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

    def ring_model(self, ulysses_size: int = 1, cp_size: int | None = None) -> "CostModel":
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
            raise ValueError(f"cost: the model's heads (num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}) "
                             f"cannot run ulysses_size={u}: {exc}") from exc
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
        if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
            raise ValueError(f"ulysses_size: expected a positive int, got {ulysses_size!r}")
        if cp_size is None:
            if need_cp and self.profile.node_size:
                raise ValueError(f"cp_size: needed to price a split on the two-level profile {self.profile.name!r} "
                                 f"(node_size={self.profile.node_size})")
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
        per = [self.rank_seconds(stats.work[r], stats.kv_recv_tokens[r], stats.kv_send_tokens[r], grad_recv[r],
                                 grad_send[r], stats.num_steps, segments[r]) for r in range(cp)]
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
        (:meth:`ringattn.layout.DocLayout.cp_stats` with this model's heads, head dim and dtype)."""
        if (st.heads, st.kv_heads, st.head_dim, st.itemsize) != (self.num_heads, self.num_kv_heads, self.head_dim,
                                                                  self.dtype.itemsize):
            raise ValueError(f"stats: counted for Hq={st.heads} Hkv={st.kv_heads} D={st.head_dim} itemsize "
                             f"{st.itemsize}, the model has Hq={self.num_heads} Hkv={self.num_kv_heads} "
                             f"D={self.head_dim} itemsize {self.dtype.itemsize}")
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
            comm=st.comm, compute_s=compute, comm_s=per(ring.comm_s), time_s=tuple(time), bytes_in=per(ring.bytes_in),
            bytes_out=per(ring.bytes_out), steps=ring.steps, step_s=step, ideal_s=ideal,
            efficiency=ideal / step if step > 0 else 1.0, ulysses_size=u, a2a_s=tuple(a2a), a2a_bytes=a2a_bytes)

    def predict(self, layout: DocLayout, comm: str | None = None) -> Prediction:
        """Per-CP-rank compute, exchange, all-to-all (hybrid layouts) and predicted seconds of
        ``layout`` with plan shape ``comm`` (default: the library's default), and the step's time
        and efficiency. ``ValueError`` if the model's heads cannot be split over the layout's
        ``ulysses_size``."""
        if not isinstance(layout, DocLayout):
            raise ValueError(f"layout: expected a DocLayout, got {type(layout).__name__}")
        comm = comm or DEFAULT_COMM
        if layout.ulysses_size == 1 and not self.profile.node_size:
            return self.predict_stats(build_plan(layout, comm).stats)
        self.ring_model(layout.ulysses_size, layout.cp_size)  # the heads' ValueError names the model
        return self.predict_cp_stats(layout.cp_stats(self.num_heads, self.num_kv_heads, self.head_dim,
                                                     self.dtype.itemsize, comm))


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


# ---------------------------------------------------------------------------- calibration
def _timed(fn, sync, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    import statistics
    import time

    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_kernel(kernel, device, heads: int, kv_heads: int, head_dim: int, dtype, seq: int, docs: int,
                   repeat: int, sync) -> tuple[int, float]:
    """``(unmasked entries, seconds)`` of ``kernel`` forward + backward on ``docs`` causal segments
    of ``seq // docs`` tokens each, the way the executor calls it (one :class:`VarlenCall`, built once)."""
    from .kernels import VarlenCall

    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    n = seq // docs
    total = n * docs
    q, dout = mk(total, heads, head_dim), mk(total, heads, head_dim)
    k, v = mk(total, kv_heads, head_dim), mk(total, kv_heads, head_dim)
    cu = tuple(range(0, total + 1, n))
    call = VarlenCall(cu, cu, True)
    scale = head_dim ** -0.5

    def run():
        out, lse = kernel.forward(q, k, v, call, scale)
        kernel.backward(dout, q, k, v, out.to(dtype), lse, call, scale)

    return docs * n * (n + 1) // 2, _timed(run, sync, repeat)


def measure_p2p(group, device, nbytes: int, repeat: int, sync) -> tuple[float, float]:
    """``(bytes/s per rank and direction, seconds of a small exchange)``: every rank sends ``nbytes``
    to the next rank while receiving as much from the previous one (one ring step of the
    executor, through :func:`ringattn.comm.p2p.post`); the slowest rank's time counts."""
    import torch.distributed as dist

    from .comm.p2p import post

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = (rank + 1) % size, (rank - 1) % size

    def exchange(n: int):
        send = torch.ones(n, dtype=torch.uint8, device=device)
        recv = torch.empty(n, dtype=torch.uint8, device=device)

        def run():
            post(group, "calibration exchange", [(nxt, send)], [(prv, recv)], 99).wait()
        return run

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    big = slowest(_timed(exchange(nbytes), sync, repeat))
    small = slowest(_timed(exchange(8), sync, repeat))
    return nbytes / big, small


def measure_a2a(group, device, nbytes: int, repeat: int, sync) -> float | None:
    """All-to-all bytes/s per rank (bytes a rank sends to the others over the time), or None
    where the backend has no all-to-all."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    if size < 2:
        return None
    per = max(1, nbytes // size)
    send = torch.ones(per * size, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    try:
        seconds = _timed(lambda: dist.all_to_all_single(recv, send, group=group), sync, repeat)
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return per * (size - 1) / float(t.item())


def measure_links(group, device, nbytes: int, repeat: int, sync, node_size: int = 0):
    """``(P2P bytes/s, seconds of a small exchange, all-to-all bytes/s or None)`` over ``group``.

    With ``node_size > 0`` (a two-level cluster, ``node_size`` consecutive ranks per node) the
    all-to-all is measured inside each node at once (subgroups of ``node_size`` ranks; the slowest
    node counts) and the P2P ring over the whole group, whose node-crossing hops gate it when the
    group spans nodes. Collective over ``group``.
    """
    import torch.distributed as dist

    size = dist.get_world_size(group)
    bw, small = measure_p2p(group, device, nbytes, repeat, sync)
    if not node_size:
        return bw, small, measure_a2a(group, device, nbytes, repeat, sync)
    if size % node_size:
        raise ValueError(f"node_size: expected a divisor of the group's size {size}, got {node_size}")
    node, _ = dist.new_subgroups(group_size=node_size, group=group)
    a2a = measure_a2a(node, device, nbytes, repeat, sync)
    t = torch.tensor([a2a or 0.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bw, small, float(t.item()) or None


def main(argv=None) -> None:
    """``python -m ringattn.cost --calibrate``: measure this machine and write a profile JSON."""
    import argparse
    import datetime
    import os

    import torch.distributed as dist

    from .kernels import get_backend

    p = argparse.ArgumentParser(
        prog="python -m ringattn.cost",
        description="Measure the attention kernel rate (the selected backend) and the P2P bandwidth over the "
                    "current group and write a HardwareProfile JSON. Run it under torchrun with the ranks, devices "
                    "and interconnect you train on, e.g. torchrun --nproc-per-node 8 -m ringattn.cost --calibrate.")
    p.add_argument("--calibrate", action="store_true", required=True)
    p.add_argument("--out", default="ringattn_profile.json", help="where rank 0 writes the profile")
    p.add_argument("--device", default=None, help="cpu, cuda or npu (default: cuda/npu where available)")
    p.add_argument("--backend", default=None, help="kernel backend (default: from the device)")
    p.add_argument("--dist-backend", default=None, help="process group backend (default: gloo on cpu, nccl, hccl)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32 on accelerators, 8 on cpu)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default heads/4)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128, 64 on cpu)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq", type=int, default=None, help="tokens per kernel call (default 8192, 2048 on cpu)")
    p.add_argument("--short", type=int, default=128,
                   help="segment length of the second measurement (many short segments), for segment_overhead")
    p.add_argument("--p2p-bytes", type=int, default=None, help="message size (default 64 MiB, 8 MiB on cpu)")
    p.add_argument("--p2p-bandwidth", type=float, default=None,
                   help="bytes/s to record instead of measuring (needed without a group of 2+ ranks)")
    p.add_argument("--node-size", type=int, default=0,
                   help="ranks per node of a two-level cluster (recorded in the profile): the all-to-all is measured "
                        "inside each node (a2a_bandwidth), the P2P ring over all ranks (p2p_bandwidth: between nodes, "
                        "so run over 2+ nodes or give --p2p-bandwidth); default 0: one level")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (cpu)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else ("npu" if hasattr(torch, "npu") and torch.npu.is_available()
                                                                  else "cpu")
    cpu = args.device == "cpu"
    heads = args.heads or (8 if cpu else 32)
    kv_heads = args.kv_heads or max(1, heads // 4)
    head_dim = args.head_dim or (64 if cpu else 128)
    seq = args.seq or (2048 if cpu else 8192)
    nbytes = args.p2p_bytes or ((8 if cpu else 64) << 20)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        dist_backend = args.dist_backend or {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[args.device]
        dist.init_process_group(dist_backend)
        group = dist.group.WORLD
    rank = dist.get_rank() if group is not None else 0
    if args.device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        getattr(torch, args.device).set_device(local)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "npu":
            torch.npu.synchronize()

    kernel = get_backend(device.type, args.backend)
    if group is not None:
        dist.barrier()
    # one long causal segment gives the rate; the same tokens in short segments the fixed cost per segment
    e_long, t_long = measure_kernel(kernel, device, heads, kv_heads, head_dim, dtype, seq, 1, args.repeat, sync)
    n_short = max(1, seq // args.short)
    e_short, t_short = measure_kernel(kernel, device, heads, kv_heads, head_dim, dtype, seq, n_short, args.repeat, sync)
    per_entry = t_long / e_long
    overhead = max(0.0, (t_short - e_short * per_entry) / n_short)
    if group is not None:  # every rank computes at once (as in training); the median rank counts
        got = [None] * world
        dist.all_gather_object(got, (per_entry, overhead))
        per_entry = sorted(g[0] for g in got)[world // 2]
        overhead = sorted(g[1] for g in got)[world // 2]
    rate = FWD_BWD_FACTOR * flops_per_entry(heads, head_dim) / per_entry
    node = args.node_size
    if node < 0 or (node and group is not None and world % node):
        raise SystemExit(f"--node-size: expected 0 or a divisor of the {world} ranks, got {node}")
    if args.p2p_bandwidth is not None:
        bw, small, a2a, how = args.p2p_bandwidth, 0.0, None, "P2P bandwidth given (--p2p-bandwidth)"
        if node and group is not None:  # the all-to-all inside a node can still be measured
            _, small, a2a = measure_links(group, device, nbytes, args.repeat, sync, node)
            how += f"; all-to-all inside nodes of {node} ranks"
    elif group is None:
        raise SystemExit("--calibrate: measuring P2P bandwidth needs a group of 2+ ranks: run under torchrun "
                         "--nproc-per-node 2 (or more), or pass --p2p-bandwidth BYTES_PER_S")
    elif node and world <= node:
        raise SystemExit(f"--calibrate --node-size {node}: the {world} ranks are one node, so the P2P ring measures "
                         "no link between nodes: run over 2+ nodes, or pass --p2p-bandwidth BYTES_PER_S")
    else:
        bw, small, a2a = measure_links(group, device, nbytes, args.repeat, sync, node)
        how = f"P2P: ring exchange of {nbytes} B over {world} ranks ({dist.get_backend(group)})"
        if node:
            how += f", crossing nodes of {node} ranks; all-to-all inside each node"
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    profile = HardwareProfile(
        flops=rate, p2p_bandwidth=bw, a2a_bandwidth=a2a,
        latency=3 * small,  # a step posts 3 exchanges: forward KV, backward KV, dK/dV
        segment_overhead=overhead,
        node_size=node,
        name=f"calibrated-{device.type}-{kernel.__name__.rsplit('.', 1)[-1]}",
        source=(f"python -m ringattn.cost --calibrate, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
                f"{kind}, kernel backend {kernel.__name__.rsplit('.', 1)[-1]}: Hq={heads} Hkv={kv_heads} D={head_dim} "
                f"{args.dtype}: one causal segment of {seq} tokens (rate) and {n_short} of {seq // n_short} (segment "
                f"overhead), median rank of {world}; {how}; latency = 3 small exchanges per step"),
    )
    if rank == 0:
        profile.save(args.out)
        print(f"kernel rate {rate / 1e12:.4g} TFLOP/s, {overhead * 1e6:.4g} us per segment, P2P {bw / 1e9:.4g} GB/s"
              + (f", all-to-all {a2a / 1e9:.4g} GB/s" if a2a else "") + f", latency {profile.latency * 1e6:.4g} us/step"
              + (f", {node} ranks per node" if node else ""))
        print(f"wrote {args.out}")
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

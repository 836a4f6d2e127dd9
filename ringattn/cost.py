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

All counts come from the plan (:class:`ringattn.plan.PlanStats`), exact for every comm shape.
All-to-all bandwidth (``a2a_bandwidth``) is kept in the profile for hybrid Ulysses x ring CP;
layouts without a Ulysses dimension do no all-to-all.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from .layout import DocLayout
from .plan import DEFAULT_COMM, PlanStats, build_plan

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
    p2p_bandwidth: point-to-point bytes/s per rank and direction (the KV exchange).
    a2a_bandwidth: all-to-all bytes/s per rank (hybrid Ulysses x ring CP; ``None``: as P2P).
    latency: fixed seconds per exchange step of a forward + backward pass.
    name, source: a label and where the figures come from.
    """

    flops: float
    p2p_bandwidth: float
    a2a_bandwidth: float | None = None
    latency: float = 0.0
    name: str = "custom"
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "flops", _positive("flops", self.flops))
        object.__setattr__(self, "p2p_bandwidth", _positive("p2p_bandwidth", self.p2p_bandwidth))
        object.__setattr__(self, "a2a_bandwidth", _positive("a2a_bandwidth", self.a2a_bandwidth, allow_none=True))
        lat = self.latency
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat < 0:
            raise ValueError(f"latency: expected a finite number >= 0, got {lat!r}")
        object.__setattr__(self, "latency", float(lat))
        if not isinstance(self.name, str) or not isinstance(self.source, str):
            raise ValueError("name/source: expected strings")

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

#: named profiles; ``flops`` is a *sustained* attention rate, not the datasheet peak
PRESETS: dict[str, HardwareProfile] = {
    "h100-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h100-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h100-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h100-ib400", f"{_H_FLOPS}; {_IB400}"),
    "h200-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h200-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h200-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h200-ib400", f"{_H_FLOPS}; {_IB400}"),
    "ascend910b-hccs": HardwareProfile(160e12, 56e9, 56e9, 0.0, "ascend910b-hccs", f"{_910B_FLOPS}; {_HCCS}"),
    "ascend910b-roce": HardwareProfile(160e12, 25e9, 25e9, 0.0, "ascend910b-roce", f"{_910B_FLOPS}; {_ROCE}"),
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


@dataclass(frozen=True)
class Prediction:
    """The model's per-rank and step-level prediction (seconds; lists indexed by rank)."""

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

    @property
    def busiest(self) -> int:
        """The rank that sets the step time (lowest rank on ties)."""
        return max(range(len(self.time_s)), key=lambda r: (self.time_s[r], -r))

    def __repr__(self) -> str:
        b = self.busiest
        return (f"Prediction(comm={self.comm!r}, step={self.step_s * 1e3:.3f} ms, efficiency={self.efficiency:.3f}, "
                f"busiest rank {b}: compute {self.compute_s[b] * 1e3:.3f} ms, comm {self.comm_s[b] * 1e3:.3f} ms, "
                f"steps {self.steps})")


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
                     steps: int) -> tuple[float, float, float]:
        """``(compute, communication, time)`` seconds of one rank from its exact counts."""
        compute = work * self.seconds_per_entry
        kvb, gb = self.kv_bytes_per_token, self.grad_bytes_per_token
        comm = max(2 * kv_recv * kvb + grad_recv * gb, 2 * kv_send * kvb + grad_send * gb) / self.profile.p2p_bandwidth
        return compute, comm, max(compute, comm) + steps * self.profile.latency

    # ------------------------------------------------------------------ predictions
    def predict_stats(self, stats: PlanStats) -> Prediction:
        """The prediction from a plan's exact accounting."""
        cp = stats.cp_size
        grad_recv = stats.grad_recv_tokens or (0,) * cp
        grad_send = stats.grad_send_tokens or (0,) * cp
        per = [self.rank_seconds(stats.work[r], stats.kv_recv_tokens[r], stats.kv_send_tokens[r], grad_recv[r],
                                 grad_send[r], stats.num_steps) for r in range(cp)]
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
        )

    def predict(self, layout: DocLayout, comm: str | None = None) -> Prediction:
        """Per-rank compute, KV-exchange and predicted seconds of ``layout`` with plan shape ``comm``
        (default: the library's default), and the step's time and efficiency."""
        if not isinstance(layout, DocLayout):
            raise ValueError(f"layout: expected a DocLayout, got {type(layout).__name__}")
        return self.predict_stats(build_plan(layout, comm or DEFAULT_COMM).stats)


def default_cost_model() -> CostModel:
    """The model ``strategy="auto"`` uses without ``cost``: :data:`DEFAULT_PROFILE`, Hq=32, Hkv=8, D=128, bf16."""
    return CostModel(DEFAULT_PROFILE)

"""Hardware profiles: the few numbers the cost model needs (see :mod:`ringattn.cost`), presets with sources."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from .._validate import positive_float

__all__ = ["HardwareProfile", "PRESETS", "DEFAULT_PROFILE", "preset"]


def _positive(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    return positive_float(name, value)


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
    def from_dict(cls, data: dict, where: str = "profile") -> HardwareProfile:
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
    def load(cls, path) -> HardwareProfile:
        """A profile from a JSON file (as ``python -m ringattn.cost --calibrate`` writes)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as exc:
            raise ValueError(f"profile: cannot read {path!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile: {path!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, where=f"profile {path}")


_NVLINK = (
    "NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional per GPU = 450 GB/s per direction "
    "(https://glennklockwood.com/garden/processors/h100; H200 same NVLink 4: "
    "https://lzwjava.github.io/nvidia-h200-gpu-specs-en); measured unidirectional P2P ~380 GB/s "
    "(https://github.com/NVIDIA/nccl/issues/1264)"
)
_IB400 = (
    "400 Gb/s InfiniBand NDR, one NIC per GPU = 50 GB/s per direction "
    "(ConnectX-7 400 Gb/s per GPU in DGX H100; 50 GB/s: https://github.com/deepseek-ai/DeepSeek-V3/issues/28)"
)
_H_FLOPS = (
    "sustained attention fwd+bwd ~400 TFLOP/s: between FlashAttention-2 (~370 TFLOP/s fwd, hdim 128) and "
    "FlashAttention-3 (~650 TFLOP/s fwd) on H100 SXM5, whose dense BF16 peak is 989 TFLOP/s "
    "(FA-3 figures as charted in the FA-3 paper/blog; peak: https://glennklockwood.com/garden/processors/h100); "
    "H200 has the same GH100 compute (https://lzwjava.github.io/nvidia-h200-gpu-specs-en)"
)
_910B_FLOPS = (
    "sustained attention ~160 TFLOP/s: an assumed 50% of the ~320 TFLOP/s FP16 peak reported for the "
    "Ascend 910B (https://boardor.com/blog/huawei-ascend-910b-outperforms-h20-910c-approaches-h100, "
    "a secondary source; Huawei's own datasheet was not available to us) - calibrate on your cluster"
)
_HCCS = (
    "HCCS: one link of the 8-NPU full mesh, 56 GB/s (392 GB/s over 7 peers per 910B die, derived from "
    "the 784 GB/s reported for the two-die 910C: https://www.besthub.dev/articles/"
    "huawei-ascend-ai-chip-detailed-specs-comparison-2025-2028-roadmap-a247a4760c30; secondary, unverified) "
    "- calibrate on your cluster"
)
_ROCE = (
    "RoCE: one 200GE NPU port per NPU = 25 GB/s per direction (Atlas 800T A2: one NPU port per NPU, "
    "https://www.hiascend.com/document/detail/zh/mindcluster/730/deployer/deployerug/deployer_0025.html; "
    "200GE per port assumed) - calibrate on your cluster"
)
_NODE8 = (
    "two levels: 8 GPUs per node on NVSwitch, non-blocking, any GPU to any other concurrently at the full "
    "NVLink rate (HGX H100 8-GPU, NVIDIA's announcement as reposted at https://www.dynasys.com.hk/blog/"
    "introducing-nvidia-hgx-h100-an-accelerated-server-platform-for-ai-and-high-performance-computing/; "
    "H200 the same baseboard design), all-to-alls inside a node at the NVLink figure; one ConnectX-7 "
    "400 Gb/s port per GPU between nodes (DGX H100 User Guide, network modules: "
    "https://www.easymanua.ls/nvidia/dgx-h100/manual?p=19)"
)
_NODE8_910B = (
    "two levels: 8 NPUs per node (Atlas 800T A2) on the HCCS full mesh, all-to-alls inside a node priced "
    "at ONE HCCS link (exact for 2 Ulysses ranks, a lower bound for more: a U-rank all-to-all on the "
    "mesh uses U-1 links, up to 392 GB/s at U=8) - calibrate with --calibrate --node-size 8"
)

#: named profiles; ``flops`` is a *sustained* attention rate, not the datasheet peak
PRESETS: dict[str, HardwareProfile] = {
    "h100-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h100-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h100-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h100-ib400", f"{_H_FLOPS}; {_IB400}"),
    "h200-nvlink": HardwareProfile(400e12, 450e9, 450e9, 0.0, "h200-nvlink", f"{_H_FLOPS}; {_NVLINK}"),
    "h200-ib400": HardwareProfile(400e12, 50e9, 50e9, 0.0, "h200-ib400", f"{_H_FLOPS}; {_IB400}"),
    "ascend910b-hccs": HardwareProfile(160e12, 56e9, 56e9, 0.0, "ascend910b-hccs", f"{_910B_FLOPS}; {_HCCS}"),
    "ascend910b-roce": HardwareProfile(160e12, 25e9, 25e9, 0.0, "ascend910b-roce", f"{_910B_FLOPS}; {_ROCE}"),
    # two-level clusters (node_size > 0): a2a_bandwidth inside a node, p2p_bandwidth between nodes
    "h100-nvlink-ib400": HardwareProfile(
        400e12, 50e9, 450e9, 0.0, "h100-nvlink-ib400", f"{_H_FLOPS}; {_NVLINK}; {_IB400}; {_NODE8}", node_size=8
    ),
    "h200-nvlink-ib400": HardwareProfile(
        400e12, 50e9, 450e9, 0.0, "h200-nvlink-ib400", f"{_H_FLOPS}; {_NVLINK}; {_IB400}; {_NODE8}", node_size=8
    ),
    "ascend910b-hccs-roce": HardwareProfile(
        160e12, 25e9, 56e9, 0.0, "ascend910b-hccs-roce", f"{_910B_FLOPS}; {_HCCS}; {_ROCE}; {_NODE8_910B}", node_size=8
    ),
}
#: the profile ``strategy="auto"`` uses without a cost model: 400 TFLOP/s and 450 GB/s (one H100/H200 NVLink node)
DEFAULT_PROFILE = PRESETS["h100-nvlink"]


def preset(name: str) -> HardwareProfile:
    """A named profile from :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"profile: expected one of {sorted(PRESETS)} or a JSON path, got {name!r}")
    return PRESETS[name]

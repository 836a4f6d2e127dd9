"""Attention cases run by the multi-rank tests (the same code runs on every rank)."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

import ringattn
from ringattn import DocLayout


@dataclass(frozen=True)
class Case:
    name: str
    cu_seqlens: tuple[int, ...]
    sample_len: int
    hq: int = 2
    hkv: int = 2
    d: int = 64
    dtype: str = "float32"
    seed: int = 0
    comm: str = "ring"
    backend: str | None = None
    qk_scale: float = 1.0  # multiplies q and k (large logits: scale * |qk| ~ qk_scale**2)
    strategy: str = "zigzag"
    chunks_per_rank: int | None = None
    ulysses: int | None = None  # None: a plain CP group; U: ringattn.new_cp_groups(U), CP = U x ring
    window: int | None = None  # sliding window (keys a query attends, itself included); None: none
    sinks: bool = False  # learned sink logits per query head (case_sinks), their gradient returned too


def random_cu_seqlens(
    rng: random.Random, sample_len: int, num_samples: int = 1, p_single: float = 0.2, max_doc: int | None = None
) -> tuple[int, ...]:
    """Random documents per sample, with single-token documents mixed in."""
    max_doc = max_doc or sample_len
    cu = [0]
    for b in range(num_samples):
        end = (b + 1) * sample_len
        while cu[-1] < end:
            n = 1 if rng.random() < p_single else rng.randint(1, max_doc)
            cu.append(min(end, cu[-1] + n))
    return tuple(cu)


def splittable_heads(ulysses_size: int, kv_heads, groups) -> list[tuple[int, int]]:
    """``(Hq, Hkv)`` pairs, ``Hq = Hkv * g``, that a Ulysses group of ``ulysses_size`` can scatter
    (KV heads split or replicated; see :func:`ringattn.plan.ulysses_heads`)."""
    from ringattn.plan import ulysses_heads

    pairs = []
    for hkv in kv_heads:
        for g in groups:
            try:
                ulysses_heads(hkv * g, hkv, ulysses_size)
            except ValueError:
                continue
            pairs.append((hkv * g, hkv))
    return pairs


def global_tensors(case: Case):
    """Seeded global q, k, v, dout (unit-scale normal) for a case."""
    g = torch.Generator().manual_seed(case.seed)
    s = case.cu_seqlens[-1]
    dtype = getattr(torch, case.dtype)
    q = (torch.randn(s, case.hq, case.d, generator=g) * case.qk_scale).to(dtype)
    k = (torch.randn(s, case.hkv, case.d, generator=g) * case.qk_scale).to(dtype)
    v = torch.randn(s, case.hkv, case.d, generator=g).to(dtype)
    dout = torch.randn(s, case.hq, case.d, generator=g).to(dtype)
    return q, k, v, dout


def case_sinks(case: Case) -> torch.Tensor:
    """Seeded fp32 sink logits ``[Hq]`` of a case (its own generator: global_tensors is unchanged by them), each
    exactly representable in bf16 (so a bf16 single-device kernel can be handed them unrounded)."""
    g = torch.Generator().manual_seed(case.seed + 1_000_003)
    return torch.randn(case.hq, generator=g).to(torch.bfloat16).float()


#: test backend names that run the NPU backend on an emulated torch_npu generation (tests/npu_emulation.py)
NPU_GENERATIONS = {
    "npu": "current",
    "npu-legacy": "legacy",
    "npu-old-cann": "layout-kwarg-old-cann",
    "npu-tnd": "tnd-without-update",
}

#: test backend names that run the CUDA backend on CPU tensors through a stand-in of flash_attn (that version)
#: or, for None, of torch's aten flash ops (tests/flash_standin.py)
CUDA_STANDINS = {"cuda-fa2.6": "2.6.3", "cuda-fa2.7": "2.7.4.post1", "cuda-fa2.8": "2.8.3", "cuda-aten": None}

_GROUPS: dict = {}  # per test process: ulysses size -> CPGroups over the world (new_cp_groups is collective)


def cp_groups(ulysses: int):
    """The world's :class:`ringattn.CPGroups` for ``ulysses`` (created once per process, in call order)."""
    if ulysses not in _GROUPS:
        _GROUPS[ulysses] = ringattn.new_cp_groups(ulysses)
    return _GROUPS[ulysses]


def run_case(rank: int, cp: int, case: Case):
    """This rank's (local indices, out, dq, dk, dv) for ``case``.

    ``backend`` in :data:`NPU_GENERATIONS` runs the NPU backend on the emulation of the documented
    torch_npu contract, in that generation (see tests/npu_emulation.py); in :data:`CUDA_STANDINS` the CUDA
    backend on CPU tensors through a stand-in of its kernel provider (tests/flash_standin.py).
    """
    if case.backend in NPU_GENERATIONS:
        from . import npu_emulation

        with npu_emulation.installed(NPU_GENERATIONS[case.backend]), warnings.catch_warnings():
            # the emulated fused merge accepts everything ringattn passes: a fallback here is a bug, not a device quirk
            warnings.filterwarnings("error", message="ringattn: npu_ring_attention_update failed")
            return _run_case(rank, cp, case, "npu")
    if case.backend in CUDA_STANDINS:
        from . import flash_standin

        with flash_standin.installed(CUDA_STANDINS[case.backend]):
            return _run_case(rank, cp, case, "cuda")
    return _run_case(rank, cp, case, case.backend)


def case_layout(case: Case, cp: int) -> DocLayout:
    """The layout ``case`` runs on at CP size ``cp``."""
    return DocLayout.from_cu_seqlens(
        case.cu_seqlens,
        cp,
        sample_len=case.sample_len,
        strategy=case.strategy,
        chunks_per_rank=case.chunks_per_rank,
        ulysses_size=case.ulysses or 1,
    )


def _run_case(rank: int, cp: int, case: Case, backend):
    layout = case_layout(case, cp)
    group = cp_groups(case.ulysses) if case.ulysses is not None else None
    idx = layout.local_indices(rank)
    q, k, v, dout = global_tensors(case)
    q, k, v = (x[idx].clone().requires_grad_() for x in (q, k, v))
    sinks = case_sinks(case).to(q.device).requires_grad_() if case.sinks else None
    out = ringattn.ring_eod_attention(
        q, k, v, layout, group, comm=case.comm, backend=backend, window=case.window, sinks=sinks
    )
    out.backward(dout[idx])
    if sinks is not None:  # this rank's partial of the sink gradient (the CP sum is the single-device one)
        return idx, out.detach(), q.grad, k.grad, v.grad, sinks.grad
    return idx, out.detach(), q.grad, k.grad, v.grad


def run_cases(rank: int, cp: int, cases):
    return [run_case(rank, cp, c) for c in cases]


def assemble(per_rank, total: int):
    """Global (out, dq, dk, dv) from every rank's local results of one case, and the CP-summed sink gradient
    (float64) when the case has sinks."""
    outs = []
    for j in range(4):
        first = per_rank[0][j + 1]
        full = torch.full((total,) + tuple(first.shape[1:]), float("nan"), dtype=first.dtype)
        for res in per_rank:
            full[res[0]] = res[j + 1]
        outs.append(full)
    if len(per_rank[0]) > 5:
        outs.append(sum(res[5].double() for res in per_rank))
    return outs

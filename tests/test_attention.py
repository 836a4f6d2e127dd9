"""Multi-rank correctness against the float64 dense document-causal reference."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from ringattn import build_plan

from .cases import Case, assemble, case_layout, case_sinks, global_tensors, random_cu_seqlens, run_case, run_cases
from .dist import unwrap
from .plan_sim import bf16_partials, kernel_calls
from .reference import dense_with_grads, doc_window_mask
from .rounding import device_bounds

COMMS = ("plain", "ring", "direct")


def layout_cases(cp: int) -> list[Case]:
    """The acceptance layouts for one CP size (small: the machine has 2 cores)."""
    rng = random.Random(1000 + cp)
    chunk = 8
    s = 2 * cp * chunk
    cases = [
        Case(
            "random+single-token docs MHA d64",
            random_cu_seqlens(rng, s, p_single=0.3, max_doc=s // 2),
            s,
            hq=2,
            hkv=2,
            d=64,
            seed=1,
        ),
        Case("chunk-boundary docs GQA d128", tuple(range(0, s + 1, chunk)), s, hq=4, hkv=2, d=128, seed=2),
        Case(
            "mixed boundaries MQA d64",
            tuple(
                sorted({0, s} | {c * chunk for c in range(1, 2 * cp, 3)} | {c * chunk + 1 for c in range(0, 2 * cp, 4)})
            ),
            s,
            hq=4,
            hkv=1,
            d=64,
            seed=3,
        ),
        Case("one doc spanning every chunk GQA d64", (0, s), s, hq=4, hkv=2, d=64, seed=4),
        Case(
            "micro-batch of 2 samples GQA d64",
            random_cu_seqlens(rng, s, num_samples=2, max_doc=s),
            s,
            hq=4,
            hkv=2,
            d=64,
            seed=5,
        ),
        Case(
            "bf16 random GQA d64", random_cu_seqlens(rng, s, max_doc=s), s, hq=4, hkv=2, d=64, dtype="bfloat16", seed=6
        ),
        Case("bf16 one doc MHA d128", (0, s), s, hq=2, hkv=2, d=128, dtype="bfloat16", seed=7),
        Case(
            "balanced strategy, 2 samples GQA",
            random_cu_seqlens(rng, s, num_samples=2, max_doc=s),
            s,
            hq=4,
            hkv=2,
            d=64,
            seed=8,
            strategy="balanced",
            chunks_per_rank=4,
        ),
        Case(
            "auto strategy, 2 samples GQA",
            random_cu_seqlens(rng, s, num_samples=2, max_doc=s // 2),
            s,
            hq=4,
            hkv=2,
            d=64,
            seed=9,
            strategy="auto",
        ),
    ]
    return [Case(**{**c.__dict__, "comm": comm}) for c in cases for comm in COMMS]


def single_device_bf16_errors(case: Case, q, k, v, dout, ref):
    """Error of the single-device bf16 CPU flash kernel (aten op, called directly) per document."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    scale = 1.0 / math.sqrt(case.d)
    res = [torch.empty_like(x) for x in (q, q, k, v)]
    cu = case.cu_seqlens
    for a, b in zip(cu, cu[1:]):
        t = [x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v, dout)]
        o, lse = fwd(t[0], t[1], t[2], 0.0, True, scale=scale)
        grads = bwd(t[3], t[0], t[1], t[2], o, lse, 0.0, True, scale=scale)
        for dst, src in zip(res, (o,) + tuple(grads)):
            dst[a:b] = src[0].transpose(0, 1)
    return [(x.double() - r).abs().max().item() for x, r in zip(res, ref)]


def sdpa_bf16_errors(case: Case, q, k, v, dout, ref):
    """Error of a single-device bf16 kernel per document under the case's window and sinks: torch's
    ``scaled_dot_product_attention`` (CPU) with a float mask (0 / -inf: the window) and, for sinks, one more key
    of zeros whose mask entry is the head's sink logit (``case_sinks`` are exact in bf16) — the aten flash kernel
    of :func:`single_device_bf16_errors` takes neither."""
    scale = 1.0 / math.sqrt(case.d)
    sinks = case_sinks(case) if case.sinks else None
    res = [torch.empty_like(x) for x in (q, q, k, v)]
    for a, b in zip(case.cu_seqlens, case.cu_seqlens[1:]):
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = j <= i if case.window is None else (j <= i) & (j > i - case.window)
        mask = torch.zeros(n, n).masked_fill(~keep, float("-inf")).expand(1, case.hq, n, n)
        t = [x[a:b].transpose(0, 1).unsqueeze(0).detach().requires_grad_() for x in (q, k, v)]
        kk, vv = t[1], t[2]
        if sinks is not None:
            zero = torch.zeros(1, case.hkv, 1, case.d, dtype=q.dtype)
            kk, vv = torch.cat([kk, zero], 2), torch.cat([vv, zero], 2)
            mask = torch.cat([mask, sinks.view(1, case.hq, 1, 1).expand(1, case.hq, n, 1)], -1)
        o = torch.nn.functional.scaled_dot_product_attention(
            t[0], kk, vv, attn_mask=mask.to(q.dtype), scale=scale, enable_gqa=case.hq != case.hkv
        )
        o.backward(dout[a:b].transpose(0, 1).unsqueeze(0))
        for dst, src in zip(res, (o.detach(), t[0].grad, t[1].grad, t[2].grad)):
            dst[a:b] = src[0].transpose(0, 1)
    return [(x.double() - r).abs().max().item() for x, r in zip(res, ref)]


def reference_with_grads(case: Case, q, k, v, dout) -> list:
    """float64 ``[out, dq, dk, dv]`` (and ``dsinks`` with sinks) of ``case`` from its inputs: the dense
    document-causal reference, or with a window or sinks ``window_reference`` of tests/test_window.py (autograd)."""
    scale = 1.0 / math.sqrt(case.d)
    if case.window is None and not case.sinks:
        return list(dense_with_grads(q, k, v, dout, case.cu_seqlens, scale))
    from .test_window import window_reference

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    sinks = case_sinks(case).double().requires_grad_() if case.sinks else None
    out = window_reference(*leaves, case.cu_seqlens, scale, case.window, sinks)
    out.backward(dout.double())
    return [out.detach()] + [x.grad for x in leaves] + ([sinks.grad] if sinks is not None else [])


@dataclass(frozen=True)
class DeviceBaseline:
    """What bounds a half-precision result of a device path (see :func:`check_case`).

    ``bounds``: elementwise ``(out, dq, dk, dv)`` bounds of the error analysis (tests/rounding.py) for the plan's
    kernel calls — the emulated NPU generations and the CUDA stand-ins, whose kernels round each partial once.
    ``single``: for a real device kernel (its internal error is not modelled), the same case on the same backend
    on one device (CP=1, no merge), assembled, with the most bf16 partials summed into one dq / dK/dV row.
    """

    bounds: tuple | None = None
    single: list | None = None
    q_partials: int = 1
    kv_partials: int = 1


def device_path(case: Case) -> bool:
    """True when ``case`` runs a device backend (CUDA, its CPU stand-ins, or NPU on an emulated torch_npu
    generation)."""
    return (case.backend or "").startswith(("cuda", "npu"))


def device_baseline(case: Case, cp: int, single=None) -> DeviceBaseline | None:
    """:class:`DeviceBaseline` of ``case`` run on ``cp`` ranks, None unless it is a half-precision device-path
    case. Without ``single`` (the assembled CP=1 result of a real device run) the elementwise error-analysis
    bounds of the case's plan (:func:`tests.rounding.device_bounds` over :func:`tests.plan_sim.kernel_calls`)."""
    if case.dtype == "float32" or not device_path(case):
        return None
    layout = case_layout(case, cp)
    plan = build_plan(layout, case.comm, case.window)
    if single is not None:
        p_q, p_kv = bf16_partials(layout, plan)
        return DeviceBaseline(single=single, q_partials=p_q, kv_partials=p_kv)
    q, k, v, dout = global_tensors(case)
    bounds = device_bounds(
        q,
        k,
        v,
        dout,
        doc_window_mask(case.cu_seqlens, case.window),
        kernel_calls(layout, plan),
        1.0 / math.sqrt(case.d),
        getattr(torch, case.dtype),
        sinks=case_sinks(case) if case.sinks else None,
        ulysses=case.ulysses or 1,
    )
    return DeviceBaseline(bounds=bounds)


def bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(x)) - 7) if x > 0 else 0.0


def check_case(case: Case, got, baseline: DeviceBaseline | None = None) -> None:
    """fp32: 1e-5 absolute. bf16 on the CPU backend: 2e-2 absolute and at most twice the single-device kernel's
    error. Half precision on a device path: the error analysis of tests/rounding.py, elementwise. A case with a
    window or sinks is compared with tests/test_window.py's ``window_reference`` (and its CP-summed ``dsinks``
    too, ``got[4]``), its single-device bf16 kernel being :func:`sdpa_bf16_errors`'s.

    Two floors keep the CPU backend's bf16 bounds physical: no bf16 result can be closer than half a bf16
    ulp of its value, so the absolute bound is never below half an ulp of the largest reference value (it
    matters once |x| >= 8, e.g. dv under GQA); and "twice the single-device error" is never below 1e-5 (the fp32
    tolerance), for cases where the single-device kernel is exact (single-token documents) and ours differs at
    fp32 level. (That the CPU backend's bf16 result is its fp32 result rounded once is pinned exactly by
    tests/test_precision.py.)

    Device paths (npu, cuda) follow the device contract: the kernels take and return half precision — the
    partial outputs and gradients, and the merged output that backward reads — so every kernel call adds one
    rounding of its partials, and the rowsum term of backward reads a rounded output. ``baseline.bounds``
    (:func:`device_baseline`) bounds each element of out, dq, dk, dv from the plan's kernel calls and the float64
    reference (tests/rounding.py derives it); every element must be inside. A real GPU run (``baseline.single``)
    keeps the cruder rule, since a real kernel's internal error is not modelled: one bf16 ulp of the largest
    value for out, (P + 1) / 2 for a gradient summed from P partials (``plan_sim.bf16_partials``), at least
    2e-2, or twice the same backend's single-device error.
    """
    q, k, v, dout = global_tensors(case)
    ref = reference_with_grads(case, q, k, v, dout)
    names = ("out", "dq", "dk", "dv") + (("dsinks",) if case.sinks else ())
    extra = "".join([f", window {case.window}" if case.window is not None else "", ", sinks" if case.sinks else ""])
    label = f"{case.name} [{case.comm}, {case.backend or 'cpu'}{extra}]"
    assert len(got) == len(names), f"{label}: expected {names}, got {len(got)} results"
    for name, x in zip(names, got):
        assert not torch.isnan(x).any(), f"{label}: {name} has rows no rank produced"
    if case.dtype == "float32":
        for name, x, r in zip(names, got, ref):
            err = (x.double() - r).abs().max().item()
            assert err <= 1e-5, f"{label}: {name} max abs error {err:.3e} > 1e-5"
        return
    if device_path(case):
        assert baseline is not None, f"{label}: a half-precision device-path result needs device_baseline(case, cp)"
        if baseline.bounds is not None:
            for name, x, r, b in zip(names, got, ref, baseline.bounds):
                err = (x.double() - r).abs()
                worst = (err / b).max().item()
                assert worst <= 1.0, (
                    f"{label}: {name} error {err.max().item():.3e} exceeds the error analysis's "
                    f"bound at some element ({worst:.2f}x its bound; tests/rounding.py)"
                )
            return
        ulps = (1.0, (baseline.q_partials + 1) / 2, (baseline.kv_partials + 1) / 2, (baseline.kv_partials + 1) / 2)
        for i, (name, x, r, n) in enumerate(zip(names, got, ref, ulps)):
            err = (x.double() - r).abs().max().item()
            bound = max(2e-2, n * bf16_ulp(r.abs().max().item()))
            base = (baseline.single[i].double() - r).abs().max().item()
            assert err <= max(bound, 2 * base), (
                f"{label}: {name} max abs error {err:.3e} > {n:g} bf16 ulp {bound:.3e} "
                f"and > 2x the same backend's single-device error {base:.3e}"
            )
        return
    windowed = case.window is not None or case.sinks
    base = (sdpa_bf16_errors if windowed else single_device_bf16_errors)(case, q, k, v, dout, ref)
    for name, x, r, b in zip(names, got, ref, base):
        err = (x.double() - r).abs().max().item()
        bound = max(2e-2, bf16_ulp(r.abs().max().item()) / 2)
        assert err <= bound, f"{label}: {name} max abs error {err:.3e} > {bound:.3e}"
        assert err <= max(2 * b, 1e-5), f"{label}: {name} error {err:.3e} > 2x single-device bf16 {b:.3e}"
    if case.sinks:  # fp32 sinks; no single-device bf16 kernel to compare with: the absolute bound only
        err = (got[4] - ref[4]).abs().max().item()
        bound = max(2e-2, bf16_ulp(ref[4].abs().max().item()) / 2)
        assert err <= bound, f"{label}: dsinks max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("backend", ["cpu", "npu", "npu-legacy", "npu-tnd"])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_multi_rank_matches_dense_reference(cp, backend, rank_pools):
    """ "npu" / "npu-legacy" run the NPU backend on the emulation of the documented torch_npu contract
    (current generation: token-major statistics and the fused merge; legacy: the default per-segment
    head-major statistics, no fused merge)."""
    cases = [Case(**{**c.__dict__, "backend": backend}) for c in layout_cases(cp)]
    per_rank = unwrap(rank_pools(cp).run(run_cases, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], case.cu_seqlens[-1]), device_baseline(case, cp))


@pytest.mark.parametrize("backend", ["cpu", "npu", "npu-legacy", "npu-old-cann", "npu-tnd", "math"])
def test_cp1_without_process_group_matches_reference(backend):
    for case in layout_cases(1):
        if case.comm != "direct":
            continue
        case = Case(**{**case.__dict__, "backend": backend})
        res = run_case(0, 1, case)
        check_case(case, assemble([res], case.cu_seqlens[-1]), device_baseline(case, 1))


def test_npu_backend_on_softmax_layout_keyword_without_cann_support_multi_rank(rank_pools):
    """torch_npu knows softmax_layout but CANN lacks the V4 kernels: the backend falls back to the default layout."""
    cases = [Case(**{**c.__dict__, "backend": "npu-old-cann"}) for c in layout_cases(3) if c.comm == "direct"]
    per_rank = unwrap(rank_pools(3).run(run_cases, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], case.cu_seqlens[-1]), device_baseline(case, 3))

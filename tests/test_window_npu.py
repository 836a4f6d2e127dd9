"""The NPU backend under sliding windows (band ``sparse_mode=4``) and sinks, on every emulated torch_npu generation.

The backend runs on tests/npu_emulation.py, whose band is encoded from the operator's documentation and CANN's
operator code (cited there), computed in float64 from the arguments ringattn passes; the results are compared with
the independent float64 dense reference of tests/test_window.py (:func:`window_reference`: the full mask from the
document list and the window definition). Cases: windows 1, 2, sizes that cut chunks mid-document and one longer
than every document; CP 1-4 (each window meets each generation once across them) and Ulysses 2 x ring 2; every comm
shape; MHA / GQA / MQA; with and without sinks; fp32 within 1e-5 (out, dq, dk, dv, the CP-summed dsinks), bf16 inside
the elementwise device-path bound of tests/rounding.py (the suite's rule for emulated kernels, here over the
windowed plan's kernel calls and the windowed mask; sinks are not part of that analysis, so the bf16 cases have
none).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from ringattn import DocLayout, build_plan
from ringattn.kernels import VarlenCall, get_backend

from . import npu_emulation as emu
from .cases import NPU_GENERATIONS
from .dist import unwrap
from .plan_sim import kernel_calls
from .rounding import device_bounds
from .test_window import CU, WINDOWS, _check, _global, window_reference
from .test_window import _run_case as _run_window_case

GENERATIONS = tuple(NPU_GENERATIONS)  # test backend names: "npu" (current), "npu-legacy", "npu-old-cann", "npu-tnd"
D = 64  # a multiple of 64: the current generation's fused merge runs too


def _run_case(rank, cp, case):
    """test_window's case on the NPU backend, on the emulated generation named by the case's backend field."""
    with emu.installed(NPU_GENERATIONS[case[10]]), warnings.catch_warnings():
        # the emulated fused merge accepts everything ringattn passes: a fallback here is a bug, not a device quirk
        warnings.filterwarnings("error", message="ringattn: npu_ring_attention_update failed")
        return _run_window_case(rank, cp, case[:10] + ("npu",) + case[11:])


def _run_cases(rank, cp, cases):
    return [_run_case(rank, cp, c) for c in cases]


def _cases(cp: int, ulysses: int = 1, dtype: str = "float32") -> list[tuple]:
    """One case per window; the generation rotates with the CP size, so across CP 1-4 each window meets each
    generation once. Heads, comm, strategy and sinks rotate too."""
    rng = random.Random(1000 + cp * 10 + ulysses)
    heads = [(4, 4), (4, 2), (4, 1)] if ulysses == 1 else [(4, 2), (4, 1)]
    out = []
    for n, window in enumerate(WINDOWS):
        hq, hkv = heads[(n + cp) % len(heads)]
        comm = ("direct", "ring", "plain")[(n + cp) % 3]
        strategy = ("zigzag", "balanced", "auto")[n % 3]
        sinks = dtype == "float32" and (n + cp) % 2 == 0
        out.append(
            (
                CU,
                hq,
                hkv,
                D,
                window,
                sinks,
                comm,
                strategy,
                ulysses,
                dtype,
                GENERATIONS[(n + cp) % 4],
                rng.randrange(1000),
            )
        )
    return out


def _per_case(cp, cases, rank_pools):
    if cp == 1:
        return [[_run_case(0, 1, c)] for c in cases]
    return list(zip(*unwrap(rank_pools(cp).run(_run_cases, cases))))


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_npu_window_and_sinks_match_the_dense_reference(rank_pools, cp):
    """fp32 within 1e-5: every window size (each on every generation across the CP sizes), with and without sinks,
    every comm shape, zigzag / balanced / auto, MHA / GQA / MQA."""
    cases = _cases(cp)
    assert {c[10] for c in cases} == set(GENERATIONS)
    for case, results in zip(cases, _per_case(cp, cases, rank_pools)):
        _check(case, results, 1e-5)


def test_npu_window_and_sinks_under_ulysses_2_x_ring_2(rank_pools):
    """Hybrid CP: the heads are scattered, the windowed ring plan runs the band on the ring; every generation."""
    cases = _cases(4, ulysses=2)
    assert {c[10] for c in cases} == set(GENERATIONS)
    for case, results in zip(cases, zip(*unwrap(rank_pools(4).run(_run_cases, cases)))):
        _check(case, results, 1e-5)


def _window_mask(cu, window) -> torch.Tensor:
    """bool ``[S, S]``: query ``i`` attends key ``j`` of its document iff ``i - window < j <= i``."""
    s = cu[-1]
    doc = torch.zeros(s, dtype=torch.int64)
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = d
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return (doc[:, None] == doc[None, :]) & (j <= i) & (j > i - window)


def _check_bf16(case, cp, per_rank):
    """Every element of out, dq, dk, dv inside the error analysis's bound (tests/rounding.py) of the windowed plan's
    kernel calls, against the float64 reference on the bf16 inputs."""
    cu, hq, hkv, d, window, _, comm, strategy, ulysses, *_, seed = case
    q, k, v, dout, _ = (x if x is None else x.to(torch.bfloat16) for x in _global(seed, cu[-1], hq, hkv, d, False))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = window_reference(*leaves, cu, d**-0.5, window)
    ref.backward(dout.double())
    want = [ref.detach()] + [x.grad for x in leaves]
    layout = DocLayout.from_cu_seqlens(cu, cp, strategy=strategy, ulysses_size=ulysses)
    calls = kernel_calls(layout, build_plan(layout, comm, window))
    bounds = device_bounds(q, k, v, dout, _window_mask(cu, window), calls, d**-0.5, torch.bfloat16)
    got = [torch.full_like(w, float("nan")) for w in want]
    for idx, *parts, _ in per_rank:
        for full, part in zip(got, parts):
            full[idx] = part
    for name, a, b, bound in zip(("out", "dq", "dk", "dv"), got, want, bounds):
        worst = ((a - b).abs() / bound).max().item()
        assert worst <= 1.0, f"{case}: {name} exceeds the device-path bound ({worst:.2f}x at some element)"


@pytest.mark.parametrize("cp", [2, 3])
def test_npu_window_bf16_within_the_device_path_bound(rank_pools, cp):
    """bf16, no sinks: the windows that cut chunks mid-document (and 2), one case per generation per CP size."""
    cases = [c for c in _cases(cp, dtype="bfloat16") if 2 <= c[4] <= 23][:4]
    assert {c[10] for c in cases} == set(GENERATIONS)
    for case, results in zip(cases, _per_case(cp, cases, rank_pools)):
        _check_bf16(case, cp, results)


# ---------------------------------------------------------------------------------------------- the band itself
def _masked_attention(q, k, v, keep, scale):
    """float64 out ``[Sq, N, D]`` of attention with the bool ``keep`` ``[Sq, Skv]`` (the test's own, dense)."""
    s = torch.einsum("qnd,knd->nqk", q.double(), k.double()) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return torch.einsum("nqk,knd->qnd", p, v.double())


def _band(fwd, q, k, v, pre, nxt, seq_q, seq_k, mask=None, mode=4):
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1) if mask is None else mask
    return fwd(
        q,
        k,
        v,
        q.shape[1],
        "TND",
        atten_mask=mask,
        scale=0.5,
        pre_tockens=pre,
        next_tockens=nxt,
        actual_seq_qlen=seq_q,
        actual_seq_kvlen=seq_k,
        sparse_mode=mode,
    )


@pytest.mark.parametrize("generation", emu.GENERATIONS)
def test_emulated_band_follows_the_documented_examples(generation):
    """The emulation's sparse_mode=4 against the documentation's own examples, on every generation:

    * Sq = Skv (doc 调用示例, ``get_atten_mask``): masked = ``triu(k=next+1) | tril(k=-pre-1)``;
    * the band of the sparse_mode=7 example (one batch: "按照band模式的要求来配置参数"): Sq=2, Skv=6, pre_tockens=6,
      next_tockens=-2 is rows 0-1 of a 4x6 right-down causal mask;
    * the band of the sparse_mode=8 example: Sq=3, Skv=4, pre_tockens=4, next_tockens=1 is rows 2-4 of a 5x4
      left-up causal mask;
    * in TND each segment has its own bottom-right corner: the three as one varlen call give the same rows.
    """
    fwd, _ = emu._bind(emu._Generation(generation))
    g = torch.Generator().manual_seed(0)
    examples = []
    ones = torch.ones(8, 8, dtype=torch.bool)
    examples.append((8, 8, 3, 1, ~(torch.triu(ones, 1 + 1) | torch.tril(ones, -3 - 1))))
    examples.append((2, 6, 6, -2, torch.ones(4, 6, dtype=torch.bool).tril(6 - 4)[:2]))
    examples.append((3, 4, 4, 1, torch.ones(5, 4, dtype=torch.bool).tril()[2:]))
    tensors = []
    for sq, sk, pre, nxt, keep in examples:
        q, k, v = (torch.randn(n, 2, 16, generator=g) for n in (sq, sk, sk))
        got = _band(fwd, q, k, v, pre, nxt, [sq], [sk])[0]
        assert (got.double() - _masked_attention(q, k, v, keep, 0.5)).abs().max() < 1e-6, (sq, sk, pre, nxt)
        tensors.append((q, k, v, got))
    # one varlen call, one (pre, next) pair: segments (8x8, 2x6 and 3x4 with the pair (4, 1) each)
    q, k, v = (torch.cat([t[i] for t in tensors]) for i in range(3))
    out = _band(fwd, q, k, v, 4, 1, [8, 10, 13], [8, 14, 18])[0]
    for (qs, qe), (ks, ke) in zip(((0, 8), (8, 10), (10, 13)), ((0, 8), (8, 14), (14, 18))):
        sq, sk = qe - qs, ke - ks
        r, c = torch.arange(sq)[:, None] + sk - sq, torch.arange(sk)[None, :]
        keep = (c >= r - 4) & (c <= r + 1)
        assert (out[qs:qe].double() - _masked_attention(q[qs:qe], k[ks:ke], v[ks:ke], keep, 0.5)).abs().max() < 1e-6


def test_emulated_band_enforces_the_documented_checks():
    fwd, bwd = emu._bind(emu._Generation("current"))
    q = torch.randn(6, 2, 16)
    with pytest.raises(RuntimeError, match="has invalid data block"):  # pre_tockens < 0
        _band(fwd, q, q, q, -1, 3, [6], [6])
    with pytest.raises(RuntimeError, match="invalid config"):  # no intersection: pre + next < 0
        _band(fwd, q, q, q, 1, -2, [6], [6])
    with pytest.raises(RuntimeError, match="has invalid row"):  # Sq - next > Skv: row 0 sees no key
        _band(fwd, q, q[:4], q[:4], 3, 1, [6], [4])
    with pytest.raises(RuntimeError, match="triu"):  # sparse_mode 4 needs the compressed 2048x2048 mask
        _band(fwd, q, q, q, 2, 0, [6], [6], mask=torch.ones(2048, 2048, dtype=torch.bool).tril())
    with pytest.raises(RuntimeError, match=r"\[0,5\) or \(5,8\]"):  # TND: no non-compressed prefix
        _band(fwd, q, q, q, 2, 0, [6], [6], mode=5)
    with pytest.raises(TypeError):
        _band(fwd, q, q, q, 2.0, 0, [6], [6])
    # the mask is what turns the band on: without it pre/next are ignored and everything is computed (doc)
    full = fwd(
        q,
        q,
        q,
        2,
        "TND",
        scale=0.5,
        pre_tockens=0,
        next_tockens=0,
        actual_seq_qlen=[6],
        actual_seq_kvlen=[6],
        sparse_mode=4,
    )[0]
    assert (full.double() - _masked_attention(q, q, q, torch.ones(6, 6, dtype=torch.bool), 0.5)).abs().max() < 1e-6
    # the grad op reads the same pair: a band of width 1 (pre 0, next 0) has dq = 0 (softmax over one key)
    out, smax, ssum = _band(fwd, q, q, q, 0, 0, [6], [6])[:3]
    assert torch.allclose(out, q)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    dq = bwd(
        q,
        q,
        q,
        torch.randn(6, 2, 16),
        2,
        "TND",
        atten_mask=mask,
        softmax_max=smax,
        softmax_sum=ssum,
        attention_in=out,
        scale_value=0.5,
        pre_tockens=0,
        next_tockens=0,
        actual_seq_qlen=[6],
        actual_seq_kvlen=[6],
        sparse_mode=4,
    )[0]
    assert dq.abs().max() < 1e-6


def test_npu_backend_passes_the_window_pair_as_the_band():
    """The backend's keywords per call: the window pair as (pre_tockens, next_tockens) with sparse_mode 4 and the
    compressed mask, built once per call and device; a pair that would leave a row without keys is a planner bug."""
    npu = get_backend("cpu", "npu")
    assert npu.SUPPORTS_WINDOW
    call = VarlenCall((0, 3, 5), (0, 6, 9), False, (4, 1))
    args = npu._mask_args(call, torch.device("cpu"))
    assert (args["sparse_mode"], args["pre_tockens"], args["next_tockens"]) == (4, 4, 1)
    assert torch.equal(args["atten_mask"], torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))
    assert npu._mask_args(call, torch.device("cpu")) is args
    causal = npu._mask_args(VarlenCall((0, 4), (0, 4), True, (2, 0)), "cpu")
    assert (causal["sparse_mode"], causal["pre_tockens"], causal["next_tockens"]) == (4, 2, 0)
    with pytest.raises(AssertionError, match="no fully masked row"):
        npu._mask_args(VarlenCall((0, 5), (0, 3), False, (4, 1)), "cpu")  # row 0 would see keys up to -1


@pytest.mark.parametrize("generation", ["npu", "npu-legacy"])
def test_npu_windowed_call_with_more_than_1024_segments_is_split_and_exact(generation):
    """1,100 single-token documents and one of 12 tokens at CP 1, window 5: step 0's windowed causal call has more
    segments than the operator's 1,024, so it is split, every part with the same band (and, on the legacy generation,
    its own head-major statistics index)."""
    from ringattn.comm.executor import plan_exec
    from ringattn.plan import rank_plan

    cu = tuple(range(1101)) + (1112,)
    calls = [c.varlen for c in plan_exec(rank_plan(DocLayout.from_cu_seqlens(cu, 1), 0, "direct", 5)).steps[0].calls]
    assert any(c.window == (4, 0) and c.num_segments > 1024 for c in calls)
    case = (cu, 2, 1, 16, 5, True, "direct", "zigzag", 1, "float32", generation, 7)
    _check(case, [_run_case(0, 1, case)], 1e-5)

"""Sliding windows and sinks on the CUDA backend, on CPU, through the stand-ins of its kernel providers.

tests/flash_standin.py binds each flash_attn version's real signature (2.6.x: ``window_size`` one pair; 2.7+:
``window_size_left, window_size_right``) and aten's schema (``window_size_left/right``), and applies the window as
flash_api.cpp and the kernels do ([F-win], [T-win] there: causal forces right to 0, ``>= max_seqlen_k`` becomes -1,
a negative side becomes ``max_seqlen_k`` unless both are negative, bottom-right alignment per segment, key-less rows
give out 0 and LSE +inf). Here:

* the stand-ins' masks against masks written out by hand, per provider;
* the CUDA backend's own windowed calls (segments shaped like the planner's reads, including ones with more queries
  than ``max_seqlen_k + 1``) against the documented window, elementwise within one kernel call's rounding bound;
* the whole CUDA path at CP 1-4 and Ulysses 2 x ring 2, windows 1, 2, sizes that cut chunks mid-document and one
  longer than every document, with and without sinks, fp16/bf16, every provider, against the float64
  ``window_reference`` of tests/test_window.py within the device-path error analysis (tests/rounding.py).
"""

from __future__ import annotations

import pytest
import torch

from ringattn import DocLayout, build_plan
from ringattn.kernels import VarlenCall

from . import flash_standin
from .cases import CUDA_STANDINS
from .dist import unwrap
from .plan_sim import kernel_calls
from .reference import doc_window_mask
from .rounding import device_bounds, half_ulp
from .test_window import CU, LONGEST, WINDOWS, run_on_rank, window_reference

PROVIDERS = ["2.6.3", "2.7.4.post1", "2.8.3", None]  # None: no flash_attn, torch's aten flash ops
PROVIDER_IDS = ["fa2.6.3", "fa2.7.4", "fa2.8.3", "aten"]


# ---------------------------------------------------------------------------------------------- the stand-ins
def _window_kwargs(provider, window) -> dict:
    """The window as each provider spells it: aten (``provider`` None) takes ``window_size_left/right`` only when
    given, flash_attn >= 2.7 ``window_size_left/right``, older tags one ``window_size`` pair; (-1, -1) is none."""
    if provider is None:
        return {} if window is None else {"window_size_left": window[0], "window_size_right": window[1]}
    left, right = (-1, -1) if window is None else window
    return (
        {"window_size_left": left, "window_size_right": right} if provider >= "2.7" else {"window_size": (left, right)}
    )


def _fwd(provider, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):
    """The stand-in's varlen forward called by keyword, as each provider spells it: ``(out, lse [H, Tq])``."""
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    if provider is None:
        fwd, _ = flash_standin.aten_flash_ops()
        res = fwd(q, k, v, cq, ck, max_q, max_k, 0.0, causal, False, scale=scale, **_window_kwargs(provider, window))
        return res[0], res[1]
    _, iface = flash_standin.flash_attn_module(provider)
    res = iface._flash_attn_varlen_forward(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        softcap=0.0,
        alibi_slopes=None,
        return_softmax=False,
        **_window_kwargs(provider, window),
    )
    return res[0], res[1] if provider >= "2.7" else res[5]


def _bwd(provider, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window):
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    if provider is None:
        _, bwd = flash_standin.aten_flash_ops()
        return bwd(
            dout,
            q,
            k,
            v,
            out,
            lse,
            cq,
            ck,
            max_q,
            max_k,
            0.0,
            causal,
            torch.zeros(2, dtype=torch.int64),
            torch.empty(0),
            scale=scale,
            **_window_kwargs(provider, window),
        )
    _, iface = flash_standin.flash_attn_module(provider)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    iface._flash_attn_varlen_backward(
        dout=dout,
        q=q,
        k=k,
        v=v,
        out=out,
        softmax_lse=lse,
        dq=dq,
        dk=dk,
        dv=dv,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        **_window_kwargs(provider, window),
    )
    return dq, dk, dv


def _masked64(q, k, v, dout, mask, scale):
    """float64 ``(out, lse [H, Tq], dq, dk, dv)`` under a ``[Tq, Tk]`` mask, rows without a key giving out 0 and LSE
    +inf (what flash documents: "If the row of the mask is all zero, the output will be zero")."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s = (torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(rep, 1)) * scale).masked_fill(~mask, float("-inf"))
    seen = mask.any(-1)
    p = torch.softmax(s.masked_fill(~seen[None, :, None], 0.0), -1) * seen[None, :, None]
    out = torch.einsum("hij,jhd->ihd", p, v.repeat_interleave(rep, 1))
    out.backward(dout.double())
    lse = torch.where(seen, torch.logsumexp(s.detach(), -1), torch.tensor(float("inf"), dtype=torch.float64))
    return out.detach(), lse, q.grad, k.grad, v.grad, p.detach()


def _block_mask(cu_q, cu_k, blocks) -> torch.Tensor:
    """The ``[Tq, Tk]`` mask of a packed call from per-segment blocks written as strings of 0/1 rows."""
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for (qs, ks), rows in zip(zip(cu_q, cu_k), blocks):
        for i, row in enumerate(rows):
            for j, ch in enumerate(row):
                mask[qs + i, ks + j] = ch == "1"
    return mask


#: (what, cu_q, cu_k, causal, window, max_k or None (the longest key segment), per-segment masks written by hand)
HAND_MASKS = [
    ("causal 2x5, flash's docstring", (0, 2), (0, 5), True, None, None, [["11110", "11111"]]),
    (
        "causal 5x2, flash's docstring: three rows see nothing",
        (0, 5),
        (0, 2),
        True,
        None,
        None,
        [["00", "00", "00", "10", "11"]],
    ),
    ("(1, 0) on 3x5: keys [i+1, i+2]", (0, 3), (0, 5), False, (1, 0), None, [["01100", "00110", "00011"]]),
    ("(0, 2) on 3x3: keys [i, i+2]", (0, 3), (0, 3), False, (0, 2), None, [["111", "011", "001"]]),
    ("(2, -1): right infinite", (0, 4), (0, 4), False, (2, -1), None, [["1111", "1111", "1111", "0111"]]),
    ("(-1, 1): left infinite", (0, 4), (0, 4), False, (-1, 1), None, [["1100", "1110", "1111", "1111"]]),
    ("causal (1, 5): causal forces right to 0", (0, 4), (0, 4), True, (1, 5), None, [["1000", "1100", "0110", "0011"]]),
    (
        "(5, 0) on 3x3: left >= max_seqlen_k is -1, so plain causal",
        (0, 3),
        (0, 3),
        False,
        (5, 0),
        None,
        [["100", "110", "111"]],
    ),
    (
        "(0, 1) on two segments, each aligned to its own bottom-right corner",
        (0, 2, 5),
        (0, 3, 4),
        False,
        (0, 1),
        None,
        [["011", "001"], ["0", "1", "1"]],
    ),
    # flash_api.cpp clamps right >= max_seqlen_k to -1, then set_params_fprop makes it max_seqlen_k again: with more
    # queries than max_seqlen_k + 1 the top rows lose keys the documented rule keeps (all four rows see key 0)
    ("(0, 4) on 4x1, max_seqlen_k 1: right clamped to 1", (0, 4), (0, 1), False, (0, 4), None, [["0", "0", "1", "1"]]),
    ("(0, 4) on 4x1, max_seqlen_k 4: the documented rule", (0, 4), (0, 1), False, (0, 4), 4, [["1", "1", "1", "1"]]),
]


@pytest.mark.parametrize("provider", PROVIDERS, ids=PROVIDER_IDS)
@pytest.mark.parametrize("what, cu_q, cu_k, causal, window, max_k, blocks", HAND_MASKS, ids=[h[0] for h in HAND_MASKS])
def test_standin_window_masks_match_hand_built_masks(provider, what, cu_q, cu_k, causal, window, max_k, blocks):
    """Forward (out, LSE; key-less rows: out 0, LSE +inf) and backward (given that out and LSE) of each provider's
    stand-in equal float64 attention under the mask written out by hand, to one rounding of the fp16 result."""
    g = torch.Generator().manual_seed(7)
    dtype, scale = torch.float16, 0.5
    q = torch.randn(cu_q[-1], 2, 8, generator=g).to(dtype)
    k, v = (torch.randn(cu_k[-1], 1, 8, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max_k or max(b - a for a, b in zip(cu_k, cu_k[1:]))
    out_r, lse_r, *grads_r, p = _masked64(q, k, v, dout, _block_mask(cu_q, cu_k, blocks), scale)
    out, lse = _fwd(provider, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window)
    assert lse.dtype == torch.float32 and lse.shape == (2, cu_q[-1])
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r)), f"{what}: rows without keys differ"
    fin = torch.isfinite(lse_r)
    assert ((lse.double() - lse_r)[fin].abs() <= 1e-5).all(), what
    assert ((out.double() - out_r).abs() <= half_ulp(out_r, dtype) * 1.001 + 1e-12).all(), what
    # backward reads the LSE and out it is handed (here the exact LSE, +inf on the key-less rows, and out in fp16):
    # the rounded out moves rowsum(dout * out) by at most e = sum_d |dout| h(out), so dS by scale * P * e
    got = _bwd(
        provider,
        dout,
        q,
        k,
        v,
        out_r.to(dtype),
        lse_r.float().contiguous(),
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale,
        causal,
        window,
    )
    e = (dout.double().abs() * half_ulp(out_r, dtype)).sum(-1).t()  # [H, Tq]
    e_ds = scale * p * e.unsqueeze(-1)  # [H, Tq, Tk]
    k1, q1 = k.double().abs().repeat_interleave(2, 1), q.double().abs()
    drift = (torch.einsum("hij,jhd->ihd", e_ds, k1), torch.einsum("hij,ihd->jhd", e_ds, q1).sum(1, keepdim=True), 0.0)
    for name, x, r, dr in zip(("dq", "dk", "dv"), got, grads_r, drift):
        slack = (r.abs() + dr) * 2e-6 + dr + half_ulp(r.abs() + dr, dtype) * 1.001 + 1e-9
        assert ((x.double() - r).abs() <= slack).all(), f"{what}: {name} off by {(x.double() - r).abs().max():.3g}"


def test_standin_window_rule_follows_flash_api_cpp():
    """The clamps in order (flash_api.cpp, [F-win] steps 1-3): a rule per (causal, pair, max_seqlen_q/k)."""
    rule = flash_standin.flash_window_rule
    assert rule(True, -1, -1, 8, 8, True) == ("causal", -1, 0)
    assert rule(True, 3, -1, 8, 8, True) == ("local", 3, 0)  # causal forces right 0, keeps left
    assert rule(True, 3, -1, 1, 8, True) == ("local", 3, 8)  # forward: max_seqlen_q 1 is not causal
    assert rule(True, 3, -1, 1, 8, False) == ("local", 3, 0)  # the backward has no such line
    assert rule(False, 8, 0, 8, 8, True) == ("causal", -1, 0)  # left >= max_seqlen_k -> -1
    assert rule(False, 2, 9, 8, 8, True) == ("local", 2, 8)  # right >= max_seqlen_k -> -1 -> max_seqlen_k
    assert rule(False, -1, -1, 8, 8, True) == ("dense", -1, -1)
    assert rule(False, -1, 3, 8, 8, True) == ("local", 8, 3)


# ---------------------------------------------------------------------------------------------- the CUDA kernel
@pytest.mark.parametrize("tag", sorted(flash_standin.FLASH_ATTN_SIGNATURES))
def test_cuda_window_pair_binds_to_each_providers_parameters(tag):
    """``call.window = (left, right)`` reaches flash_attn as ``window_size=(left, right)`` (2.6.x) or
    ``window_size_left=left, window_size_right=right`` (2.7+), forward and backward, at every tag the stand-in knows;
    and aten's ``window_size_left/right`` keywords bind to the installed torch's schemas."""
    from ringattn.kernels import cuda

    fwd_names, bwd_names = flash_standin.FLASH_ATTN_SIGNATURES[tag]
    version = cuda._version(tag)
    x = [object() for _ in range(11)]
    f = (
        flash_standin._signature(fwd_names)
        .bind(*cuda.flash_forward_args(version, *x[:5], 7, 9, 0.125, False, (5, 2)))
        .arguments
    )
    b = (
        flash_standin._signature(bwd_names)
        .bind(*cuda.flash_backward_args(version, *x, 7, 9, 0.125, False, window=(5, 2)))
        .arguments
    )
    for a in (f, b):
        pair = (a["window_size_left"], a["window_size_right"]) if version >= (2, 7) else tuple(a["window_size"])
        assert pair == (5, 2), (tag, pair)
    fwd_sig = flash_standin._schema_signature(torch.ops.aten._flash_attention_forward)
    bwd_sig = flash_standin._schema_signature(torch.ops.aten._flash_attention_backward)
    for sig, n in ((fwd_sig, 10), (bwd_sig, 14)):
        a = sig.bind(*(object() for _ in range(n)), **cuda._aten_window((5, 2))).arguments
        assert (a["window_size_left"], a["window_size_right"]) == (5, 2)


def _intended_mask(cu_q, cu_k, causal, window) -> torch.Tensor:
    """The documented window (flash_attn_varlen_func's docstring): row i of a segment with sq queries and sk keys
    sees keys ``[i + sk - sq - left, i + sk - sq + right]``, causal ones ``<= i + sk - sq``; -1 infinite."""
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    left, right = window
    for qs, qe, ks, ke in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        sq, sk = qe - qs, ke - ks
        for i in range(sq):
            lo = 0 if left < 0 else i + sk - sq - left
            hi = i + sk - sq if causal else (sk - 1 if right < 0 else i + sk - sq + right)
            for j in range(max(lo, 0), min(hi, sk - 1) + 1):
                mask[qs + i, ks + j] = True
    return mask


#: windowed calls as the planner makes them (a rank's own causal blocks with (W - 1, 0); reads of earlier keys with
#: (W - 1 - delta, delta), delta = q_end - k_end), among them reads with more queries than keys + 1
CUDA_CALLS = [
    ((0, 5, 12), (0, 5, 12), True, (2, 0)),
    ((0, 10), (0, 2), False, (0, 10)),  # W 11: 2 keys before 10 queries (a chunk edge right after a document start)
    ((0, 4, 8), (0, 2, 6), False, (0, 4)),  # W 5: two reads, 2 and 4 keys
    ((0, 3, 6), (0, 4, 8), False, (1, 3)),  # W 5: 4 keys ending 3 rows before the queries end
]


@pytest.mark.parametrize("provider", PROVIDERS, ids=PROVIDER_IDS)
def test_cuda_backend_windowed_calls_match_the_documented_window(provider):
    """``cuda.forward`` / ``cuda.backward`` with ``call.window`` through each provider's stand-in equal float64
    attention under the documented window, elementwise within one call's rounding bound (tests/rounding.py)."""
    from ringattn.kernels import cuda

    from .rounding import varlen_call

    g = torch.Generator().manual_seed(11)
    with flash_standin.installed(provider):
        for dtype in (torch.float16, torch.bfloat16):
            for cu_q, cu_k, causal, window in CUDA_CALLS:
                call = VarlenCall(cu_q, cu_k, causal, window)
                q = torch.randn(cu_q[-1], 4, 16, generator=g).to(dtype)
                kv = torch.randn(cu_k[-1], 2, 2, 16, generator=g).to(dtype)
                k, v = kv[:, 0], kv[:, 1]
                dout = torch.randn(q.shape, generator=g).to(dtype)
                mask = _intended_mask(cu_q, cu_k, causal, window)
                assert mask.any(-1).all(), "every row of a planned call sees a key"
                ref_out, ref_lse, *ref_grads, _ = _masked64(q, k, v, dout, mask, 0.25)
                bounds = device_bounds(q, k, v, dout, mask, [varlen_call(cu_q, cu_k, False)], 0.25, dtype)
                out, lse = cuda.forward(q, k, v, call, 0.25)
                assert torch.isfinite(lse).all(), f"{call}: a row lost every key (LSE +inf)"
                assert (lse.double() - ref_lse.t()).abs().max() < 1e-5, call
                got = (out,) + tuple(cuda.backward(dout, q, k, v, out, lse.contiguous(), call, 0.25))
                for name, x, r, b in zip(("out", "dq", "dk", "dv"), got, [ref_out] + ref_grads, bounds):
                    worst = ((x.double() - r).abs() / b).max().item()
                    assert worst <= 1.0, f"{call} {dtype}: {name} at {worst:.2f}x the bound"


# ---------------------------------------------------------------------------------------------- the whole path
def _globals(case):
    """Global inputs of a case in float64, rounded to the case's dtype (what the ranks feed), sinks in fp32."""
    cu, hq, hkv, d, window, use_sinks, *_, dtype, _, seed = case
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, k, v, dout = (
        torch.randn(cu[-1], h, d, generator=g, dtype=torch.float64).to(dt).double() for h in (hq, hkv, hkv, hq)
    )
    sinks = torch.randn(hq, generator=g, dtype=torch.float64).float().double() if use_sinks else None
    return q, k, v, dout, sinks


def _run(rank, cp, case):
    *_, provider, _seed = case
    with flash_standin.installed(CUDA_STANDINS[provider]):
        return run_on_rank(rank, cp, case, _globals(case), "cuda")


def _run_all(rank, cp, cases):
    return [_run(rank, cp, c) for c in cases]


def _check(case, cp, per_rank):
    """Every element of out, dq, dk, dv and the CP-summed dsinks within the device-path bound of the case's windowed
    plan (tests/rounding.py), around the float64 window_reference of the rounded inputs."""
    cu, hq, hkv, d, window, use_sinks, comm, strategy, ulysses, dtype, provider, _ = case
    q, k, v, dout, sinks = _globals(case)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([sinks.clone().requires_grad_()] if use_sinks else [])
    ref = window_reference(*leaves[:3], cu, d**-0.5, window, leaves[3] if use_sinks else None)
    ref.backward(dout)
    layout = DocLayout.from_cu_seqlens(cu, cp, strategy=strategy, ulysses_size=ulysses)
    calls = kernel_calls(layout, build_plan(layout, comm, window))
    bounds = device_bounds(
        q, k, v, dout, doc_window_mask(cu, window), calls, d**-0.5, getattr(torch, dtype), sinks=sinks, ulysses=ulysses
    )
    got = [torch.full_like(x, float("nan")) for x in (q, q, k, v)]
    dsinks = torch.zeros(hq, dtype=torch.float64)
    for idx, *parts, ds in per_rank:
        for full, part in zip(got, parts):
            full[idx] = part
        if ds is not None:
            dsinks += ds
    want = [ref.detach()] + [x.grad for x in leaves[:3]] + ([leaves[3].grad] if use_sinks else [])
    names = ("out", "dq", "dk", "dv", "dsinks")
    for name, x, r, b in zip(names, got + ([dsinks] if use_sinks else []), want, bounds):
        assert not torch.isnan(x).any(), f"{case}: {name} has rows no rank produced"
        worst = ((x - r).abs() / b).max().item()
        assert worst <= 1.0, (
            f"{case}: {name} error {(x - r).abs().max().item():.3e} at {worst:.2f}x the device-path "
            f"bound (tests/rounding.py)"
        )


def _cases(cp: int, ulysses: int = 1) -> list[tuple]:
    """One case per window, the providers taking turns (every provider at every CP size), fp16 and bf16, with and
    without sinks, MHA / GQA / MQA, every comm shape and strategy; one head dim (20) that needs padding."""
    providers = list(CUDA_STANDINS)
    heads = [(4, 4), (4, 2), (4, 1)] if ulysses == 1 else [(4, 2), (4, 1)]
    windows = WINDOWS if ulysses == 1 else [1, 5, 11, LONGEST + 4]
    out = []
    for n, window in enumerate(windows):
        hq, hkv = heads[n % len(heads)]
        out.append(
            (
                CU,
                hq,
                hkv,
                20 if n == 2 else 16,
                window,
                (n + cp) % 2 == 0,
                ("direct", "ring", "plain")[n % 3],
                ("zigzag", "balanced", "auto")[(n + cp) % 3],
                ulysses,
                ("bfloat16", "float16")[n % 2],
                providers[(n + cp) % len(providers)],
                100 * cp + n,
            )
        )
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_cuda_windows_and_sinks_through_the_standins(rank_pools, cp):
    """The CUDA backend (padding, int32 cu_seqlens, the window pair per provider, LSE layouts, fp16/bf16 partials
    merged in fp32, sinks after the merge) on CP ranks over gloo, each provider's stand-in installed in every rank."""
    cases = _cases(cp)
    assert {c[10] for c in cases} == set(CUDA_STANDINS)
    if cp == 1:
        per_case = [[_run(0, 1, c)] for c in cases]
    else:
        per_case = list(zip(*unwrap(rank_pools(cp).run(_run_all, cases))))
    for case, results in zip(cases, per_case):
        _check(case, cp, results)


def test_cuda_windows_and_sinks_under_ulysses_2_x_ring_2(rank_pools):
    cases = _cases(4, ulysses=2)
    assert {c[10] for c in cases} == set(CUDA_STANDINS)
    per_case = list(zip(*unwrap(rank_pools(4).run(_run_all, cases))))
    for case, results in zip(cases, per_case):
        _check(case, 4, results)

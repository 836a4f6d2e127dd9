"""How far a half-precision result of a device path may be from the exact one: an error analysis, elementwise.

A device kernel (the NPU backend's ``npu_fusion_attention(_grad)``, the CUDA backend's flash kernels; here their
emulations, which compute in fp32/float64) returns every *partial* result in the inputs' half precision, rounded
once. ringattn merges the partial outputs and sums the partial gradients in fp32 and rounds the result once more.
For one segment ``c`` of a kernel call of the plan (a block of (query, key) pairs, ``plan_sim.kernel_calls``;
the kernel returns its partials per segment row) and exact float64 quantities from the reference (probabilities
``P`` with the global LSE, block outputs ``o_c``, block gradients ``g_c``), with ``h(x)`` half an ulp of the
half-precision format at ``|x|``:

* **out** — the merge is a convex combination, ``out32 = sum_c w_c round(o_c)`` with ``w_c = exp(lse_c - lse)``,
  so ``|out32 - out| <= F = sum_c w_c h(o_c)``; the result ``round(out32)`` adds ``h(out)`` (not when a single
  call covers the row: its partial is already representable).
* **the rowsum term** — backward is given that rounded output (``attention_in`` / ``out``), so the kernel's
  ``delta = rowsum(dout * out)`` is off by ``D_q <= sum_d |dout| (F + h(out))``, and every ``dS = P (dP - delta)``
  by ``P D_q`` (times the softmax scale).
* **gradients** — partial ``g_c = scale (dS restricted to c) @ k`` (``@ q`` for dK, summed over a KV head's query
  heads; ``P^T dout`` for dV, which has no rowsum term) is computed with error ``e_c`` (``scale (P D restricted
  to c) @ |k|``) and rounded: ``e_c + h(|g_c| + e_c)``; the fp32 sum of the partials, rounded once, adds
  ``h(|g| + sum)`` (again not when one call covers the element).
* fp32 arithmetic inside kernels and merge: each probability carries a relative error
  ``rho = 2^-17 (4 + max |q||k| scale + |lse|)`` (scores and LSE in fp32), the rowsum products theirs, so every
  partial carries ``rho`` times its absolute-value product (``P |v|``, ``|dS| |k|``, ...) on top of the rounding;
  plus ``1e-7`` absolute. For unit-scale inputs that is two orders of magnitude below a bf16 half ulp.

With learned sinks (``sinks``, one logit per head, applied once after the merge in fp32: ``lse' = logaddexp(lse,
s_h)``, ``out' = out exp(lse - lse')``) every statement above holds with ``lse'`` in place of ``lse``: the merged
output is ``sum_c exp(lse_c - lse') round(o_c)``, the backward's probabilities are ``exp(S - lse')`` and its rowsum
term reads the rounded ``out'``; ``out'`` is rounded once more even where one call covers the row (rescaled, its
partial is no longer representable). The sink gradient ``-sum_i exp(s_h - lse'_i) rowsum(dout_i out'_i)`` (fp32, from
the rounded ``out'``) is off by at most ``sum_i exp(s_h - lse'_i) (D_q + rho sum_d |dout out'|)``, ``D_q`` the
rowsum error above.

This is a bound, not an estimate, for the emulated kernels: each step above is a triangle inequality. A real
device kernel has its own internal error on top (flash rounds P to bf16 before ``P @ V``), which this does not
model: the GPU tests bound that with the same kernel's single-device error instead (tests/test_attention.py).
"""

from __future__ import annotations

import torch

MANTISSA = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
#: half the spacing of the subnormals (below the smallest normal the spacing stops shrinking: fp16's is 2^-24)
SUBNORMAL_HALF = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 2.0**-150}
REL = 2.0**-17  # fp32 arithmetic slack, relative
ABS = 1e-7


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at ``|x|`` (float64, elementwise; 0 at 0, never below half the subnormal
    spacing): the most that rounding a value of that magnitude to ``dtype`` can move it."""
    x = x.abs()
    e = torch.floor(torch.log2(x.clamp_min(1e-300)))
    return torch.where(x == 0, torch.zeros_like(x), torch.exp2(e - MANTISSA[dtype]).clamp_min(SUBNORMAL_HALF[dtype]))


def varlen_call(cu_q, cu_k, causal: bool) -> list:
    """One packed varlen kernel call as :func:`device_bounds` takes it: its segments ``(q rows, kv rows, causal)``."""
    return [(torch.arange(a, b), torch.arange(c, d), causal) for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]


def device_bounds(
    q, k, v, dout, mask: torch.Tensor, calls, scale: float, dtype: torch.dtype, sinks=None, ulysses: int = 1
):
    """Elementwise bounds ``(out, dq, dk, dv)`` (float64, shaped like the results) on ``|result - exact|`` of a
    device path whose kernel calls are ``calls`` (lists of segments ``(q rows, kv rows, causal)``, as
    ``plan_sim.kernel_calls`` gives them; together they cover ``mask`` once). ``q, k, v, dout`` are the inputs
    (half-precision values), ``mask`` (bool ``[Tq, Tk]``) what each query attends (a sliding window's mask under a
    window: each segment is bounded over the part of ``mask`` it covers). Each segment's partial is rounded once (a
    query row is in one segment per call, so for out and dq that is one rounding per call). With ``sinks``
    (``[Hq]``, the logits as the kernel path used them) the bounds are those of the sinked result, and a fifth
    element bounds the sink gradient ``[Hq]`` (summed over every query row). With ``ulysses`` U > 1 (hybrid CP:
    Ulysses rank g holds query heads ``[g Hq / U, (g + 1) Hq / U)``, the ring plan's calls run on every group) a KV
    head shared by several groups (replicated, :func:`ringattn.plan.ulysses_heads`) gets one rounded dK/dV partial
    per segment *and group*, summed in fp32 and rounded once."""
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    hq, hk = q.shape[1], k.shape[1]
    rep = hq // hk
    kx, vx = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [T, Hq, D]
    s = (torch.einsum("ihd,jhd->hij", q, kx) * scale).masked_fill(~mask, float("-inf"))  # [Hq, Tq, Tk]
    lse = torch.logsumexp(s, -1)
    if sinks is not None:  # lse' = logaddexp(lse, s_h): every probability below is the sinked one
        lse = torch.logaddexp(lse, sinks.double()[:, None])
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("hij,jhd->ihd", p, vx)
    # fp32 arithmetic: a relative error of each probability, from the fp32 scores and LSE it is computed from
    s_abs = torch.einsum("ihd,jhd->hij", q.abs(), kx.abs()) * scale
    rho = REL * (4 + s_abs.amax(-1) + lse.abs())  # [H, Tq]
    segments = [seg for call in calls for seg in call]

    def block(x, qi, ki, causal):  # [H, len(qi), len(ki)] restricted to a segment, and the segment's pairs
        keep = mask[qi][:, ki]
        if causal:
            keep = keep & torch.ones(len(qi), len(ki), dtype=torch.bool).tril()
        return x[:, qi][:, :, ki], keep

    # forward: every segment's partial output rounded once, merged with convex weights
    f = torch.zeros_like(out)
    covers_q = torch.zeros(q.shape[0], dtype=torch.long)
    for qi, ki, causal in segments:
        s_g, keep = block(s, qi, ki, causal)
        s_g = s_g.masked_fill(~keep, float("-inf"))
        l_g = torch.logsumexp(s_g, -1)  # [H, nq]
        w = torch.exp(l_g - lse[:, qi]).t().unsqueeze(-1)  # [nq, H, 1]
        p_g = torch.exp(s_g - l_g.unsqueeze(-1))
        o_g = torch.einsum("hij,jhd->ihd", p_g, vx[ki])
        noise = rho[:, qi].t().unsqueeze(-1) * torch.einsum("hij,jhd->ihd", p_g, vx[ki].abs())
        f[qi] += w * (half_ulp((o_g.abs() + noise) * (1 + REL), dtype) + noise)
        covers_q[qi] += 1
    f += ABS
    several_q = (covers_q > 1).view(-1, 1, 1) | (sinks is not None)  # a sinked out' is rounded again, always
    final_out = half_ulp((out.abs() + f) * (1 + REL), dtype)
    out_bound = f + torch.where(several_q, final_out, torch.zeros_like(f))
    # backward: the rowsum term reads the rounded output (|attention_in - out| <= f + final_out)
    d_q = (dout.abs() * (f + final_out)).sum(-1)  # [Tq, H]
    dp = torch.einsum("ihd,jhd->hij", dout, vx)
    delta = (dout * out).sum(-1).t().unsqueeze(-1)
    ds = p * (dp - delta) * scale  # exact dS (scale included)
    # its error bound: the rowsum term, and fp32 arithmetic in p, dp and delta
    dp_abs = torch.einsum("ihd,jhd->hij", dout.abs(), vx.abs()) + (dout * out).abs().sum(-1).t().unsqueeze(-1)
    e_ds = p * (d_q.t().unsqueeze(-1) + rho.unsqueeze(-1) * (dp_abs + (dp - delta).abs())) * scale
    p_noise = p * rho.unsqueeze(-1)

    def fold(x):  # [n, Hq, D] -> [n, Hk, D]: a KV head's gradient sums its query heads'
        return x.view(x.shape[0], hk, rep, x.shape[2]).sum(2)

    group = torch.arange(hq) // (hq // ulysses)  # the Ulysses group of each query head
    parts_of = torch.zeros(hk, ulysses, dtype=torch.long)  # query heads of KV head h in group g
    for h in range(hq):
        parts_of[h // rep, group[h]] += 1

    def fold_groups(x):  # [n, Hq, D] -> [n, Hk, U, D]: one kernel partial per KV head and Ulysses group
        y = torch.zeros(x.shape[0], hk, ulysses, x.shape[2], dtype=x.dtype)
        for h in range(hq):
            y[:, h // rep, group[h]] += x[:, h]
        return y

    grads = (
        torch.einsum("hij,jhd->ihd", ds, kx),
        fold(torch.einsum("hij,ihd->jhd", ds, q)),
        fold(torch.einsum("hij,ihd->jhd", p, dout)),
    )
    bounds = [torch.zeros_like(g) for g in grads]
    covers = [
        covers_q.view(-1, 1),
        torch.zeros(k.shape[0], hk, dtype=torch.long),
        torch.zeros(k.shape[0], hk, dtype=torch.long),
    ]  # partials per row (and KV head)
    for qi, ki, causal in segments:
        ds_g, keep = block(ds, qi, ki, causal)
        ds_g = ds_g * keep
        e_g = block(e_ds, qi, ki, causal)[0] * keep
        p_g = block(p, qi, ki, causal)[0] * keep
        pn_g = block(p_noise, qi, ki, causal)[0] * keep
        dq_part = torch.einsum("hij,jhd->ihd", ds_g, kx[ki])
        dq_err = torch.einsum("hij,jhd->ihd", e_g, kx[ki].abs())
        bounds[0][qi] += dq_err + half_ulp((dq_part.abs() + dq_err) * (1 + REL), dtype)
        kv_parts = (
            fold_groups(torch.einsum("hij,ihd->jhd", ds_g, q[qi])),
            fold_groups(torch.einsum("hij,ihd->jhd", p_g, dout[qi])),
        )
        kv_errs = (
            fold_groups(torch.einsum("hij,ihd->jhd", e_g, q[qi].abs())),
            fold_groups(torch.einsum("hij,ihd->jhd", pn_g, dout[qi].abs())),
        )
        for i, part, err in zip((1, 2), kv_parts, kv_errs):
            bounds[i][ki] += (err + half_ulp((part.abs() + err) * (1 + REL), dtype)).sum(2)
            covers[i][ki] += (parts_of > 0).sum(1)
    result = [out_bound]
    for i in range(3):
        several = (covers[i] > 1).unsqueeze(-1)
        total = bounds[i] + ABS
        final = half_ulp((grads[i].abs() + total) * (1 + REL), dtype)
        result.append(total + torch.where(several, final, torch.zeros_like(final)))
    if sinks is not None:  # dsinks_h = -sum_i exp(s_h - lse'_i) rowsum(dout_i out'_i), out' read rounded
        p_sink = torch.exp(sinks.double()[:, None] - lse)  # [H, Tq]
        terms = (dout * out).abs().sum(-1).t() + d_q.t()  # |rowsum| and its error, [H, Tq]
        result.append((p_sink * (d_q.t() + rho * terms)).sum(-1) + ABS)
    return tuple(result)

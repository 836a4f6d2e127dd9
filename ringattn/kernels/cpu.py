"""CPU backend: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward), per segment.

The op takes ``[B, H, L, D]`` views, handles GQA itself and returns fp32 LSE ``[B, H, L]``.
Its LSE for a fully masked row would be 0, not -inf; the planner never produces such rows.

Half-precision inputs are computed in fp32 and out/grads are returned in fp32: a block's
partial result is merged (forward) or summed over steps (backward) before the one final
rounding, so bf16 CP results stay as accurate as a single-device bf16 kernel, whose own
fp32 accumulators are rounded once.
"""
from __future__ import annotations

import torch

#: backward may be given the merged output in fp32 (it computes in fp32 anyway)
BACKWARD_TAKES_FP32_OUT = True

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bhld(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)


def _compute(*xs):
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]


def forward(q, k, v, call, scale):
    q, k, v = _compute(q, k, v)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu_q, cu_k = call.cu_q, call.cu_k
    for i in range(call.num_segments):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        o, l = _fwd(_bhld(q[qs:qe]), _bhld(k[ks:ke]), _bhld(v[ks:ke]), 0.0, call.causal, scale=scale)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[qs:qe] = l[0].transpose(0, 1)
    return out, lse


def backward(dout, q, k, v, out, lse, call, scale):
    dout, q, k, v, out = _compute(dout, q, k, v, out)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    cu_q, cu_k, causal = call.cu_q, call.cu_k, call.causal
    for i in range(call.num_segments):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        g_q, g_k, g_v = _bwd(
            _bhld(dout[qs:qe]), _bhld(q[qs:qe]), _bhld(k[ks:ke]), _bhld(v[ks:ke]),
            _bhld(out[qs:qe]), lse[qs:qe].t().unsqueeze(0), 0.0, causal, scale=scale,
        )
        dq[qs:qe] = g_q[0].transpose(0, 1)
        dk[ks:ke] = g_k[0].transpose(0, 1)
        dv[ks:ke] = g_v[0].transpose(0, 1)
    return dq, dk, dv

"""Portable fallback: per-segment attention in plain torch, computed in fp32, any device.

Used for dtypes the fused kernels lack (fp32 on CUDA) and where no fused kernel exists.
Memory is ``O(Lq * Lk)`` per segment and head; it is a correctness path, not a fast one.
"""

from __future__ import annotations

import torch
from einops import rearrange

#: backward may be given the merged output in fp32 (it computes in fp32 anyway)
BACKWARD_TAKES_FP32_OUT = True
#: honours ``VarlenCall.window`` (sliding windows)
SUPPORTS_WINDOW = True


def _segment_scores(q, k, causal, scale, window=None):
    """fp32 scores ``[Hkv, g, Lq, Lk]`` (GQA: ``g = Hq // Hkv`` query heads per KV head), masked by
    causality or by a sliding ``window`` pair (bottom-right aligned, see :class:`ringattn.kernels.VarlenCall`)."""
    qg = rearrange(q.float(), "t (h g) d -> h g t d", h=k.shape[1])
    s = torch.einsum("hgtd,shd->hgts", qg, k.float()) * scale
    if window is not None:
        lq, lk = q.shape[0], k.shape[0]
        r = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
        c = torch.arange(lk, device=q.device).unsqueeze(0)
        s = s.masked_fill((c < r - window[0]) | (c > r + window[1]), float("-inf"))
    elif causal:
        n = q.shape[0]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def forward(q, k, v, call, scale):
    cu_q, cu_k, causal = call.cu_q, call.cu_k, call.causal
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        s = _segment_scores(q[qs:qe], k[ks:ke], causal, scale, call.window)
        l = torch.logsumexp(s, dim=-1)
        o = torch.einsum("hgts,shd->hgtd", torch.exp(s - l.unsqueeze(-1)), v[ks:ke].float())
        out[qs:qe] = rearrange(o, "h g t d -> t (h g) d")
        lse[qs:qe] = rearrange(l, "h g t -> t (h g)")
    return out, lse


def backward(dout, q, k, v, out, lse, call, scale):
    cu_q, cu_k, causal = call.cu_q, call.cu_k, call.causal
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    hkv = k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        s = _segment_scores(q[qs:qe], k[ks:ke], causal, scale, call.window)
        p = torch.exp(s - rearrange(lse[qs:qe].float(), "t (h g) -> h g t", h=hkv).unsqueeze(-1))
        do = rearrange(dout[qs:qe].float(), "t (h g) d -> h g t d", h=hkv)
        o = rearrange(out[qs:qe].float(), "t (h g) d -> h g t d", h=hkv)
        dp = torch.einsum("hgtd,shd->hgts", do, v[ks:ke].float())
        ds = p * (dp - (do * o).sum(-1, keepdim=True)) * scale
        dq[qs:qe] = rearrange(torch.einsum("hgts,shd->hgtd", ds, k[ks:ke].float()), "h g t d -> t (h g) d")
        dk[ks:ke] = torch.einsum("hgts,hgtd->shd", ds, rearrange(q[qs:qe].float(), "t (h g) d -> h g t d", h=hkv))
        dv[ks:ke] = torch.einsum("hgts,hgtd->shd", p, do)
    return dq, dk, dv

"""NVIDIA GPU backend: FlashAttention varlen.

* the ``flash_attn`` package's varlen forward/backward when it is importable;
* otherwise ``torch.ops.aten._flash_attention_forward/_backward`` with ``cum_seq_q/k``
  (int32 device tensors); LSE comes back ``[H, T]`` and must be contiguous for backward.
* flash kernels take fp16/bf16 only: fp32 inputs run on :mod:`ringattn.kernels.math`.

Causal segments have equal q/k lengths, so flash's bottom-right alignment is plain causal.
cuDNN varlen (``aten._cudnn_attention_forward`` with ``cum_seq_q/k``) is faster on Hopper but
is not offered until its backward is shown to work on a GPU.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import math as _math

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def flash_attn_interface():
    """``flash_attn.flash_attn_interface`` or None."""
    try:
        from flash_attn import flash_attn_interface as fai  # noqa: PLC0415 - optional
    except (ImportError, RuntimeError):
        return None
    return fai


def _cu(cu, device) -> torch.Tensor:
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _call_with(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its signature has (flash_attn renamed some across versions)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    if q.dtype not in _FLASH_DTYPES:
        return _math.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    cq, ck = _cu(cu_q, q.device), _cu(cu_k, q.device)
    q, k, v = (x.contiguous() for x in (q, k, v))  # K/V are strided views of the stacked KV buffer
    fai = flash_attn_interface()
    if fai is not None:
        out, lse, _ = fai.flash_attn_varlen_func(q, k, v, cq, ck, max_q, max_k, softmax_scale=scale, causal=causal,
                                                 return_attn_probs=True)
    else:
        out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cq, ck, max_q, max_k, 0.0, causal, False,
                                                           scale=scale)[:2]
    return out, lse.t().float()


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    if q.dtype not in _FLASH_DTYPES:
        return _math.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
    cq, ck = _cu(cu_q, q.device), _cu(cu_k, q.device)
    lse_ht = lse.t().contiguous()
    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out.to(q.dtype)))
    fai = flash_attn_interface()
    if fai is not None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call_with(fai._flash_attn_varlen_backward, dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse_ht, dq=dq,
                   dk=dk, dv=dv, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max_q, max_seqlen_k=max_k,
                   dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
                   window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
        return dq, dk, dv
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # philox state; unused without dropout
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse_ht, cq, ck, max_q, max_k, 0.0, causal,
                                                    rng, unused, scale=scale)

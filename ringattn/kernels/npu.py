"""Ascend NPU backend: ``torch_npu.npu_fusion_attention`` / ``npu_fusion_attention_grad``, TND.

* ``actual_seq_qlen`` / ``actual_seq_kvlen``: cumulative segment ends without the leading 0.
* causal blocks: ``sparse_mode=3`` with the compressed 2048x2048 ``triu(1)`` bool mask
  (q and k segments have equal lengths, so right-down alignment is the plain causal mask);
  dense blocks: ``sparse_mode=0`` and no mask.
* LSE = ``softmax_max + log(softmax_sum)`` (both ``[T, N, 8]``, the 8 values replicated).
* backward gets the merged out as ``attention_in`` and the merged LSE as ``softmax_max``
  with ``softmax_sum = 1``; the scale keyword is ``scale_value``.
* merge: the fused ``npu_ring_attention_update`` (TND) when torch_npu has it and the head
  dim is a multiple of 64 (its documented TND constraint); the torch merge otherwise.

``torch_npu`` is imported lazily; without Ascend's CANN libraries importing it raises
RuntimeError, not only ImportError, so both are caught.
"""
from __future__ import annotations

import functools

import torch

from ..merge import merge as _torch_merge

_MASK_SIZE = 2048


def torch_npu():
    """The ``torch_npu`` module, or a ValueError saying why the NPU backend cannot run."""
    try:
        import torch_npu as mod  # noqa: PLC0415 - lazy on purpose
    except (ImportError, RuntimeError) as exc:
        raise ValueError(f"backend 'npu': torch_npu could not be imported ({type(exc).__name__}: {exc})") from exc
    return mod


@functools.lru_cache(maxsize=8)
def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)


def _mask_args(causal: bool, device) -> dict:
    return {"atten_mask": _causal_mask(device), "sparse_mode": 3} if causal else {"atten_mask": None, "sparse_mode": 0}


def _stats(x: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` -> the ``[T, N, 8]`` replicated statistics layout."""
    return x.unsqueeze(-1).expand(*x.shape, 8).contiguous()


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    npu = torch_npu()
    res = npu.npu_fusion_attention(
        q, k, v, q.shape[1], "TND", scale=scale, keep_prob=1.0,
        actual_seq_qlen=list(cu_q[1:]), actual_seq_kvlen=list(cu_k[1:]), **_mask_args(causal, q.device),
    )
    out, smax, ssum = res[0], res[1], res[2]
    lse = smax[..., 0].float() + torch.log(ssum[..., 0].float())
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    npu = torch_npu()
    lse8 = _stats(lse.float())
    dq, dk, dv = npu.npu_fusion_attention_grad(
        q, k, v, dout, q.shape[1], "TND",
        softmax_max=lse8, softmax_sum=torch.ones_like(lse8), attention_in=out.to(q.dtype), scale_value=scale,
        keep_prob=1.0, actual_seq_qlen=list(cu_q[1:]), actual_seq_kvlen=list(cu_k[1:]), **_mask_args(causal, q.device),
    )[:3]
    return dq, dk, dv


def merge(out_acc, lse_acc, out, lse, cu_q=None):
    """Fused ring-attention update when available (see module docstring), else the torch merge."""
    npu = torch_npu()
    fused = getattr(npu, "npu_ring_attention_update", None)
    if fused is None or cu_q is None or out_acc.shape[-1] % 64:
        return _torch_merge(out_acc, lse_acc, out, lse)
    a, b = _stats(lse_acc.float()), _stats(lse.float())
    seq = torch.tensor(cu_q, dtype=torch.int64, device=out_acc.device)
    new_out, new_max, new_sum = fused(out_acc, a, torch.ones_like(a), out.float(), b, torch.ones_like(b),
                                      actual_seq_qlen=seq, layout="TND")
    return new_out, new_max[..., 0] + torch.log(new_sum[..., 0])

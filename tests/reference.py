"""Independent float64 dense reference: full [S, S] scores with the document-causal mask.

Shares no code with ringattn: documents come straight from the boundary list.
"""

from __future__ import annotations

import torch


def doc_ids(cu_seqlens) -> torch.Tensor:
    cu = [int(x) for x in cu_seqlens]
    ids = torch.empty(cu[-1], dtype=torch.int64)
    for d in range(len(cu) - 1):
        ids[cu[d] : cu[d + 1]] = d
    return ids


def doc_causal_mask(cu_seqlens) -> torch.Tensor:
    """bool [S, S]: query i may attend key j."""
    ids = doc_ids(cu_seqlens)
    s = ids.numel()
    pos = torch.arange(s)
    return (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])


def doc_window_mask(cu_seqlens, window: int | None) -> torch.Tensor:
    """bool [S, S]: query i may attend key j of its document with ``i - window < j <= i`` (None: no window)."""
    mask = doc_causal_mask(cu_seqlens)
    if window is not None:
        pos = torch.arange(mask.shape[0])
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def dense_attention(q, k, v, cu_seqlens, scale):
    """q [S, Hq, D], k/v [S, Hkv, D] (any dtype, computed in float64) -> out [S, Hq, D] float64."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    scores = scores.masked_fill(~doc_causal_mask(cu_seqlens), float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)


def dense_with_grads(q, k, v, dout, cu_seqlens, scale):
    """(out, dq, dk, dv) in float64 of the dense reference."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = dense_attention(q, k, v, cu_seqlens, scale)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def varlen_mask(cu_q, cu_k, causal: bool) -> torch.Tensor:
    """bool ``[Tq, Tk]``: query row i may attend key row j in a packed varlen call (segment ``s``: rows
    ``cu_q[s]:cu_q[s+1]`` against ``cu_k[s]:cu_k[s+1]``; causal aligned to the bottom-right corner)."""
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for qs, qe, ks, ke in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        block = torch.ones(qe - qs, ke - ks, dtype=torch.bool)
        if causal:
            block = block.tril(ke - ks - (qe - qs))
        mask[qs:qe, ks:ke] = block
    return mask


def masked_with_grads(q, k, v, dout, mask, scale):
    """float64 ``(out, lse [Tq, H], dq, dk, dv)`` of attention under a ``[Tq, Tk]`` mask (every row attends
    at least one key), gradients by autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scores = torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(rep, 1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v.repeat_interleave(rep, 1))
    out.backward(dout.double())
    return out.detach(), torch.logsumexp(scores, -1).t().detach(), q.grad, k.grad, v.grad

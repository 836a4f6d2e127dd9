"""EMULATION (pure torch, CPU) of the *documented* torch_npu fused-attention contract.

This is not torch_npu and not Ascend code. It implements, from the public operator
documentation, what the NPU backend relies on, strictly enough to catch misuse:

* ``npu_fusion_attention(query, key, value, head_num, input_layout, ...)`` with
  ``input_layout="TND"``, ``actual_seq_qlen/kvlen`` as cumulative ends without a leading 0,
  ``sparse_mode=0`` (no mask) and ``sparse_mode=3`` (right-down causal with the compressed
  2048x2048 ``triu(1)`` bool mask); returns ``(attention_out, softmax_max [T,N,8],
  softmax_sum [T,N,8], softmax_out, seed, offset, numels)``;
* ``npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, ...,
  softmax_max, softmax_sum, attention_in, scale_value, ...)`` -> ``(dq, dk, dv, dpse)``;
* ``npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
  cur_softmax_max, cur_softmax_sum, actual_seq_qlen=None, layout="SBH")`` for ``layout="TND"``.

Outputs come back in the input dtype (statistics in fp32), as on the device. Tests install
it as ``sys.modules["torch_npu"]`` inside spawned test processes only.
"""
from __future__ import annotations

import sys
import types

import torch

INT_MAX = 2147483647


def _check_seq(name, seq, total):
    if not isinstance(seq, (list, tuple)) or not all(isinstance(x, int) for x in seq):
        raise TypeError(f"emulated torch_npu: {name} must be a list of ints, got {type(seq).__name__}")
    prev = 0
    for x in seq:
        if x <= prev:
            raise RuntimeError(f"emulated torch_npu: {name} must be strictly increasing cumulative ends "
                               f"without a leading 0, got {list(seq)}")
        prev = x
    if seq[-1] != total:
        raise RuntimeError(f"emulated torch_npu: {name} must end at {total}, got {seq[-1]}")
    return [0] + list(seq)


def _check_common(query, key, value, head_num, input_layout, atten_mask, sparse_mode, keep_prob, extras):
    if input_layout != "TND":
        raise NotImplementedError(f"emulated torch_npu: only input_layout='TND' is emulated, got {input_layout!r}")
    if head_num != query.shape[1]:
        raise RuntimeError(f"emulated torch_npu: head_num={head_num} but query has {query.shape[1]} heads")
    if query.shape[1] % key.shape[1] or key.shape != value.shape:
        raise RuntimeError("emulated torch_npu: key/value heads must divide query heads and match each other")
    if keep_prob != 1.0 or any(x is not None for x in extras):
        raise NotImplementedError("emulated torch_npu: dropout, pse, padding_mask and prefix are not emulated")
    if sparse_mode == 0:
        if atten_mask is not None:
            raise NotImplementedError("emulated torch_npu: an explicit mask with sparse_mode=0 is not emulated")
    elif sparse_mode == 3:
        want = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        if atten_mask is None or atten_mask.dtype != torch.bool or tuple(atten_mask.shape) != (2048, 2048) \
                or not torch.equal(atten_mask.cpu(), want):
            raise RuntimeError("emulated torch_npu: sparse_mode=3 needs the compressed 2048x2048 triu(1) bool mask")
    else:
        raise NotImplementedError(f"emulated torch_npu: sparse_mode={sparse_mode} is not emulated")


def _scores(q, k, scale, causal):
    """fp32 ``[N, Lq, Lk]`` with right-down causal masking (sparse_mode=3)."""
    rep = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("qnd,knd->nqk", q.float(), kk) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        s = s.masked_fill(j > i + (lk - lq), float("-inf"))
    return s


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    _check_common(query, key, value, head_num, input_layout, atten_mask, sparse_mode, keep_prob,
                  (pse, padding_mask, prefix))
    cq = _check_seq("actual_seq_qlen", actual_seq_qlen, query.shape[0])
    ck = _check_seq("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
    if len(cq) != len(ck):
        raise RuntimeError("emulated torch_npu: actual_seq_qlen and actual_seq_kvlen differ in length")
    t, n, d = query.shape
    out = torch.empty(t, n, d, dtype=torch.float32)
    smax = torch.empty(t, n, dtype=torch.float32)
    ssum = torch.empty(t, n, dtype=torch.float32)
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        s = _scores(query[qs:qe], key[ks:ke], scale, sparse_mode == 3)
        m = s.amax(-1)
        p = torch.exp(s - m.unsqueeze(-1))
        l = p.sum(-1)
        rep = n // key.shape[1]
        out[qs:qe] = torch.einsum("nqk,knd->qnd", p / l.unsqueeze(-1), value[ks:ke].float().repeat_interleave(rep, 1))
        smax[qs:qe], ssum[qs:qe] = m.t(), l.t()
    rep8 = lambda x: x.unsqueeze(-1).expand(t, n, 8).contiguous()  # noqa: E731
    return out.to(query.dtype), rep8(smax), rep8(ssum), torch.empty(0), 0, 0, 0


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                              attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=INT_MAX,
                              next_tockens=INT_MAX, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
                              actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                              sync=False):
    _check_common(query, key, value, head_num, input_layout, atten_mask, sparse_mode, keep_prob,
                  (pse, padding_mask, prefix))
    cq = _check_seq("actual_seq_qlen", actual_seq_qlen, query.shape[0])
    ck = _check_seq("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
    t, n, d = query.shape
    for name, x in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if x is None or tuple(x.shape) != (t, n, 8) or x.dtype != torch.float32:
            raise RuntimeError(f"emulated torch_npu: {name} must be fp32 [T, N, 8]")
    if attention_in is None or attention_in.shape != query.shape or attention_in.dtype != query.dtype:
        raise RuntimeError("emulated torch_npu: attention_in must be the forward output, shaped and typed like query")
    rep = n // key.shape[1]
    dq = torch.empty(t, n, d, dtype=torch.float32)
    dk = torch.zeros(key.shape, dtype=torch.float32)
    dv = torch.zeros(value.shape, dtype=torch.float32)
    m, l = softmax_max[..., 0], softmax_sum[..., 0]
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        s = _scores(query[qs:qe], key[ks:ke], scale_value, sparse_mode == 3)
        p = torch.exp(s - m[qs:qe].t().unsqueeze(-1)) / l[qs:qe].t().unsqueeze(-1)
        do = dy[qs:qe].float()
        vv = value[ks:ke].float().repeat_interleave(rep, 1)
        kk = key[ks:ke].float().repeat_interleave(rep, 1)
        dp = torch.einsum("qnd,knd->nqk", do, vv)
        delta = (do * attention_in[qs:qe].float()).sum(-1).t().unsqueeze(-1)
        ds = p * (dp - delta) * scale_value
        dq[qs:qe] = torch.einsum("nqk,knd->qnd", ds, kk)
        dk_full = torch.einsum("nqk,qnd->knd", ds, query[qs:qe].float())
        dv_full = torch.einsum("nqk,qnd->knd", p, do)
        dk[ks:ke] = dk_full.view(ke - ks, key.shape[1], rep, d).sum(2)
        dv[ks:ke] = dv_full.view(ke - ks, key.shape[1], rep, d).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), torch.empty(0)


def npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
                              cur_softmax_sum, actual_seq_qlen=None, layout="SBH"):
    if layout != "TND":
        raise NotImplementedError(f"emulated torch_npu: only layout='TND' is emulated, got {layout!r}")
    if prev_attn_out.shape[-1] % 64:
        raise RuntimeError("emulated torch_npu: TND needs the last dimension of prev_attn_out to be a multiple of 64")
    if actual_seq_qlen is None:
        raise RuntimeError("emulated torch_npu: TND needs actual_seq_qlen")
    seq = actual_seq_qlen.tolist()
    if seq[0] != 0 or seq[-1] != prev_attn_out.shape[0] or any(b < a for a, b in zip(seq, seq[1:])):
        raise RuntimeError("emulated torch_npu: actual_seq_qlen must be non-decreasing from 0 to T")
    if cur_attn_out.dtype != prev_attn_out.dtype or cur_attn_out.shape != prev_attn_out.shape:
        raise RuntimeError("emulated torch_npu: cur_attn_out must match prev_attn_out in dtype and shape")
    smax = torch.maximum(prev_softmax_max, cur_softmax_max)
    prev_scaled = prev_softmax_sum * torch.exp(prev_softmax_max - smax)
    cur_scaled = cur_softmax_sum * torch.exp(cur_softmax_max - smax)
    ssum = prev_scaled + cur_scaled
    out = (prev_attn_out.float() * (prev_scaled / ssum)[..., :1] + cur_attn_out.float() * (cur_scaled / ssum)[..., :1])
    return out.to(prev_attn_out.dtype), smax, ssum


def install(with_ring_update: bool = True) -> types.ModuleType:
    """Put the emulation in ``sys.modules["torch_npu"]`` (call only inside test processes)."""
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = __doc__
    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu_fusion_attention_grad = npu_fusion_attention_grad
    if with_ring_update:
        mod.npu_ring_attention_update = npu_ring_attention_update
    sys.modules["torch_npu"] = mod
    return mod

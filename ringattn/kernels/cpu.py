"""CPU backend: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward), per segment.

The op takes ``[B, H, L, D]`` views, handles GQA itself and returns fp32 LSE ``[B, H, L]``.
Its LSE for a fully masked row would be 0, not -inf; the planner never produces such rows.

A sliding window (``call.window``, flash_attn's ``(left, right)`` pair aligned to each segment's
bottom-right corner) becomes an additive mask, the op's ``attn_mask`` (``-inf`` outside the band, in the
query's dtype: the op refuses boolean masks), applied to tiles of ``TILE`` query rows against the keys
their windows reach, so memory stays ``O(TILE * (TILE + window))`` however long the segment; every row of
a tile sees all its keys in the tile, so its output and LSE are exact, and dK/dV add up over tiles.

Half-precision inputs are computed in fp32 and out/grads are returned in fp32: a block's
partial result is merged (forward) or summed over steps (backward) before the one final
rounding, so bf16 CP results stay as accurate as a single-device bf16 kernel, whose own
fp32 accumulators are rounded once.
"""

from __future__ import annotations

import torch

#: backward may be given the merged output in fp32 (it computes in fp32 anyway)
BACKWARD_TAKES_FP32_OUT = True
#: honours ``VarlenCall.window`` (sliding windows)
SUPPORTS_WINDOW = True

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: query rows per masked tile of a windowed segment
TILE = 256


def _bhld(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)


def _compute(*xs):
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]


def _tiles(call):
    """``(q0, q1, k0, k1, mask offsets)`` per tile of every windowed segment (derived once per call)."""
    left, right = call.window
    out = []
    for i in range(call.num_segments):
        qs, qe, ks, ke = call.cu_q[i], call.cu_q[i + 1], call.cu_k[i], call.cu_k[i + 1]
        sq, sk = qe - qs, ke - ks
        a = sk - sq
        for r0 in range(0, sq, TILE):
            r1 = min(sq, r0 + TILE)
            c0, c1 = max(0, r0 + a - left), min(sk, r1 + a + right)  # keys some row of the tile sees
            out.append((qs + r0, qs + r1, ks + c0, ks + c1, r0 + a - c0))
    return out


def _band(rows: int, cols: int, shift: int, window, dtype, device) -> torch.Tensor:
    """Additive ``[1, 1, rows, cols]`` mask: row ``r`` sees columns ``[r + shift - left, r + shift + right]``."""
    left, right = window
    r = torch.arange(rows, device=device).unsqueeze(1) + shift
    c = torch.arange(cols, device=device).unsqueeze(0)
    keep = (c >= r - left) & (c <= r + right)
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))[None, None]


def _blocks(call, dtype, device):
    """``(q0, q1, k0, k1, causal, mask)`` per op call: every segment (no mask), or under a window every tile with its
    band as the additive mask (tiles of a segment share keys, so dK/dV add up)."""
    if call.window is None:
        cu_q, cu_k = call.cu_q, call.cu_k
        for i in range(call.num_segments):
            yield cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1], call.causal, None
        return
    for q0, q1, k0, k1, shift in call.cached(("cpu tiles",), lambda: _tiles(call)):
        yield q0, q1, k0, k1, False, _band(q1 - q0, k1 - k0, shift, call.window, dtype, device)


def forward(q, k, v, call, scale):
    q, k, v = _compute(q, k, v)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1, causal, mask in _blocks(call, q.dtype, q.device):
        o, l = _fwd(_bhld(q[q0:q1]), _bhld(k[k0:k1]), _bhld(v[k0:k1]), 0.0, causal, attn_mask=mask, scale=scale)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[q0:q1] = l[0].transpose(0, 1)
    return out, lse


def backward(dout, q, k, v, out, lse, call, scale):
    dout, q, k, v, out = _compute(dout, q, k, v, out)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for q0, q1, k0, k1, causal, mask in _blocks(call, q.dtype, q.device):
        g_q, g_k, g_v = _bwd(
            _bhld(dout[q0:q1]),
            _bhld(q[q0:q1]),
            _bhld(k[k0:k1]),
            _bhld(v[k0:k1]),
            _bhld(out[q0:q1]),
            lse[q0:q1].t().unsqueeze(0),
            0.0,
            causal,
            attn_mask=mask,
            scale=scale,
        )
        dq[q0:q1] = g_q[0].transpose(0, 1)
        dk[k0:k1] += g_k[0].transpose(0, 1)
        dv[k0:k1] += g_v[0].transpose(0, 1)
    return dq, dk, dv

"""NVIDIA GPU backend: FlashAttention-2 varlen, through the ``flash_attn`` package or torch's own copy.

* ``flash_attn`` >= 2.6 when importable: ``flash_attn_interface._flash_attn_varlen_forward`` /
  ``_flash_attn_varlen_backward``, called **positionally** by the installed version's signature
  (:func:`flash_forward_args`, :func:`flash_backward_args`). From 2.7 these are
  ``torch.library.custom_op`` objects whose ``inspect.signature`` is ``(*args, **kwargs)``, so keyword
  filtering by signature cannot work; 2.6 takes ``window_size`` as one tuple and returns an 8-tuple,
  2.7+ takes ``window_size_left, window_size_right`` and returns a 4-tuple.
* ``flash_attn`` < 2.6 is not used (a warning says so once): its varlen forward returns the LSE padded
  to ``[batch, heads, max_seqlen_q]`` (2.6.0 added ``unpadded_lse`` in ``csrc/flash_attn/flash_api.cpp``);
  torch's built-in kernel is used instead.
* otherwise ``torch.ops.aten._flash_attention_forward/_backward`` with ``cum_seq_q/k`` (schemas in
  torch's ``native_functions.yaml``; varlen LSE ``[H, total_q]`` per ``torch/_meta_registrations.py``
  ``meta__flash_attention_forward``), the LSE made contiguous for backward.

Both take fp16/bf16, GQA natively, int32 ``cu_seqlens`` on the device (built once per call and device
and cached), head dims that are multiples of 8 up to 256 (the varlen backward has always required
``head_size % 8 == 0``; flash_attn >= 2.7 checks it in the forward too, older forwards padded
internally), and GPUs of compute capability 8.0 or newer ("FlashAttention only supports Ampere GPUs
or newer", ``csrc/flash_attn/flash_api.cpp``; torch's copy checks the same). Head dims that are not a
multiple of 8 are zero-padded here (exact: the scale is explicit and the padded output columns are
dropped); fp32 inputs, head dims above 256 and pre-Ampere GPUs run on :mod:`ringattn.kernels.math`
(a warning says so once): that path is exact but needs O(L^2) memory per segment.

Causal segments have equal q/k lengths, so flash's bottom-right alignment is plain causal.

Sliding windows: ``call.window`` is already flash's ``(window_size_left, window_size_right)`` pair, aligned to
each segment's bottom-right corner (``csrc/flash_attn/flash_api.cpp``, ``mha_varlen_fwd``/``mha_varlen_bwd``:
query ``i`` of a segment sees keys ``[i + sk - sq - left, i + sk - sq + right]``; ``-1`` means infinite; with
``causal`` the right size is 0): passed as one tuple to flash_attn 2.6.x and as two ints from 2.7, and as
``window_size_left`` / ``window_size_right`` to ``aten._flash_attention_forward/_backward`` (added to the
aten schema by pytorch#126061). The planner trims every windowed segment so that each query row sees at
least one key (a fully masked row would return LSE +inf) and ``left >= 0``.
The pair is not passed through untouched: ``mha_varlen_fwd/bwd`` set a side ``>= max_seqlen_k`` to -1 and
``set_params_fprop`` then turns a negative side back into ``max_seqlen_k`` unless both are negative
(flash_api.cpp at v2.6.0-v2.8.3, and torch's vendored copy). A read of ``sk`` keys by ``sq > max_seqlen_k + 1``
queries has ``right = q_end - k_end >= sq``; clamped to ``max_seqlen_k`` it masks keys of the top rows. So windowed
calls pass ``max_seqlen_k = max(max_k, max_q)`` (:func:`flash_max_k`): every clamp then keeps the documented mask.
cuDNN varlen (``aten._cudnn_attention_forward`` with ``cum_seq_q/k``) is faster on Hopper but is not
offered until its backward is shown to work on a GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import math as _math

#: honours ``VarlenCall.window`` (flash's window_size pair, see the module docstring)
SUPPORTS_WINDOW = True

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_FLASH_ATTN = (2, 6)


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.lru_cache(maxsize=1)
def flash_attn_api():
    """``(version, varlen_forward, varlen_backward)`` of an installed ``flash_attn`` >= 2.6, or None."""
    try:
        import flash_attn  # noqa: PLC0415 - optional
        from flash_attn import flash_attn_interface as fai  # noqa: PLC0415
    except (ImportError, RuntimeError):
        return None
    version = _version(getattr(flash_attn, "__version__", "0.0"))
    if version < MIN_FLASH_ATTN:
        warnings.warn(
            f"ringattn: flash_attn {flash_attn.__version__} returns a padded varlen LSE; using torch's "
            f"built-in flash kernels instead (install flash_attn>=2.6 to use it)",
            stacklevel=2,
        )
        return None
    return version, fai._flash_attn_varlen_forward, fai._flash_attn_varlen_backward


def flash_forward_args(version, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window=None) -> tuple:
    """Positional arguments of ``_flash_attn_varlen_forward`` for flash_attn ``version``.

    2.6.x: ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal, window_size, softcap, alibi_slopes, return_softmax, block_table)``;
    2.7.0-2.8.x: ``(..., causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
    alibi_slopes=None, return_softmax=False, ...)`` (flash_attn/flash_attn_interface.py at each tag).
    ``window``: the ``(left, right)`` pair (None: ``(-1, -1)``, no window).
    """
    left, right = window if window is not None else (-1, -1)
    common = (q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal)
    if version >= (2, 7):
        return common + (left, right, 0.0, None, False)
    return common + ((left, right), 0.0, None, False, None)


def flash_forward_lse(version, result) -> torch.Tensor:
    """The ``[H, total_q]`` LSE of a varlen forward result: 2.7+ returns ``(out, softmax_lse, S_dmask,
    rng_state)``, 2.6 ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)``."""
    return result[1] if version >= (2, 7) else result[5]


def flash_backward_args(
    version,
    dout,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    cu_q,
    cu_k,
    max_q,
    max_k,
    scale,
    causal,
    deterministic=False,
    window=None,
) -> tuple:
    """Positional arguments of ``_flash_attn_varlen_backward`` for flash_attn ``version``.

    ``(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, ...)`` then 2.6.x: ``window_size, softcap, alibi_slopes,
    deterministic, rng_state``; 2.7.0-2.8.x: ``window_size_left, window_size_right, softcap, alibi_slopes,
    deterministic, rng_state`` (flash_attn/flash_attn_interface.py at each tag). dq/dk/dv are written in place.
    ``window``: the ``(left, right)`` pair (None: ``(-1, -1)``, no window).
    """
    left, right = window if window is not None else (-1, -1)
    common = (dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale, causal)
    if version >= (2, 7):
        return common + (left, right, 0.0, None, deterministic, None)
    return common + ((left, right), 0.0, None, deterministic, None)


def flash_max_k(call) -> int:
    """``max_seqlen_k`` to pass for ``call``: its longest key segment, or under a window at least its longest query
    segment too (``M >= sq`` for every segment makes flash's clamps exact: a side ``>= M`` either drops out or
    becomes ``M``, and row ``r`` then keeps every column ``< min(sk, r + 1 + sk - sq + M) = sk``; a left side ``>= M
    >= sk`` masks nothing either). A larger ``max_seqlen_k`` is allowed: it bounds the segments, and the kernels take
    each segment's length from ``cu_seqlens_k``."""
    return call.max_k if call.window is None else max(call.max_k, call.max_q)


def _aten_window(window) -> dict:
    """aten's window keywords for ``window`` (none without one, so older schemas keep working)."""
    return {} if window is None else {"window_size_left": window[0], "window_size_right": window[1]}


def _device_cu(call, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``cu_seqlens`` on ``device``, built once per call and device."""
    return call.cached(
        ("cuda-cu", torch.device(device)),
        lambda: (
            torch.tensor(call.cu_q, dtype=torch.int32).to(device),
            torch.tensor(call.cu_k, dtype=torch.int32).to(device),
        ),
    )


@functools.lru_cache(maxsize=8)
def _no_rng(device) -> tuple[torch.Tensor, torch.Tensor]:
    """rng_state / unused tensors for the aten backward; not read without dropout."""
    return torch.zeros(2, dtype=torch.int64, device=device), torch.empty(0, device=device)


@functools.lru_cache(maxsize=16)
def _pre_ampere(device: torch.device) -> bool:
    """True on a CUDA device of compute capability < 8.0 (a host query, cached per device)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8


def _fallback(q) -> bool:
    """True when the flash kernels cannot take ``q`` (fp32, head dim > 256, a pre-Ampere GPU): warn once, use math."""
    if q.dtype in _FLASH_DTYPES and q.shape[-1] <= MAX_HEAD_DIM and not _pre_ampere(q.device):
        return False
    warnings.warn(
        f"ringattn: the CUDA flash kernels take fp16/bf16 with head_dim <= {MAX_HEAD_DIM} on GPUs of compute "
        f"capability >= 8.0; dtype {q.dtype}, head_dim {q.shape[-1]} on {q.device} run on the math backend "
        f"(exact, O(L^2) memory per segment)",
        stacklevel=3,
    )
    return True


def _pad8(*xs):
    d = xs[0].shape[-1]
    if d % 8 == 0:
        return xs
    return tuple(torch.nn.functional.pad(x, (0, 8 - d % 8)) for x in xs)


def forward(q, k, v, call, scale):
    if _fallback(q):
        return _math.forward(q, k, v, call, scale)
    d = q.shape[-1]
    cq, ck = _device_cu(call, q.device)
    q, k, v = _pad8(*(x.contiguous() for x in (q, k, v)))  # K/V are strided views of the stacked KV buffer
    api = flash_attn_api()
    if api is not None:
        version, fwd, _ = api
        res = fwd(
            *flash_forward_args(
                version, q, k, v, cq, ck, call.max_q, flash_max_k(call), scale, call.causal, call.window
            )
        )
        out, lse = res[0], flash_forward_lse(version, res)
    else:
        out, lse = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cq,
            ck,
            call.max_q,
            flash_max_k(call),
            0.0,
            call.causal,
            False,
            scale=scale,
            **_aten_window(call.window),
        )[:2]
    return out[..., :d], lse.t()


def backward(dout, q, k, v, out, lse, call, scale):
    if _fallback(q):
        return _math.backward(dout, q, k, v, out, lse, call, scale)
    d = q.shape[-1]
    cq, ck = _device_cu(call, q.device)
    lse_ht = lse.t().contiguous()
    dout, q, k, v, out = _pad8(*(x.contiguous() for x in (dout, q, k, v, out.to(q.dtype))))
    api = flash_attn_api()
    if api is not None:
        version, _, bwd = api
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bwd(
            *flash_backward_args(
                version,
                dout,
                q,
                k,
                v,
                out,
                lse_ht,
                dq,
                dk,
                dv,
                cq,
                ck,
                call.max_q,
                flash_max_k(call),
                scale,
                call.causal,
                window=call.window,
            )
        )
    else:
        rng, unused = _no_rng(q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse_ht,
            cq,
            ck,
            call.max_q,
            flash_max_k(call),
            0.0,
            call.causal,
            rng,
            unused,
            scale=scale,
            **_aten_window(call.window),
        )
    return dq[..., :d], dk[..., :d], dv[..., :d]

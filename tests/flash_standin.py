"""STAND-INS (pure torch, CPU) for the CUDA backend's two kernel providers, for tests without a GPU.

Neither is flash_attn nor torch's CUDA kernel, and neither calls ringattn. Each stand-in

1. binds its arguments to the provider's real signature (flash_attn: the parameter names of
   ``flash_attn/flash_attn_interface.py`` at each tag, :data:`FLASH_ATTN_SIGNATURES`;
   aten: the schema of the installed torch, ``torch.ops.aten._flash_attention_forward.default._schema``,
   i.e. ``native_functions.yaml``), so a positional argument in the wrong place fails;
2. enforces the provider's own argument checks, each cited below by file and line at the tag (flash_attn) or
   by function and message (torch's vendored copy); the device checks (``CHECK_DEVICE``: tensors on CUDA) are
   the one rule left out, since these tests run on CPU;
3. computes attention itself, independently of ringattn, in float64 per segment from the arguments it was
   given (``cu_seqlens``, scale, causal flag, window pair and ``max_seqlen_q/k`` as [F-win] says the kernels
   apply them; in backward the ``out`` and LSE it is handed, as the kernels use them), and returns the
   provider's result layout in the input dtype (one rounding, as a kernel that accumulates in fp32 does) with an
   fp32 ``[H, total_q]`` LSE.

flash_attn rules, ``csrc/flash_attn/flash_api.cpp`` (Dao-AILab/flash-attention), line numbers at
v2.6.0 / v2.6.3 / v2.7.0 / v2.7.4.post1 / v2.8.3 (``mha_varlen_fwd`` starts at 528 / 534 / 518 / 515 / 515,
``mha_varlen_bwd`` at 1019 / 1042 / 996 / 974 / 974):

* [F-dtype] fp16/bf16 only, "FlashAttention only support fp16 and bf16 data type": fwd 558 / 565 / 549 / 545 /
  545, bwd 1061 / 1084 / 1038 / 1015 / 1015; k, v (and in backward out, dout) of q's dtype on the next lines.
* [F-cu] ``cu_seqlens_q/k`` int32, "cu_seqlens_q must have dtype int32": fwd 565 / 572 / 556 / 549 / 549, bwd
  1070 / 1093 / 1047 / 1021 / 1021; contiguous (``CHECK_CONTIGUOUS``): fwd 584 / 591 / 575 / 568 / 568, bwd
  1082 / 1105 / 1059 / 1033 / 1033; shape ``batch_size + 1`` (``CHECK_SHAPE``).
* [F-stride] last dimension contiguous, "Input tensor must have contiguous last dimension": fwd q/k/v 581 / 588 /
  572 / 565 / 565, bwd q/k/v/out/dout 1077 / 1100 / 1054 / 1028 / 1028 — the Python wrappers first apply
  ``maybe_contiguous`` (``x.contiguous() if x.stride(-1) != 1``) to q, k, v (and dout, out in backward), so
  through ``_flash_attn_varlen_forward/_backward`` only dq/dk/dv (written in place) can violate it.
* [F-hdim] head size at most 256: fwd 620 / 627 / 611 / 604 / 604, bwd 1096 / 1119 / 1072 / 1046 / 1046.
  A multiple of 8: backward always, "head_size should be a multiple of 8", 1095 / 1118 / 1071 / 1045 / 1045;
  forward from v2.7.0, "query, key, value, and out_ must have a head_size that is a multiple of 8", 612 (v2.7.0) /
  605 (v2.7.4.post1, v2.8.3); v2.6.x forwards pad internally instead (648 / 655) and return ``out`` cut back,
  ``q_padded`` & co. padded. v2.6.x backwards take ``dout`` unpadded, "head_size must be head_size_og rounded to
  a multiple of 8" (1107 / 1131); v2.7+ check ``dout`` at the padded head size (``CHECK_SHAPE(dout, total_q,
  num_heads, head_size)``).
* [F-heads] "Number of heads in key/value must divide number of heads in query": fwd 621 / 628 / 613 / 606 / 606,
  bwd 1100 / 1123 / 1076 / 1047 / 1047; shapes ``q [total_q, H, D]``, ``k/v [total_k, Hk, D]``, and in backward
  ``out [total_q, H, D]``, ``dq/dk/dv`` like q/k/v, of q's dtype with a contiguous last dimension.
* [F-lse] backward reads ``softmax_lse`` as ``h x total_q`` (the parameter's comment, 1024 / 1047 / 1001 / 979 /
  979; "LSE is stored in unpadded format") through its data pointer: it must be fp32 ``[H, total_q]`` and
  contiguous.
* [F-doc] ``flash_attn_varlen_func``'s docstring (flash_attn_interface.py): ``max_seqlen_q/k`` are the maximum
  sequence lengths in the batch; with ``causal`` and ``seqlen_q != seqlen_k`` the mask is aligned to the
  bottom-right corner.
* Results: v2.6.x ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)``, v2.7+ ``(out, softmax_lse,
  S_dmask, rng_state)`` (flash_attn_interface.py at each tag); the backward writes dq, dk, dv in place.
* [F-win] sliding windows, as the kernels apply them (:func:`flash_window_rule`, :func:`window_keep`). The
  documented rule (``flash_attn_varlen_func``'s docstring, flash_attn_interface.py 1089 / 1372 / 1413 / 1408 at
  v2.6.3 / v2.7.0 / v2.7.4.post1 / v2.8.3): query ``i`` of a segment attends keys ``[i + seqlen_k - seqlen_q -
  window_size[0], i + seqlen_k - seqlen_q + window_size[1]]`` inclusive (aligned to each segment's bottom-right
  corner), ``-1`` meaning infinite; "If the row of the mask is all zero, the output will be zero". What the code
  does with the pair, in this order (flash_api.cpp, line numbers at v2.6.0 / v2.6.3 / v2.7.0 / v2.7.4.post1 /
  v2.8.3):

  1. ``mha_varlen_fwd``: ``if (max_seqlen_q == 1 && !alibi_slopes_.has_value()) { is_causal = false; }``
     601 / 608 / 592 / 585 / 585 (the backward has no such line); then ``if (is_causal) { window_size_right =
     0; }`` — causal forces right to 0 and keeps left — fwd 602 / 609 / 593 / 586 / 586, ``mha_varlen_bwd``
     1048 / 1071 / 1025 / 1002 / 1002.
  2. ``if (window_size_left >= max_seqlen_k) { window_size_left = -1; }`` and the same for right, with the
     ``max_seqlen_k`` *argument*: fwd 623-624 / 630-631 / 615-616 / 608-609 / 608-609, bwd 1109-1110 /
     1133-1134 / 1084-1085 / 1055-1056 / 1055-1056.
  3. ``set_params_fprop`` (also run by ``set_params_dgrad``), with ``seqlen_k = max_seqlen_k``: ``is_causal =
     window_size_left < 0 && window_size_right == 0`` (134 / 134 / 134 / 139 / 139); ``if (window_size_left < 0 &&
     window_size_right >= 0) { window_size_left = seqlen_k; }`` (136 / 136 / 136 / 141 / 141); ``if
     (window_size_left >= 0 && window_size_right < 0) { window_size_right = seqlen_k; }`` (137 / 137 / 137 / 142 /
     142). So a negative value is infinite only when both are negative; otherwise it becomes ``max_seqlen_k``.
  4. the kernel: ``Is_local = (window_size_left >= 0 || window_size_right >= 0) && !Is_causal``
     (``csrc/flash_attn/src/flash_fwd_launch_template.h`` LOCAL_SWITCH, 67 / 67 / 67 / 70 / 70); a local row ``r``
     of a segment with ``sq`` queries and ``sk`` keys (``block_info.h``: ``actual_seqlen_q/k`` from
     ``cu_seqlens``) keeps the columns ``[max(0, r + sk - sq - left), min(sk, r + 1 + sk - sq + right))``
     (``csrc/flash_attn/src/mask.h`` ``col_idx_limit_left/right``, 52-53 / 52-53 / 52-53 / 53-54 / 53-54); a causal
     call is the same with left infinite and right 0 (``apply_mask_causal``); otherwise nothing is masked.
  5. a row with no key left: output 0 and LSE ``+inf`` (``csrc/flash_attn/src/softmax.h``: ``lse = (sum == 0.f ||
     sum != sum) ? INFINITY``, 179 at v2.6.3, 180 at v2.8.3; whole key-less row blocks exit early writing 0 and
     ``gLSE(row) = INFINITY``, ``flash_fwd_kernel.h`` 130 / 122 / 122 / 125 / 125). In backward ``exp(s - LSE)``
     is then 0: such a row contributes nothing.

  Steps 2-3 are not the documented rule when ``window_size_right >= max_seqlen_k`` while ``0 <= window_size_left <
  max_seqlen_k``: right becomes ``max_seqlen_k``, which masks keys of rows ``r < sq - max_seqlen_k - 1`` that the
  documented rule keeps (a segment with more queries than ``max_seqlen_k + 1``). The stand-ins follow the code.

torch's vendored copy, pytorch/pytorch ``aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp``
(commit 03b7c19d), which ``aten::_flash_attention_forward/_backward`` call with ``cum_seq_q/k``:

* [T-fwd] ``mha_varlen_fwd``: "FlashAttention only support fp16 and bf16 data type"; "query and key/value must
  have the same dtype"; "cu_seqlens_q must have dtype int32"; "Input tensor must have contiguous last
  dimension"; ``CHECK_CONTIGUOUS(cu_seqlens_q)``; "FlashAttention forward only supports head dimension at most
  256"; "Number of heads in key/value must divide number of heads in query"; "head_size must be a multiple of 8,
  this is ensured by padding!" (no internal padding: the caller pads).
* [T-bwd] ``mha_varlen_bwd``: the same dtype/int32/stride/contiguity checks for q, k, v, out, dout;
  "head_size should be a multiple of 8"; "head_size_og should be a multiple of 8, this is ensured by padding!";
  head size at most 256; the LSE ``[num_heads, total_q]`` (unpadded, read by pointer).
* [T-meta] ``torch/_meta_registrations.py`` ``meta__flash_attention_forward``: varlen results ``(attention,
  logsumexp [num_heads, total_q] fp32, seed, offset, debug_mask)``; ``meta__flash_attention_backward``:
  ``(grad_query, grad_key, grad_value)`` shaped like query, key, value.
* [T-win] ``window_size_left/right`` (``SymInt?``, default None, in the installed schema): the aten wrapper maps None
  to -1 and passes both with ``is_causal`` to ``mha_varlen_fwd/bwd`` (``_flash_attention_backward``,
  ``aten/src/ATen/native/transformers/cuda/attention_backward.cu`` at pytorch commit 00afd8f2: ``non_null_window_left
  = window_size_left.has_value() ? window_size_left.value() : -1``, and right alike; the forward wrapper in
  ``attention.cu`` was not readable in the stored index and is assumed to do the same — with ``is_causal`` the
  vendored ``mha_varlen_fwd`` forces right to 0 anyway). The vendored flash_api.cpp at 03b7c19d has steps 1-3 of
  [F-win] verbatim (``mha_varlen_fwd``: ``max_seqlen_q == 1`` -> not causal, causal -> right 0, the
  ``>= max_seqlen_k`` clamps; ``mha_varlen_bwd``: causal -> right 0, the clamps; ``set_params_fprop``: the same
  three lines), and the same kernels. torch's own ``torch/nn/attention/varlen.py`` (installed 2.13) passes
  ``window_size_left=window_size[0], window_size_right=window_size[1]`` to this op.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch

HALF = (torch.float16, torch.bfloat16)

# Parameter names (and whether they have a default: a trailing "=") of flash_attn's varlen functions, transcribed
# from flash_attn/flash_attn_interface.py of Dao-AILab/flash-attention at each tag named here: v2.6.0 (no
# defaults), v2.6.3 (defaults; leftpad_k from v2.6.1, seqused_k from v2.6.2), v2.7.0 (custom ops; window_size split
# in two), v2.7.4.post1 and v2.8.3 (zero_tensors, added in v2.7.3 by PR #1433).
_FA_FWD_260 = (
    "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale causal window_size "
    "softcap alibi_slopes return_softmax block_table"
).split()
_FA_FWD_263 = (
    "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale causal "
    "window_size= softcap= alibi_slopes= return_softmax= block_table= leftpad_k= seqused_k="
).split()
_FA_FWD_270 = (
    "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale causal "
    "window_size_left= window_size_right= softcap= alibi_slopes= return_softmax= block_table= leftpad_k= "
    "seqused_k="
).split()
_FA_FWD_273 = _FA_FWD_270 + ["zero_tensors="]
_FA_BWD_26 = (
    "dout q k v out softmax_lse dq dk dv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic rng_state="
).split()
_FA_BWD_270 = (
    "dout q k v out softmax_lse dq dk dv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size_left window_size_right softcap alibi_slopes deterministic "
    "rng_state="
).split()
_FA_BWD_273 = _FA_BWD_270 + ["zero_tensors="]
FLASH_ATTN_SIGNATURES = {
    "2.6.0": (_FA_FWD_260, _FA_BWD_26),
    "2.6.3": (_FA_FWD_263, _FA_BWD_26),
    "2.7.0": (_FA_FWD_270, _FA_BWD_270),
    "2.7.4.post1": (_FA_FWD_273, _FA_BWD_273),
    "2.8.3": (_FA_FWD_273, _FA_BWD_273),
}


class FlashError(RuntimeError):
    """What a violated ``TORCH_CHECK`` raises (torch turns it into RuntimeError)."""


def _check(cond, msg: str, rule: str) -> None:
    if not cond:
        raise FlashError(f"stand-in flash: {msg} [{rule}]")


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _cu(name: str, cu: torch.Tensor, total: int, max_len: int, rule: str) -> list[int]:
    _check(isinstance(cu, torch.Tensor) and cu.dtype == torch.int32, f"{name} must have dtype int32", rule)
    _check(cu.is_contiguous() and cu.dim() == 1, f"{name} must be a contiguous 1-D tensor", rule)
    ends = cu.tolist()
    _check(
        ends[0] == 0 and all(a <= b for a, b in zip(ends, ends[1:])) and ends[-1] <= total,
        f"{name} must rise from 0 to at most {total}, got {ends}",
        rule,
    )
    _check(
        max(b - a for a, b in zip(ends, ends[1:])) <= max_len,
        f"max_seqlen {max_len} is below the longest segment of {name} {ends}",
        "F-doc",
    )
    return ends


def flash_window_rule(causal: bool, left: int, right: int, max_q: int, max_k: int, forward: bool) -> tuple:
    """``(kind, left, right)`` as the kernel applies ``causal`` and the window pair [F-win] steps 1-4: ``kind`` is
    ``"causal"``, ``"local"`` or ``"dense"``; ``max_q`` / ``max_k`` are the call's ``max_seqlen_q/k`` arguments."""
    if forward and max_q == 1:  # step 1, mha_varlen_fwd only (no ALiBi here)
        causal = False
    if causal:
        right = 0
    if left >= max_k:  # step 2
        left = -1
    if right >= max_k:
        right = -1
    is_causal = left < 0 and right == 0  # step 3, set_params_fprop (seqlen_k = max_seqlen_k)
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    if is_causal:  # step 4
        return "causal", -1, 0
    if left >= 0 or right >= 0:
        return "local", left, right
    return "dense", -1, -1


def window_keep(sq: int, sk: int, rule: tuple) -> torch.Tensor:
    """bool ``[sq, sk]``: the keys each query row of one segment keeps under ``rule`` (:func:`flash_window_rule`),
    ``mask.h``'s column limits with the segment's own lengths [F-win] step 4."""
    kind, left, right = rule
    r, c = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    if kind == "dense":
        return torch.ones(sq, sk, dtype=torch.bool)
    keep = c < torch.clamp(r + 1 + sk - sq + right, max=sk)
    if kind == "local":
        keep &= c >= torch.clamp(r + sk - sq - left, min=0)
    return keep


def _attention64(q, k, v, cu_q, cu_k, scale, rule):
    """float64 ``(out [Tq, H, D], lse [H, Tq])`` per segment under ``rule`` (:func:`flash_window_rule`; causal
    aligned bottom-right [F-doc]); a row that keeps no key gets out 0 and LSE ``+inf`` [F-win] step 5."""
    tq, h, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros(tq, h, d, dtype=torch.float64)
    lse = torch.full((h, tq), float("inf"), dtype=torch.float64)
    for (qs, qe), (ks, ke) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        if qe == qs or ke == ks:
            continue
        qq = q[qs:qe].double()
        kk = k[ks:ke].double().repeat_interleave(rep, 1)
        vv = v[ks:ke].double().repeat_interleave(rep, 1)
        keep = window_keep(qe - qs, ke - ks, rule)
        s = (torch.einsum("qhd,khd->hqk", qq, kk) * scale).masked_fill(~keep, float("-inf"))
        seen = keep.any(-1)  # [sq]
        l_seg = torch.logsumexp(s, -1)
        lse[:, qs:qe] = torch.where(seen, l_seg, torch.full_like(l_seg, float("inf")))
        p = torch.exp(s - l_seg.unsqueeze(-1)).nan_to_num(0.0)  # a key-less row: exp(-inf - -inf) -> 0
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, vv)
    return out, lse


def _attention64_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, rule):
    """float64 ``(dq, dk, dv)`` from the *given* ``out`` (the rowsum term) and ``lse`` ``[H, Tq]`` (the
    probabilities), as the flash backward kernels use them, under ``rule`` (:func:`flash_window_rule`)."""
    h = q.shape[1]
    hk = k.shape[1]
    rep = h // hk
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk = torch.zeros(k.shape[0], h, k.shape[2], dtype=torch.float64)
    dv = torch.zeros(k.shape[0], h, k.shape[2], dtype=torch.float64)
    for (qs, qe), (ks, ke) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        if qe == qs or ke == ks:
            continue
        qq, do, oo = q[qs:qe].double(), dout[qs:qe].double(), out[qs:qe].double()
        kk = k[ks:ke].double().repeat_interleave(rep, 1)
        vv = v[ks:ke].double().repeat_interleave(rep, 1)
        keep = window_keep(qe - qs, ke - ks, rule)
        s = (torch.einsum("qhd,khd->hqk", qq, kk) * scale).masked_fill(~keep, float("-inf"))
        p = torch.exp(s - lse[:, qs:qe].double().unsqueeze(-1))  # LSE +inf (a key-less row): 0
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        ds = p * (dp - (do * oo).sum(-1).t().unsqueeze(-1)) * scale
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kk)
        dk[ks:ke] += torch.einsum("hqk,qhd->khd", ds, qq)
        dv[ks:ke] += torch.einsum("hqk,qhd->khd", p, do)
    fold = lambda x: x.view(x.shape[0], hk, rep, x.shape[2]).sum(2)  # noqa: E731 - GQA: sum each group's heads
    return dq, fold(dk), fold(dv)


def _check_qkv(q, k, v, rule_dtype, rule_heads):
    _check(q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type", rule_dtype)
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype", rule_dtype)
    _check(
        q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and k.shape[2] == q.shape[2],
        "q [total_q, H, D], k/v [total_k, Hk, D] (CHECK_SHAPE)",
        rule_heads,
    )
    _check(
        q.shape[1] % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query", rule_heads
    )


def _check_stride(names_tensors, rule):
    for name, x in names_tensors:
        _check(x.stride(-1) == 1, f"{name} must have contiguous last dimension", rule)


def _pad8(x):
    d = x.shape[-1]
    return x if d % 8 == 0 else torch.nn.functional.pad(x, (0, 8 - d % 8))


def _maybe_contiguous(x):  # flash_attn_interface.py, every tag
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def flash_attn_module(version: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``(flash_attn, flash_attn.flash_attn_interface)`` stand-ins of ``version`` (a key of
    :data:`FLASH_ATTN_SIGNATURES`)."""
    key = _version(version)
    fwd_names, bwd_names = FLASH_ATTN_SIGNATURES[version]
    fwd_sig, bwd_sig = _signature(fwd_names), _signature(bwd_names)
    pads_forward = key < (2, 7)  # [F-hdim]

    def varlen_forward(*args, **kwargs):
        a = fwd_sig.bind(*args, **kwargs).arguments
        q, k, v = (_maybe_contiguous(a[n]) for n in ("q", "k", "v"))
        _check_qkv(q, k, v, "F-dtype", "F-heads")
        _check_stride((("q", q), ("k", k), ("v", v)), "F-stride")
        d_og = q.shape[2]
        _check(d_og <= 256, "FlashAttention forward only supports head dimension at most 256", "F-hdim")
        if not pads_forward:
            _check(d_og % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8", "F-hdim")
        _check(a["dropout_p"] == 0.0 and not a.get("return_softmax"), "the stand-in emulates no dropout", "stand-in")
        _check(
            a.get("softcap", 0.0) == 0.0 and a.get("alibi_slopes") is None,
            "the stand-in emulates no softcap or ALiBi",
            "stand-in",
        )
        cu_q = _cu("cu_seqlens_q", a["cu_seqlens_q"], q.shape[0], a["max_seqlen_q"], "F-cu")
        cu_k = _cu("cu_seqlens_k", a["cu_seqlens_k"], k.shape[0], a["max_seqlen_k"], "F-cu")
        _check(len(cu_q) == len(cu_k), "cu_seqlens_q/k must have shape (batch_size + 1)", "F-cu")
        rule = flash_window_rule(bool(a["causal"]), *_flash_pair(a, key), a["max_seqlen_q"], a["max_seqlen_k"], True)
        out, lse = _attention64(q, k, v, cu_q, cu_k, a["softmax_scale"], rule)
        out, lse = out.to(q.dtype), lse.float()
        if key >= (2, 7):
            return out, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)
        qp, kp, vp, outp = (_pad8(x) for x in (q, k, v, out))  # v2.6.x: padded internally, out cut back
        return out, qp, kp, vp, outp, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)

    def varlen_backward(*args, **kwargs):
        a = bwd_sig.bind(*args, **kwargs).arguments
        dout, q, k, v, out = (_maybe_contiguous(a[n]) for n in ("dout", "q", "k", "v", "out"))
        dq, dk, dv, lse = a["dq"], a["dk"], a["dv"], a["softmax_lse"]
        _check_qkv(q, k, v, "F-dtype", "F-heads")
        _check(out.dtype == q.dtype and dout.dtype == q.dtype, "query and out/dout must have the same dtype", "F-dtype")
        _check_stride((("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)), "F-stride")
        d = q.shape[2]
        _check(d % 8 == 0, "head_size should be a multiple of 8", "F-hdim")
        _check(d <= 256, "FlashAttention backward only supports head dimension at most 256", "F-hdim")
        _check(out.shape == q.shape, "out must have shape (total_q, num_heads, head_size)", "F-heads")
        if key < (2, 7):
            d_og = dout.shape[2]
            _check(d == (d_og + 7) // 8 * 8, "head_size must be head_size_og rounded to a multiple of 8", "F-hdim")
            _check(dout.shape[:2] == q.shape[:2], "dout must have shape (total_q, num_heads, head_size_og)", "F-heads")
            dout = _pad8(dout)
        else:
            _check(dout.shape == q.shape, "dout must have shape (total_q, num_heads, head_size)", "F-heads")
        for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            _check(g is not None and g.dtype == q.dtype, f"{name} must have the same dtype as q", "F-heads")
            _check(g.stride(-1) == 1, f"{name} must have contiguous last dimension", "F-stride")
            _check(g.shape == like.shape, f"{name} must be shaped like {name[1]}", "F-heads")
        _check(
            lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous(),
            f"softmax_lse must be a contiguous fp32 h x total_q tensor, got {tuple(lse.shape)} "
            f"{lse.dtype} contiguous={lse.is_contiguous()}",
            "F-lse",
        )
        _check(a["dropout_p"] == 0.0, "the stand-in emulates no dropout", "stand-in")
        cu_q = _cu("cu_seqlens_q", a["cu_seqlens_q"], q.shape[0], a["max_seqlen_q"], "F-cu")
        cu_k = _cu("cu_seqlens_k", a["cu_seqlens_k"], k.shape[0], a["max_seqlen_k"], "F-cu")
        rule = flash_window_rule(bool(a["causal"]), *_flash_pair(a, key), a["max_seqlen_q"], a["max_seqlen_k"], False)
        grads = _attention64_backward(dout, q, k, v, out, lse, cu_q, cu_k, a["softmax_scale"], rule)
        for dst, g in zip((dq, dk, dv), grads):
            dst.copy_(g.to(dst.dtype))
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)  # softmax_d

    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = version
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward, iface._flash_attn_varlen_backward = varlen_forward, varlen_backward
    pkg.flash_attn_interface = iface
    return pkg, iface


def _flash_pair(a: dict, key: tuple[int, int]) -> tuple[int, int]:
    """The ``(window_size_left, window_size_right)`` ints a flash_attn call was given: two parameters from v2.7, one
    sequence indexed ``[0]``, ``[1]`` before (flash_attn_interface.py at each tag)."""
    if key >= (2, 7):
        pair = (a["window_size_left"], a["window_size_right"])
    else:
        w = a["window_size"]
        pair = (w[0], w[1])
    _check(
        all(isinstance(x, int) and not isinstance(x, bool) for x in pair),
        f"window sizes must be ints, got {pair}",
        "F-win",
    )
    return pair


def _signature(names) -> inspect.Signature:
    """Positional-or-keyword parameters; a trailing ``=`` marks one with a default (None here)."""
    return inspect.Signature(
        [
            inspect.Parameter(
                n.rstrip("="),
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None if n.endswith("=") else inspect.Parameter.empty,
            )
            for n in names
        ]
    )


def _schema_signature(op) -> inspect.Signature:
    """The installed torch's schema of an aten op as a Python signature (keyword-only after ``*``)."""
    params = []
    for arg in op.default._schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if arg.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(arg.name, kind, default=default))
    return inspect.Signature(params)


def _aten_pair(a: dict) -> tuple[int, int]:
    """aten's ``window_size_left/right`` (None: -1, [T-win])."""
    pair = tuple(-1 if a.get(n) is None else a[n] for n in ("window_size_left", "window_size_right"))
    _check(
        all(isinstance(x, int) and not isinstance(x, bool) for x in pair),
        f"window sizes must be ints, got {pair}",
        "T-win",
    )
    return pair


def aten_flash_ops() -> tuple:
    """``(_flash_attention_forward, _flash_attention_backward)`` stand-ins bound to the installed torch's schemas."""
    fwd_sig = _schema_signature(torch.ops.aten._flash_attention_forward)
    bwd_sig = _schema_signature(torch.ops.aten._flash_attention_backward)

    def forward(*args, **kwargs):
        a = fwd_sig.bind(*args, **kwargs).arguments
        q, k, v = a["query"], a["key"], a["value"]
        _check_qkv(q, k, v, "T-fwd", "T-fwd")
        _check_stride((("query", q), ("key", k), ("value", v)), "T-fwd")
        d = q.shape[2]
        _check(d <= 256, "FlashAttention forward only supports head dimension at most 256", "T-fwd")
        _check(d % 8 == 0, "head_size must be a multiple of 8, this is ensured by padding!", "T-fwd")
        _check(a["dropout_p"] == 0.0 and not a["return_debug_mask"], "the stand-in emulates no dropout", "stand-in")
        _check(
            a.get("alibi_slopes") is None and a.get("seqused_k") is None and a.get("block_table") is None,
            "the stand-in emulates no ALiBi, seqused_k or block_table",
            "stand-in",
        )
        _check(a["cum_seq_q"] is not None and a["cum_seq_k"] is not None, "varlen needs cum_seq_q/k", "T-meta")
        cu_q = _cu("cum_seq_q", a["cum_seq_q"], q.shape[0], a["max_q"], "T-fwd")
        cu_k = _cu("cum_seq_k", a["cum_seq_k"], k.shape[0], a["max_k"], "T-fwd")
        scale = a.get("scale")
        scale = d**-0.5 if scale is None else scale
        rule = flash_window_rule(bool(a["is_causal"]), *_aten_pair(a), a["max_q"], a["max_k"], True)
        out, lse = _attention64(q, k, v, cu_q, cu_k, scale, rule)
        return (
            out.to(q.dtype),
            lse.float(),
            torch.empty(2, dtype=torch.int64),
            torch.empty(0),
            torch.empty(0, dtype=q.dtype),
        )

    def backward(*args, **kwargs):
        a = bwd_sig.bind(*args, **kwargs).arguments
        dout, q, k, v, out, lse = (a[n] for n in ("grad_out", "query", "key", "value", "out", "logsumexp"))
        _check_qkv(q, k, v, "T-bwd", "T-bwd")
        _check(out.dtype == q.dtype and dout.dtype == q.dtype, "query and out/dout must have the same dtype", "T-bwd")
        _check_stride((("query", q), ("key", k), ("value", v), ("out", out), ("grad_out", dout)), "T-bwd")
        d = q.shape[2]
        _check(d % 8 == 0, "head_size should be a multiple of 8", "T-bwd")
        _check(dout.shape[2] % 8 == 0, "head_size_og should be a multiple of 8, this is ensured by padding!", "T-bwd")
        _check(d <= 256, "FlashAttention backward only supports head dimension at most 256", "T-bwd")
        _check(out.shape == q.shape and dout.shape == q.shape, "out/grad_out must be shaped like query", "T-bwd")
        _check(
            lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous(),
            f"logsumexp must be a contiguous fp32 [num_heads, total_q] tensor, got {tuple(lse.shape)}",
            "T-bwd",
        )
        _check(a["dropout_p"] == 0.0, "the stand-in emulates no dropout", "stand-in")
        cu_q = _cu("cum_seq_q", a["cum_seq_q"], q.shape[0], a["max_q"], "T-bwd")
        cu_k = _cu("cum_seq_k", a["cum_seq_k"], k.shape[0], a["max_k"], "T-bwd")
        scale = a.get("scale")
        scale = d**-0.5 if scale is None else scale
        rule = flash_window_rule(bool(a["is_causal"]), *_aten_pair(a), a["max_q"], a["max_k"], False)
        grads = _attention64_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, rule)
        return tuple(g.to(q.dtype) for g in grads)

    return forward, backward


@contextlib.contextmanager
def installed(version: str | None):
    """Inside the block the CUDA backend finds the flash_attn stand-in of ``version`` — or, for None, no
    flash_attn and the aten stand-ins — and everything is as before after it."""
    import sys

    from ringattn.kernels import cuda

    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in ("flash_attn", "flash_attn.flash_attn_interface")}
    saved_ops = {
        name: getattr(torch.ops.aten, name) for name in ("_flash_attention_forward", "_flash_attention_backward")
    }
    try:
        if version is None:
            sys.modules["flash_attn"] = None  # `import flash_attn` raises ImportError
            torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward = aten_flash_ops()
        else:
            sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"] = flash_attn_module(version)
        cuda.flash_attn_api.cache_clear()
        yield
    finally:
        for name, mod in saved.items():
            if mod is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        for name, op in saved_ops.items():
            setattr(torch.ops.aten, name, op)
        cuda.flash_attn_api.cache_clear()

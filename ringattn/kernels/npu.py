"""Ascend NPU backend: ``torch_npu.npu_fusion_attention`` / ``npu_fusion_attention_grad``, TND (varlen).

What this relies on, and where upstream documents it (Ascend/op-plugin unless said otherwise):

* Signatures: ``op_plugin/config/op_plugin_functions.yaml``; the forward's user doc
  ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md`` (also torch_npu's docstring).
  The forward scale keyword is ``scale``, the grad's ``scale_value``; the grad returns
  ``(dq, dk, dv, dpse[, dsink])``.
* ``actual_seq_qlen`` / ``actual_seq_kvlen``: ``int[]`` cumulative segment ends *without* a leading 0;
  in varlen mode at most 1024 entries per call and T at most 1M (doc, 约束说明). Calls with more
  segments or tokens are split into several calls here (one slice each: the segments are packed).
* Causal segments: ``sparse_mode=3`` (rightDownCausal) with the optimised 2048x2048 ``triu(1)`` bool mask
  (doc, 调用示例); q and k segments have equal lengths, so right-down is the plain causal mask. Dense
  segments: no mask (doc: with ``atten_mask=None`` the op computes everything, whatever ``sparse_mode``).
* Sliding windows (``call.window``: flash_attn's ``(left, right)`` pair, aligned to each segment's bottom-right
  corner, see :class:`ringattn.kernels.VarlenCall`): ``sparse_mode=4`` (band) with ``pre_tockens=left``,
  ``next_tockens=right`` and the same compressed 2048x2048 ``triu(1)`` bool mask, derived once per call and device
  (:func:`_mask_args`); the grad op takes the same four keywords (schema in ``op_plugin_functions.yaml``). Why
  this is the mapping, with no translation:

  - *What the pair means.* The doc's example (调用示例, ``get_atten_mask``) builds the sparse_mode 0 / 4 reference
    mask as ``triu(ones, k=next_tockens + 1) | tril(ones, k=-pre_tockens - 1)``: row ``i`` keeps keys
    ``[i - pre_tockens, i + next_tockens]``, counted from the top-left corner (sparse_mode 0).
  - *Where it is anchored.* The doc (参考资源, and torch_npu's docstring in ``_op_plugin_docs.py`` from the 7.0.0
    branch on): "当sparse_mode为4时，代表band场景，即计算pre_tockens和next_tockens之间的部分，参数起点为右下角，
    pre_tockens和next_tockens之间需要有交集。atten_mask为优化后的压缩下三角矩阵（2048*2048）" — the origin is the
    bottom-right corner, so row ``r`` of a ``(sq, sk)`` segment keeps ``[r + sk - sq - pre, r + sk - sq + next]``:
    flash's rule with ``(left, right) = (pre_tockens, next_tockens)``. The doc's sparse_mode 7 example gives the
    numbers (a 2x6 band with ``pre_tockens=6``, ``next_tockens=-2`` is rows 0-1 of a 4x6 right-down causal mask).
  - *Per segment in TND.* The op-plugin doc does not say that each varlen segment has its own corner; CANN's
    operator code does: hicann/ops-transformer ``attention/flash_attention_score/op_host/
    flash_attention_score_tiling_general.cpp`` (varlen tiling, ``GetSparseInfo``: "if sparseMode is Band,
    preTokens and nextTokens start from bottom right vertex"; ``GetS2RealSize``, BAND_COMPRESS: keys from
    ``s1 - Sq_b + Skv_b - preTokens`` to ``s1 + Skv_b - (Sq_b - nextTokens)`` per batch ``b``) and
    ``flash_attention_score_grad/op_host/flash_attention_score_grad_tiling_s1s2_bn2gs1s2.cpp`` ("sparse_mode =4
    (band)时 ... token以右下角为基准，需要校正": per batch ``preTokens + Sq_b - Skv_b``). That is what is assumed.
  - *What the operator checks* (the same varlen tiling, ``CheckPretokenAndNexttoken``, BAND): ``pre_tockens >= 0``;
    ``next_tockens < 0`` with ``pre + next < 0`` refused; ``Sq_b - next_tockens > Skv_b`` "has invalid row"; and
    the doc's varlen rule (约束说明): no fully masked row ("atten_mask中不能存在某一行全1"). The planner's segments
    satisfy all of them (``left, right >= 0``, every row sees a key); checked once per call here.
  - *Which versions.* op-plugin's ``FlashAttentionKernelNpuOpApi.cpp`` accepts ``sparse_mode`` in ``[0,5) or
    (5,8]`` for TND on every release branch that has TND (6.0.rc1 through 26.1.0, and master) and passes the
    pair through unchanged; the band is in the sparse_mode table next to the varlen-only modes in torch_npu's API
    pages for 6.0.RC3 and 6.0.0 (hiascend.com, 接口原型 with ``actual_seq_qlen``) and in the docstring from the
    7.0.0 branch on (the 6.0.rc1-6.0.0 branches' docstrings predate TND; the 6.0.RC1/RC2 pages were not read);
    CANN's ``aclnnFlashAttentionVarLenScore.md`` lists sparseMode 0-4, 6-8. So every generation the emulation
    models takes windows, and none is refused.
  - *Other modes.* 7 (band on the last segment, right-down causal on the others) and 8 (band on the first,
    left-up causal on the others) are for a query split across cards; every segment of a windowed call needs the
    band (the executor makes one call per ``(causal, window)`` pair), so they do not fit. Mode 0 with a band counts
    from the top-left and needs the full ``[maxSq, maxSkv]`` mask.
* Statistics: ``softmax_max`` / ``softmax_sum`` are fp32 ``[T, N, 8]`` (the 8 values equal). Their
  *storage* is, by default, head-major per segment — one ``[N, S_i, 8]`` block per segment,
  concatenated (doc of ``softmax_layout``: "默认情况下，softmax的输出排布为NTD排布"; MindSpeed
  ``mindspeed/core/context_parallel/utils.py`` ``flatten_softmax`` undoes it). Token-major only with
  ``softmax_layout="TND"``, a keyword of the TorchNPU 7.2.0 release line and later (torch-npu
  2.1.0.post17 / 2.6.0.post3 / 2.7.1 / 2.8.0; op-plugin branch 7.2.0's ``op_plugin_functions.yaml``) that
  needs CANN 8.3.RC1+ (``FlashAttentionKernelNpuOpApi.cpp``: without the V4 aclnn kernels it raises
  "The param softmax_layout is not supported"). LSE = ``softmax_max + log(softmax_sum)``. The grad op reads the
  statistics in the same layout as its own ``softmax_layout`` says; it gets the merged LSE as
  ``softmax_max`` with ``softmax_sum = 1``, and the merged output as ``attention_in``.
* Merge: ``npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
  cur_softmax_max, cur_softmax_sum, *, actual_seq_qlen=None, input_layout="SBH",
  input_softmax_layout="")`` (torch_npu docstring in ``codegen/templates/_op_plugin_docs.py``), present
  from the TorchNPU 26.1.0 release line (op-plugin commit 57b8ead9; schema ``op_api: [v2.7, newest]``,
  so PyTorch >= 2.7; paired with CANN 9.1.0). Called with ``input_layout="TND"``, ``input_softmax_layout="TND"``
  (token-major statistics, so the merge is row-wise) and ``actual_seq_qlen`` an int64 tensor rising
  from 0 to T (hicann/ops-transformer ``aclnnRingAttentionUpdate.md``); prev/cur outputs of one dtype;
  TND needs D a multiple of 64, D <= 768, N <= 256 (``aclnnRingAttentionUpdateV2_en.md``,
  Constraints) — otherwise the torch merge runs. The statistics passed are the LSE as ``softmax_max`` and
  ones as ``softmax_sum``. **Departure from the doc, on purpose**: the parameter table of
  ``aclnnRingAttentionUpdate(V2)`` says the 8 values of ``prevSoftmaxMax`` / ``curSoftmaxMax`` "must be
  positive", and an LSE is negative wherever a row's scores are (a one-key row with a negative score, say).
  Nothing depends on that sign: the formula (max, then ``exp`` of differences) is invariant to a common
  shift of both maxima; the kernels compute exactly that with sign-agnostic vector ops
  (``op_kernel/ring_attention_update_tnd.h`` and ``ring_attention_update_kernel.h`` ``SoftmaxCompute``:
  ``Max``, ``Sub``, ``Exp``, ``Mul``, ``Add``, ``Div``; ``arch35/ring_attention_update_regbase_common.h`` the
  same); and the first-phase API checks no values (its error table lists null pointers, dtypes, shapes,
  ``actualSeqQlen`` format and ``inputSoftmaxLayout`` only). Shifting the LSE to make it positive would
  cost more element-wise ops than the fused merge saves. The sums, which the kernels divide by, are 1.

Capabilities are detected once per imported ``torch_npu`` module: the fused merge by attribute, and by
its calls: a RuntimeError from it — on the first call, a torch_npu newer than its CANN whose aclnn library
lacks ``aclnnRingAttentionUpdateV2``; on a later call, a rejection of that call's input — makes the backend
warn once (``warnings.warn`` naming the error) and merge with torch from then on (the same exact merge), and
``softmax_layout="TND"`` by the first call that tries it (a TypeError — keyword unknown to an older
torch_npu — or RuntimeError — CANN without the V4 kernels — followed by a successful call without it
means "not supported"; the statistics are then converted to and from the default layout with one
gather through an index built once per call and device). ``torch_npu`` is imported lazily; without
Ascend's CANN libraries importing it raises RuntimeError, not only ImportError, so both are caught.

Tested only against ``tests/npu_emulation.py``, an emulation of the documented contract in four
torch_npu/CANN generations — not on Ascend hardware.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from ..merge import merge as _torch_merge

#: honours ``VarlenCall.window`` (band ``sparse_mode=4``, see the module docstring)
SUPPORTS_WINDOW = True

_MASK_SIZE = 2048
MAX_SEGMENTS = 1024  # varlen: actual_seq_qlen has at most 1K entries per call
MAX_TOKENS = 1 << 20  # varlen: T (B*S) at most 1M per call
MAX_HEADS = 256  # Nq in 1..256
MAX_HEAD_DIM = 768  # D in 1..768
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def torch_npu():
    """The ``torch_npu`` module, or a ValueError saying why the NPU backend cannot run."""
    try:
        import torch_npu as mod  # noqa: PLC0415 - lazy on purpose
    except (ImportError, RuntimeError) as exc:
        raise ValueError(f"backend 'npu': torch_npu could not be imported ({type(exc).__name__}: {exc})") from exc
    return mod


def validate(q, k, v) -> None:
    """ValueError (before any communication) for input the fused operator documents as unsupported."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"backend 'npu': dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.shape[1] > MAX_HEADS:
        raise ValueError(f"backend 'npu': at most {MAX_HEADS} query heads per rank, got {q.shape[1]}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"backend 'npu': head_dim at most {MAX_HEAD_DIM}, got {q.shape[2]}")
    if q.shape[0] > MAX_TOKENS:
        raise ValueError(f"backend 'npu': at most {MAX_TOKENS} tokens per rank, got {q.shape[0]}")


@dataclass
class _Caps:
    module: object
    tnd_forward: bool | None = None  # softmax_layout="TND" works in npu_fusion_attention
    tnd_backward: bool | None = None  # ... and in npu_fusion_attention_grad
    fused_merge: bool | None = None  # npu_ring_attention_update runs (None: not tried yet)


_CAPS: dict[int, _Caps] = {}


def _caps(npu) -> _Caps:
    caps = _CAPS.get(id(npu))
    if caps is None or caps.module is not npu:
        caps = _CAPS[id(npu)] = _Caps(npu)
    return caps


def _try_tnd(caps: _Caps, attr: str, op, *args, **kwargs):
    """``(result, token_major)``: ``op`` with ``softmax_layout="TND"`` unless known unsupported."""
    known = getattr(caps, attr)
    if known is not False:
        try:
            res = op(*args, softmax_layout="TND", **kwargs)
        except (TypeError, RuntimeError):
            if known:
                raise
        else:
            setattr(caps, attr, True)
            return res, True
    res = op(*args, **kwargs)  # a genuine error raises here too
    setattr(caps, attr, False)
    return res, False


@functools.lru_cache(maxsize=8)
def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)


def _mask_args(call, device) -> dict:
    """The operator's mask keywords for ``call``, derived once per call and device (see the module docstring):
    band (``sparse_mode=4``, ``pre_tockens``/``next_tockens`` = the window pair) under a window, else right-down causal
    (3) or no mask (0). Do not mutate the returned dict: it is reused on every step."""

    def build():
        if call.window is None:
            if call.causal:
                return {"atten_mask": _causal_mask(torch.device(device)), "sparse_mode": 3}
            return {"atten_mask": None, "sparse_mode": 0}
        left, right = call.window
        bad = [
            i
            for i in range(call.num_segments)
            if call.cu_q[i + 1] - call.cu_q[i] - right > call.cu_k[i + 1] - call.cu_k[i]
        ]
        if left < 0 or right < 0 or bad:  # the planner's invariants; the operator refuses these (module docstring)
            raise AssertionError(
                f"planner: window pair {call.window} must be non-negative and leave no fully masked "
                f"row (segments {bad[:5]} have Sq - next_tockens > Skv)"
            )
        mask = _causal_mask(torch.device(device))  # sparse_mode 4 takes the compressed mask too (doc, 参考资源)
        return {"atten_mask": mask, "sparse_mode": 4, "pre_tockens": left, "next_tockens": right}

    return call.cached(("npu-mask", torch.device(device)), build)


@dataclass(frozen=True)
class _Chunk:
    """Segments ``[a, b)`` of a call: q rows ``q0:q1``, kv rows ``k0:k1``, the op's cumulative ends."""

    q0: int
    q1: int
    k0: int
    k1: int
    seq_q: list
    seq_k: list
    lengths: tuple[int, ...]


def _chunks(call) -> tuple[_Chunk, ...]:
    """The call split into operator-sized chunks (at most 1024 segments and 1M q/kv tokens each)."""

    def build():
        cu_q, cu_k = call.cu_q, call.cu_k
        out, a = [], 0
        n = call.num_segments
        while a < n:
            b = a + 1
            while (
                b < n
                and b - a < MAX_SEGMENTS
                and cu_q[b + 1] - cu_q[a] <= MAX_TOKENS
                and cu_k[b + 1] - cu_k[a] <= MAX_TOKENS
            ):
                b += 1
            q0, k0 = cu_q[a], cu_k[a]
            out.append(
                _Chunk(
                    q0,
                    cu_q[b],
                    k0,
                    cu_k[b],
                    [x - q0 for x in cu_q[a + 1 : b + 1]],
                    [x - k0 for x in cu_k[a + 1 : b + 1]],
                    tuple(y - x for x, y in zip(cu_q[a:b], cu_q[a + 1 : b + 1])),
                )
            )
            a = b
        return tuple(out)

    return call.cached("npu-chunks", build)


def _head_major_index(call, chunk: _Chunk, heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gather, inverse)`` int64 indices for the default statistics layout of ``chunk``.

    ``gather[t * N + n]`` is where token ``t``, head ``n`` sits in the per-segment head-major storage
    (segment ``i`` starting at token ``s_i`` with length ``L_i``: ``N*s_i + n*L_i + (t - s_i)``);
    ``inverse`` is its inverse permutation. Built once per (chunk, heads, device), vectorised.
    """

    def build():
        lengths = torch.tensor(chunk.lengths, dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        seg_start = torch.repeat_interleave(starts, lengths)  # [T]
        seg_len = torch.repeat_interleave(lengths, lengths)
        t = torch.arange(int(lengths.sum()), dtype=torch.int64)
        n = torch.arange(heads, dtype=torch.int64)
        gather = (heads * seg_start[:, None] + n[None, :] * seg_len[:, None] + (t - seg_start)[:, None]).reshape(-1)
        inverse = torch.empty_like(gather)
        inverse[gather] = torch.arange(gather.numel(), dtype=torch.int64)
        return gather.to(device), inverse.to(device)

    return call.cached(("npu-head-major", id(chunk), heads, torch.device(device)), build)


def _replicate8(x: torch.Tensor) -> torch.Tensor:
    """``[..., ]`` -> ``[..., 8]`` contiguous (the statistics' replicated last dimension)."""
    return x.unsqueeze(-1).expand(*x.shape, 8).contiguous()


def forward(q, k, v, call, scale):
    npu = torch_npu()
    caps = _caps(npu)
    heads = q.shape[1]
    outs, lses = [], []
    for ch in _chunks(call):
        (out, smax, ssum), token_major = _try_tnd(
            caps,
            "tnd_forward",
            lambda ch=ch, **kw: npu.npu_fusion_attention(
                q[ch.q0 : ch.q1],
                k[ch.k0 : ch.k1],
                v[ch.k0 : ch.k1],
                heads,
                "TND",
                scale=scale,
                keep_prob=1.0,
                actual_seq_qlen=ch.seq_q,
                actual_seq_kvlen=ch.seq_k,
                **_mask_args(call, q.device),
                **kw,
            )[:3],
        )
        t = ch.q1 - ch.q0
        if token_major:
            lse = smax[..., 0] + torch.log(ssum[..., 0])
        else:  # per-segment head-major storage -> token-major, one gather
            flat = smax.reshape(-1, 8)[:, 0] + torch.log(ssum.reshape(-1, 8)[:, 0])
            lse = flat[_head_major_index(call, ch, heads, q.device)[0]].view(t, heads)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def backward(dout, q, k, v, out, lse, call, scale):
    npu = torch_npu()
    caps = _caps(npu)
    heads = q.shape[1]
    attention_in = out.to(q.dtype)
    grads = []
    for ch in _chunks(call):
        rows = slice(ch.q0, ch.q1)
        l_tok = lse[rows].float()

        def grad(softmax_layout=None, _ch=ch, _rows=rows, _l=l_tok):
            if softmax_layout == "TND":
                stats = _replicate8(_l)
            else:  # token-major -> per-segment head-major storage, one gather
                inverse = _head_major_index(call, _ch, heads, q.device)[1]
                stats = _replicate8(_l.reshape(-1)[inverse]).view(_l.shape[0], heads, 8)
            extra = {} if softmax_layout is None else {"softmax_layout": softmax_layout}
            return npu.npu_fusion_attention_grad(
                q[_rows],
                k[_ch.k0 : _ch.k1],
                v[_ch.k0 : _ch.k1],
                dout[_rows],
                heads,
                "TND",
                softmax_max=stats,
                softmax_sum=torch.ones_like(stats),
                attention_in=attention_in[_rows],
                scale_value=scale,
                keep_prob=1.0,
                actual_seq_qlen=_ch.seq_q,
                actual_seq_kvlen=_ch.seq_k,
                **_mask_args(call, q.device),
                **extra,
            )[:3]

        grads.append(_try_tnd(caps, "tnd_backward", grad)[0])
    if len(grads) == 1:
        return grads[0]
    return tuple(torch.cat(g) for g in zip(*grads))


def merge(out_acc, lse_acc, out, lse, call):
    """The fused ``npu_ring_attention_update`` where torch_npu has it and the shapes allow, else the torch merge."""
    npu = torch_npu()
    caps = _caps(npu)
    fused = getattr(npu, "npu_ring_attention_update", None)
    t, n, d = out_acc.shape
    if fused is None or caps.fused_merge is False or d % 64 or d > 768 or n > 256 or t == 0:
        return _torch_merge(out_acc, lse_acc, out, lse)
    seq = call.cached(
        ("npu-update-seq", t, out_acc.device), lambda: torch.tensor([0, t], dtype=torch.int64, device=out_acc.device)
    )
    prev_max, cur_max = _replicate8(lse_acc), _replicate8(lse.float())
    ones = torch.ones_like(prev_max)
    try:
        new_out, new_max, new_sum = fused(
            out_acc,
            prev_max,
            ones,
            out.to(out_acc.dtype),
            cur_max,
            ones,
            actual_seq_qlen=seq,
            input_layout="TND",
            input_softmax_layout="TND",
        )
    except RuntimeError as exc:  # missing aclnn kernel (first call) or a rejected input (any call): same handling
        when = "on its first call" if caps.fused_merge is None else "after earlier calls succeeded"
        caps.fused_merge = False
        warnings.warn(
            f"ringattn: npu_ring_attention_update failed {when} ({type(exc).__name__}: {exc}); the NPU "
            f"backend merges with torch from now on (exact, a few more kernel launches per step)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _torch_merge(out_acc, lse_acc, out, lse)
    caps.fused_merge = True
    return new_out, new_max[..., 0] + torch.log(new_sum[..., 0])

"""EMULATION (pure torch, CPU) of the *documented* torch_npu fused-attention contract.

This is not torch_npu and not Ascend code, and passing against it is not a run on Ascend hardware.
It encodes, from the upstream documentation and operator sources, what the NPU backend relies on,
strictly enough to catch misuse, in four generations of torch_npu/CANN. Sources (cited per rule
below by the short names in brackets):

* [fa-doc]   Ascend/op-plugin ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md``
             (函数原型, 参数说明, 输出说明, 约束说明); the same text is torch_npu's docstring in
             ``codegen/templates/_op_plugin_docs.py`` ("npu_fusion_attention").
* [yaml]     Ascend/op-plugin ``op_plugin/config/op_plugin_functions.yaml``: the op schemas of
             ``npu_fusion_attention``, ``npu_fusion_attention_grad``, ``npu_ring_attention_update``.
* [yaml-old] the same file before commit 2bb72887 (2025-08-19, "Add npu_fusion_attention aclnn V4 adapt
             for supporting TND format output"), which added ``softmax_layout`` to both fusion ops.
* [fa-cpp]   Ascend/op-plugin ``op_plugin/ops/opapi/FlashAttentionKernelNpuOpApi.cpp``: with
             ``softmax_layout="TND"`` the V4 aclnn kernels are used when CANN has them
             (``aclnnFlashAttentionVarLenScoreV4`` / ``aclnnFlashAttentionUnpaddingScoreGradV4``), otherwise
             ``TORCH_CHECK(softmax_layout_str == "", "The param softmax_layout is not supported")``;
             TND statistics are allocated ``[T, N, 8]`` fp32.
* [ms-utils] Ascend/MindSpeed ``mindspeed/core/context_parallel/utils.py``: ``flatten_softmax`` /
             ``unflatten_softmax`` — the default TND statistics are stored per segment as ``[N, S_i, 8]``
             blocks, concatenated ("NS8NS8..."), inside the ``[T, N, 8]`` tensor.
* [rau-doc]  torch_npu's ``npu_ring_attention_update`` docstring (op-plugin ``_op_plugin_docs.py``) and
             ``op_plugin/ops/opapi/RingAttentionUpdateKernelNpuOpApi.cpp`` (``check_attention_inputs``).
* [rau-cann] hicann/ops-transformer ``attention/ring_attention_update/docs/aclnnRingAttentionUpdate.md``
             and ``aclnnRingAttentionUpdateV2_en.md`` (参数说明 / Parameters, 约束说明 / Constraints, and the
             first-phase API's error table: null pointers, dtypes, shapes, ``actualSeqQlenOptional`` format,
             ``inputSoftmaxLayoutOptional`` — no value checks).
* [rau-kernel] the same repository's kernels,
  ``attention/ring_attention_update/op_kernel/ring_attention_update_kernel.h``
             (SBH), ``ring_attention_update_tnd.h`` (TND) and ``arch35/ring_attention_update_regbase_common.h``:
             ``SoftmaxCompute`` is ``Max``, ``Sub``, ``Exp``, ``Mul``, ``Add``, ``Div`` on fp32, element-wise.
* [fa-tiling] cannmirror/ops-transformer (CANN 9.0.0 / 9.1.0)
             ``attention/flash_attention_score/op_host/arch22/flash_attention_score_tiling_general.cpp``
             (arch32 in 9.0.0): "校验EOD场景尾部是否补0" — when both sequence lists cover fewer tokens than
             the tensors hold, the lists must end in 0 ("The end of actualSeqQLen & actualSeqKvLen should be
             0 in EOD scenario").
* [fa-tnd]   op-plugin ``FlashAttentionKernelNpuOpApi.cpp`` (forward and grad), on every release branch with TND
             (6.0.rc1 through 26.1.0, and master): for ``input_layout == "TND"``, ``TORCH_CHECK`` "The sparse_mode
             value must be in range of [0,5) or (5,8]"; ``pre_tockens`` / ``next_tockens`` are passed through unchanged.
* [fa-band]  the band (``sparse_mode=4``): [fa-doc] 参考资源 "当sparse_mode为4时，代表band场景，即计算pre_tockens和
             next_tockens之间的部分，参数起点为右下角，pre_tockens和next_tockens之间需要有交集。atten_mask为优化后的
             压缩下三角矩阵（2048*2048）" (the same text in ``_op_plugin_docs.py`` from the 7.0.0 branch on); what
             "between" means, [fa-doc] 调用示例 ``get_atten_mask``: masked = ``triu(ones, k=next_tockens + 1) |
             tril(ones, k=-pre_tockens - 1)``, i.e. row ``i`` keeps keys ``[i - pre_tockens, i + next_tockens]`` from
             the top-left; moved to the bottom-right corner of each varlen segment per hicann/ops-transformer
             ``attention/flash_attention_score/op_host/flash_attention_score_tiling_general.cpp`` (varlen
             ``GetSparseInfo``: "if sparseMode is Band, preTokens and nextTokens start from bottom right vertex";
             ``GetS2RealSize`` per batch) and ``flash_attention_score_grad/op_host/
             flash_attention_score_grad_tiling_s1s2_bn2gs1s2.cpp`` ("token以右下角为基准，需要校正", per batch).
* [fa-varlen-tiling] the same ``flash_attention_score_tiling_general.cpp``, varlen ``CheckPretokenAndNexttoken``,
             BAND: "pre_tokens[..] config error, has invalid data block" (``pre_tockens < 0``), "invalid config"
             (``next_tockens < 0`` and ``pre + next < 0``), "has invalid row" (a batch with
             ``Sq - next_tockens > Skv``).
* [releases] the op-plugin branches per TorchNPU release (``op_plugin_functions.yaml`` on branches 7.1.0,
             7.2.0, 7.3.0, 26.0.0, 26.1.0) and Ascend/pytorch ``COMPATIBILITY.en.md``: ``softmax_layout``
             arrives in 7.2.0 (torch-npu 2.1.0.post17 / 2.6.0.post3 / 2.7.1 / 2.8.0, CANN 8.3.RC1), ``sink``
             and the grad's fifth output in 7.3.0, the forward's ``dropout_mask``/``seed``/``offset`` in
             26.0.0, ``npu_ring_attention_update`` in 26.1.0 (commit 57b8ead9; schema
             ``op_api: [v2.7, newest]``, i.e. PyTorch >= 2.7; CANN 9.1.0).

Generations (``install(generation)``):

* ``"legacy"``  — torch_npu before ``softmax_layout`` [yaml-old]: no ``softmax_layout`` keyword (an
  unknown keyword raises TypeError, as torch_npu's generated Python bindings do), no
  ``npu_ring_attention_update``; statistics always in the default per-segment head-major layout.
* ``"layout-kwarg-old-cann"`` — TorchNPU 7.2.0's keywords (``softmax_layout``, no ``sink``) on a CANN
  without the V4 kernels [fa-cpp]: passing ``"TND"`` raises RuntimeError; no ``npu_ring_attention_update``.
* ``"tnd-without-update"`` — TorchNPU 7.2.0 on CANN 8.3.RC1+ [releases]: ``softmax_layout="TND"`` works
  [fa-doc], the grad returns 4 tensors, no ``npu_ring_attention_update`` (so the torch merge runs). The
  common installation of TorchNPU 7.2.0 to 26.0.0.
* ``"current"`` — TorchNPU 26.1.0+ [releases]: ``softmax_layout="TND"`` works, ``sink`` (and the forward's
  ``dropout_mask``/``seed``/``offset``) exist, the grad op returns 5 tensors [yaml], and
  ``npu_ring_attention_update`` exists with its real signature [rau-doc].

Masks (every generation alike, per [fa-tnd]): ``atten_mask=None`` computes everything; ``sparse_mode=3`` is right-down
causal; ``sparse_mode=4`` is the band of [fa-band], with [fa-varlen-tiling]'s checks and [fa-doc]'s varlen rule that no
row is fully masked; both need the compressed 2048x2048 ``triu(1)`` mask. The masked attention is computed in float64
from the arguments given (the documented formula, not ringattn's code) and rounded once: outputs come back in the
input dtype (statistics in fp32), as on the device. Tests put it in
``sys.modules["torch_npu"]`` only for the duration of a case (:func:`installed`), so nothing else in the
test process (transformers' own torch_npu probe, say) ever sees it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref

import torch

INT_MAX = 2147483647
GENERATIONS = ("legacy", "layout-kwarg-old-cann", "tnd-without-update", "current")
MAX_VARLEN_SEQS = 1024  # [fa-doc] 约束说明: actual_seq_qlen 的长度 ... varlen场景下长度最大支持1K
MAX_T = 1 << 20  # [fa-doc] 约束说明: varlen场景下 T（B*S）取值范围1~1M
MAX_HEADS = 256  # [fa-doc] Nq取值范围1~256
MAX_HEAD_DIM = 768  # [fa-doc] D: 取值范围1~768
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # [fa-doc] query/key/value 数据类型


@functools.lru_cache(maxsize=1)
def _compressed_causal_mask() -> torch.Tensor:
    # [fa-doc] 调用示例: for sparse_mode 2/3/4 the optimised mask is
    # torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


_CHECKED_MASKS: dict[int, tuple] = {}  # id -> (weak reference, version) of mask tensors found equal to the above


def _is_compressed_causal_mask(mask) -> bool:
    """``mask`` is the compressed 2048x2048 ``triu(1)`` bool mask (its contents compared once per tensor and
    in-place version: ringattn passes one cached tensor on every call, and comparing 4M elements costs ~10 ms)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (2048, 2048):
        return False
    seen = _CHECKED_MASKS.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return True
    if not torch.equal(mask.cpu(), _compressed_causal_mask()):
        return False
    _CHECKED_MASKS[id(mask)] = (weakref.ref(mask), mask._version)
    return True


def _segments(name: str, seq, total: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every computed segment from cumulative ends.

    [fa-doc] actual_seq_qlen: ``List[int]`` of cumulative lengths without a leading 0 ("S长度列表为 2 2 2 2 2，
    则 actual_seq_qlen 传 2 4 6 8 10"); zero-length segments are allowed ("支持actual_seq_qlen中某个Batch上的S长度为0");
    trailing zeros mark batches that are not computed
    ("TND格式下，支持尾部部分Batch不参与计算 ... 尾部传入对应个数个0").
    """
    if not isinstance(seq, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seq):
        raise TypeError(
            f"emulated torch_npu: {name} must be a list of ints (int[] in the schema [yaml]), got {type(seq).__name__}"
        )
    if not 1 <= len(seq) <= MAX_VARLEN_SEQS:
        raise RuntimeError(
            f"emulated torch_npu: {name} has {len(seq)} entries; varlen supports 1..{MAX_VARLEN_SEQS} [fa-doc]"
        )
    ends = list(seq)
    n = len(ends)
    while n > 1 and ends[n - 1] == 0:  # trailing zeros: batches not computed
        n -= 1
    ends = ends[:n]
    prev = 0
    for x in ends:
        if x < prev:
            raise RuntimeError(
                f"emulated torch_npu: {name} must be non-decreasing cumulative ends without a leading 0, "
                f"got {list(seq)}"
            )
        prev = x
    if ends[-1] > total:
        raise RuntimeError(f"emulated torch_npu: {name} ends at {ends[-1]} but the tensor has {total} tokens")
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def _varlen_segments(actual_seq_qlen, actual_seq_kvlen, tq: int, tk: int):
    """``(q segments, kv segments)`` of a varlen call (:func:`_segments`). [fa-tiling] lists covering fewer
    tokens than both tensors hold must end in 0 (batches not computed)."""
    sq = _segments("actual_seq_qlen", actual_seq_qlen, tq)
    sk = _segments("actual_seq_kvlen", actual_seq_kvlen, tk)
    if sq[-1][1] < tq and sk[-1][1] < tk and (actual_seq_qlen[-1] != 0 or actual_seq_kvlen[-1] != 0):
        raise RuntimeError(
            f"emulated torch_npu: The end of actualSeqQLen & actualSeqKvLen should be 0 in EOD scenario "
            f"(they cover {sq[-1][1]} of {tq} and {sk[-1][1]} of {tk} tokens) [fa-tiling]"
        )
    return sq, sk


def _check_tensors(query, key, value, head_num, input_layout, pse, padding_mask, prefix, keep_prob):
    if input_layout != "TND":
        raise NotImplementedError(f"emulated torch_npu: only input_layout='TND' is emulated, got {input_layout!r}")
    if query.dtype not in DTYPES or not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("emulated torch_npu: query/key/value must share one of float16/bfloat16/float32 [fa-doc]")
    if query.dim() != 3 or key.dim() != 3 or key.shape != value.shape:  # [fa-doc] key和value的shape必须一致
        raise RuntimeError("emulated torch_npu: TND tensors are [T, N, D] and key/value shapes must match")
    t, n, d = query.shape
    if head_num != n:
        raise RuntimeError(f"emulated torch_npu: head_num={head_num} but query has {n} heads")
    if n % key.shape[1] or n > MAX_HEADS:  # [fa-doc] Nq/Nkv必须是非0整数，Nq取值范围1~256
        raise RuntimeError(
            f"emulated torch_npu: Nq={n} must be a multiple of Nkv={key.shape[1]} and at most {MAX_HEADS}"
        )
    if key.shape[2] != d or not 1 <= d <= MAX_HEAD_DIM:  # [fa-doc] Dq=Dk, 取值范围1~768
        raise RuntimeError(
            f"emulated torch_npu: head dim {d} (key {key.shape[2]}) must match and be in 1..{MAX_HEAD_DIM}"
        )
    if not 1 <= t <= MAX_T or not 1 <= key.shape[0] <= MAX_T:
        raise RuntimeError(f"emulated torch_npu: varlen T must be in 1..{MAX_T} [fa-doc]")
    if keep_prob != 1.0 or pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("emulated torch_npu: dropout, pse, padding_mask and prefix are not emulated")


def _mask_mode(atten_mask, sparse_mode, pre_tockens, next_tockens):
    """The keys a row keeps, from the arguments: None (all), or ``(pre, next)`` counted from each segment's
    bottom-right corner (row ``r`` of an ``Sq x Skv`` segment keeps ``[r + Skv - Sq - pre, r + Skv - Sq + next]``).
    [fa-tnd] [fa-doc] [fa-band] [fa-varlen-tiling]."""
    if not isinstance(sparse_mode, int) or not (0 <= sparse_mode < 5 or 5 < sparse_mode <= 8):
        raise RuntimeError(
            f"emulated torch_npu: The sparse_mode value must be in range of [0,5) or (5,8], but got "
            f"{sparse_mode} [fa-tnd]"
        )
    if atten_mask is None:
        # [fa-doc] 当atten_mask输入为None时，sparse_mode、pre_tockens、next_tockens参数不生效，固定为全计算
        return None
    if sparse_mode not in (3, 4):
        raise NotImplementedError(f"emulated torch_npu: sparse_mode={sparse_mode} with a mask is not emulated")
    # [fa-doc] sparse_mode 3 and 4: the optimised 2048x2048 mask (调用示例: torch.triu(torch.ones(2048, 2048), 1))
    if not _is_compressed_causal_mask(atten_mask):
        raise RuntimeError(
            f"emulated torch_npu: sparse_mode={sparse_mode} needs the compressed 2048x2048 triu(1) bool mask"
        )
    if sparse_mode == 3:  # rightDownCausal: pre_tockens / next_tockens 不生效 [fa-doc]
        return (INT_MAX, 0)
    for name, x in (("pre_tockens", pre_tockens), ("next_tockens", next_tockens)):
        if not isinstance(x, int) or isinstance(x, bool):
            raise TypeError(f"emulated torch_npu: {name} must be an int (int in the schema [yaml]), got {x!r}")
    if pre_tockens < 0:
        raise RuntimeError(
            f"emulated torch_npu: pre_tokens[{pre_tockens}] config error, has invalid data block [fa-varlen-tiling]"
        )
    if next_tockens < 0 and pre_tockens + next_tockens < 0:  # [fa-band] 之间需要有交集
        raise RuntimeError(
            f"emulated torch_npu: pre_tokens[{pre_tockens}], next_tokens[{next_tockens}], invalid "
            f"config [fa-varlen-tiling]"
        )
    return (pre_tockens, next_tockens)


def _scores(q, k, scale, band):
    """float64 ``[N, Lq, Lk]`` scaled scores, ``-inf`` outside ``band`` (:func:`_mask_mode`; None: no mask)."""
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("qnd,knd->nqk", q.double(), k.double().repeat_interleave(rep, dim=1)) * scale
    if band is None:
        return s
    pre, nxt = band
    lq, lk = q.shape[0], k.shape[0]
    if lq - nxt > lk:  # [fa-varlen-tiling] "has invalid row" (right-down causal, next 0: Sq > Skv)
        raise RuntimeError(
            f"emulated torch_npu: Batch s1[{lq}], s2[{lk}], next_tokens[{nxt}], has invalid row [fa-varlen-tiling]"
        )
    i = torch.arange(lq)[:, None] + (lk - lq)  # the bottom-right corner is the origin [fa-band]
    j = torch.arange(lk)[None, :]
    keep = (j >= i - pre) & (j <= i + nxt)
    if not keep.any(-1).all():  # [fa-doc] varlen: atten_mask中不能存在某一行全1的场景 (a fully masked row)
        raise RuntimeError("emulated torch_npu: a fully masked row in varlen (atten_mask中不能存在某一行全1) [fa-doc]")
    return s.masked_fill(~keep, float("-inf"))


def _stats_to_storage(per_token: torch.Tensor, segs, tnd: bool) -> torch.Tensor:
    """fp32 ``[T, N]`` -> the ``[T, N, 8]`` statistics tensor in the op's layout.

    TND (``softmax_layout="TND"``): token-major. Default: per segment an ``[N, S_i, 8]`` block, the blocks
    concatenated [fa-doc softmax_layout: 默认情况下 ... NTD排布] [ms-utils flatten_softmax].
    """
    t, n = per_token.shape
    if tnd:
        return per_token.unsqueeze(-1).expand(t, n, 8).contiguous()
    flat = torch.zeros(t * n, 8, dtype=torch.float32)
    for s, e in segs:
        block = per_token[s:e].t().reshape(-1)  # [N, S_i] head-major
        flat[s * n : e * n] = block.unsqueeze(-1).expand(block.numel(), 8)
    return flat.view(t, n, 8)


def _stats_from_storage(stats: torch.Tensor, segs, tnd: bool, name: str) -> torch.Tensor:
    """The inverse of :func:`_stats_to_storage`; checks shape, dtype and the 8 identical values."""
    if not isinstance(stats, torch.Tensor) or stats.dim() != 3 or stats.shape[-1] != 8 or stats.dtype != torch.float32:
        raise RuntimeError(f"emulated torch_npu: {name} must be fp32 [T, N, 8] [fa-cpp]")
    t, n, _ = stats.shape
    if not torch.equal(stats, stats[..., :1].expand_as(stats)):
        raise RuntimeError(f"emulated torch_npu: the 8 values of {name} must be identical")
    if tnd:
        return stats[..., 0].clone()
    flat = stats.reshape(t * n, 8)[:, 0]
    out = torch.zeros(t, n, dtype=torch.float32)
    for s, e in segs:
        out[s:e] = flat[s * n : e * n].view(n, e - s).t()
    return out


class _Generation:
    def __init__(self, name: str):
        if name not in GENERATIONS:
            raise ValueError(f"unknown emulated torch_npu generation {name!r}")
        self.name = name
        self.has_layout_kwarg = name != "legacy"
        self.tnd_stats_work = name in ("tnd-without-update", "current")

    def layout(self, softmax_layout: str, input_layout: str) -> bool:
        """True for token-major statistics. [fa-doc] softmax_layout: only "TND", only with input_layout="TND"."""
        if softmax_layout not in ("", "TND"):
            raise RuntimeError("emulated torch_npu: only supported softmax_layout=TND [fa-cpp]")
        if softmax_layout == "TND" and not self.tnd_stats_work:
            raise RuntimeError(
                "emulated torch_npu: The param softmax_layout is not supported [fa-cpp: CANN without "
                "aclnnFlashAttentionVarLenScoreV4]"
            )
        return softmax_layout == "TND"

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=INT_MAX,
        next_tockens=INT_MAX,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
        softmax_layout="",
    ):
        """The generation-independent body; :func:`_bind` exposes each generation's exact keywords."""
        _check_tensors(query, key, value, head_num, input_layout, pse, padding_mask, prefix, keep_prob)
        tnd = self.layout(softmax_layout, input_layout)
        band = _mask_mode(atten_mask, sparse_mode, pre_tockens, next_tockens)
        if actual_seq_qlen is None or actual_seq_kvlen is None or len(actual_seq_qlen) != len(actual_seq_kvlen):
            # [fa-cpp] "For TND layout, actual_seq_qlen and actual_seq_kvlen must be provided and have same size"
            raise RuntimeError("emulated torch_npu: TND needs actual_seq_qlen and actual_seq_kvlen of equal length")
        sq, sk = _varlen_segments(actual_seq_qlen, actual_seq_kvlen, query.shape[0], key.shape[0])
        t, n, d = query.shape
        out = torch.full((t, n, d), float("nan"), dtype=torch.float64)  # rows of batches not computed: undefined
        smax = torch.full((t, n), float("nan"), dtype=torch.float64)
        ssum = torch.full((t, n), float("nan"), dtype=torch.float64)
        rep = n // key.shape[1]
        for (qs, qe), (ks, ke) in zip(sq, sk):
            if qe == qs:
                continue
            s = _scores(query[qs:qe], key[ks:ke], scale, band)
            m = s.amax(-1)
            p = torch.exp(s - m.unsqueeze(-1))
            l = p.sum(-1)
            vv = value[ks:ke].double().repeat_interleave(rep, 1)
            out[qs:qe] = torch.einsum("nqk,knd->qnd", p / l.unsqueeze(-1), vv)
            smax[qs:qe], ssum[qs:qe] = m.t(), l.t()
        # [fa-doc] 输出说明: attention_out in the input dtype, softmax_max / softmax_sum float, softmax_out reserved
        return (
            out.to(query.dtype),
            _stats_to_storage(smax.float(), sq, tnd),
            _stats_to_storage(ssum.float(), sq, tnd),
            torch.empty(0),
            0,
            0,
            0,
        )

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        query,
        key,
        value,
        dy,
        head_num,
        input_layout,
        *,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        softmax_max=None,
        softmax_sum=None,
        softmax_in=None,
        attention_in=None,
        scale_value=1.0,
        keep_prob=1.0,
        pre_tockens=INT_MAX,
        next_tockens=INT_MAX,
        inner_precise=0,
        seed=0,
        offset=0,
        numels=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
        softmax_layout="",
    ):
        _check_tensors(query, key, value, head_num, input_layout, pse, padding_mask, prefix, keep_prob)
        tnd = self.layout(softmax_layout, input_layout)
        band = _mask_mode(atten_mask, sparse_mode, pre_tockens, next_tockens)
        sq, sk = _varlen_segments(actual_seq_qlen, actual_seq_kvlen, query.shape[0], key.shape[0])
        t, n, d = query.shape
        m = _stats_from_storage(softmax_max, sq, tnd, "softmax_max")
        l = _stats_from_storage(softmax_sum, sq, tnd, "softmax_sum")
        if m.shape != (t, n):
            raise RuntimeError("emulated torch_npu: softmax statistics must be [T, N, 8] of the query")
        if attention_in is None or attention_in.shape != query.shape or attention_in.dtype != query.dtype:
            raise RuntimeError(
                "emulated torch_npu: attention_in must be the forward output, shaped and typed like query"
            )
        if dy.shape != query.shape or dy.dtype != query.dtype:
            raise RuntimeError("emulated torch_npu: dy must be shaped and typed like query")
        rep = n // key.shape[1]
        m, l = m.double(), l.double()
        dq = torch.zeros(t, n, d, dtype=torch.float64)
        dk = torch.zeros(key.shape, dtype=torch.float64)
        dv = torch.zeros(value.shape, dtype=torch.float64)
        for (qs, qe), (ks, ke) in zip(sq, sk):
            if qe == qs:
                continue
            s = _scores(query[qs:qe], key[ks:ke], scale_value, band)
            p = torch.exp(s - m[qs:qe].t().unsqueeze(-1)) / l[qs:qe].t().unsqueeze(-1)
            do = dy[qs:qe].double()
            vv = value[ks:ke].double().repeat_interleave(rep, 1)
            kk = key[ks:ke].double().repeat_interleave(rep, 1)
            dp = torch.einsum("qnd,knd->nqk", do, vv)
            delta = (do * attention_in[qs:qe].double()).sum(-1).t().unsqueeze(-1)
            ds = p * (dp - delta) * scale_value
            dq[qs:qe] = torch.einsum("nqk,knd->qnd", ds, kk)
            dk[ks:ke] = (
                torch.einsum("nqk,qnd->knd", ds, query[qs:qe].double()).view(ke - ks, key.shape[1], rep, d).sum(2)
            )
            dv[ks:ke] = torch.einsum("nqk,qnd->knd", p, do).view(ke - ks, key.shape[1], rep, d).sum(2)
        grads = (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), torch.empty(0))
        return grads + (torch.empty(0),) if self.name == "current" else grads  # [yaml] from 7.3.0: + dsink


def npu_ring_attention_update(
    prev_attn_out,
    prev_softmax_max,
    prev_softmax_sum,
    cur_attn_out,
    cur_softmax_max,
    cur_softmax_sum,
    *,
    actual_seq_qlen=None,
    input_layout="SBH",
    input_softmax_layout="",
):
    """[rau-doc] signature and formula; checks from [rau-doc] check_attention_inputs and [rau-cann]."""
    if input_layout not in ("SBH", "TND"):
        raise RuntimeError(f"emulated torch_npu: input_layout only supports 'SBH' or 'TND', but got {input_layout}")
    if input_softmax_layout not in ("", "SBH", "TND"):
        raise RuntimeError("emulated torch_npu: input_softmax_layout only supports '', 'SBH' or 'TND'")
    if input_layout != "TND":
        raise NotImplementedError("emulated torch_npu: only input_layout='TND' is emulated")
    if prev_attn_out.shape != cur_attn_out.shape or prev_attn_out.dtype != cur_attn_out.dtype:
        raise RuntimeError("emulated torch_npu: prev_attn_out and cur_attn_out must have the same shape and dtype")
    if prev_attn_out.dtype not in DTYPES or prev_attn_out.dim() != 3:
        raise RuntimeError("emulated torch_npu: attn_out must be a 3D float16/float32/bfloat16 tensor")
    stats = (prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum)
    if any(x.shape != prev_softmax_max.shape or x.dtype != torch.float32 for x in stats) or prev_softmax_max.dim() != 3:
        raise RuntimeError("emulated torch_npu: softmax tensors must be fp32, 3D [T, N, 8] for TND and of one shape")
    t, n, d = prev_attn_out.shape
    if d % 64 or d > 768 or n > 256:  # [rau-cann] TND: D a multiple of 64, D <= 768, N <= 256
        raise RuntimeError(f"emulated torch_npu: TND needs D a multiple of 64 and <= 768 and N <= 256, got N={n} D={d}")
    if actual_seq_qlen is None or not isinstance(actual_seq_qlen, torch.Tensor) or actual_seq_qlen.dtype != torch.int64:
        raise RuntimeError("emulated torch_npu: actual_seq_qlen (int64 tensor) is required when input_layout is 'TND'")
    seq = actual_seq_qlen.tolist()
    # [rau-cann] actualSeqQlenOptional: "an integer tensor that increments from 0 to T"
    if seq[0] != 0 or seq[-1] != t or any(b < a for a, b in zip(seq, seq[1:])):
        raise RuntimeError(f"emulated torch_npu: actual_seq_qlen must increase from 0 to T={t}, got {seq}")
    segs = list(zip(seq, seq[1:]))
    if input_softmax_layout == "SBH":
        raise NotImplementedError("emulated torch_npu: input_softmax_layout='SBH' with TND is not emulated")
    tnd = input_softmax_layout == "TND"  # "" is the original per-segment layout [rau-cann V2: "BNS8"]
    pm, ps, cm, cs = (
        _stats_from_storage(x, segs, tnd, name)
        for x, name in zip(stats, ("prev_softmax_max", "prev_softmax_sum", "cur_softmax_max", "cur_softmax_sum"))
    )
    if (ps <= 0).any() or (cs <= 0).any():  # [rau-cann] softmax sums: "must be positive" (the kernels divide by them)
        raise RuntimeError("emulated torch_npu: softmax sums must be positive")
    # [rau-cann] also says the softmax *max* values "must be positive". Not enforced here, on purpose, because nothing
    # on the device enforces or needs it: the first-phase API's error table lists no value check, and the kernels
    # ([rau-kernel]) compute max / exp of differences with sign-agnostic vector ops, which is what this function does.
    # ringattn passes an LSE as softmax_max, negative wherever a row's scores are; ringattn/kernels/npu.py records the
    # departure and tests/test_backends.py::test_npu_fused_merge_takes_negative_lse pins it.
    m = torch.maximum(pm, cm)
    prev_scaled = ps * torch.exp(pm - m)
    cur_scaled = cs * torch.exp(cm - m)
    s = prev_scaled + cur_scaled
    out = prev_attn_out.float() * (prev_scaled / s).unsqueeze(-1) + cur_attn_out.float() * (cur_scaled / s).unsqueeze(
        -1
    )
    return out.to(prev_attn_out.dtype), _stats_to_storage(m, segs, tnd), _stats_to_storage(s, segs, tnd)


def _bind(gen: _Generation):
    """Python functions with exactly the generation's keyword names (unknown keywords raise TypeError)."""
    if gen.name == "current":  # [yaml] [releases]: + sink (7.3.0), dropout_mask/seed/offset (26.0.0), not emulated

        def fwd(
            query,
            key,
            value,
            head_num,
            input_layout,
            pse=None,
            padding_mask=None,
            atten_mask=None,
            scale=1.0,
            keep_prob=1.0,
            pre_tockens=INT_MAX,
            next_tockens=INT_MAX,
            inner_precise=0,
            prefix=None,
            actual_seq_qlen=None,
            actual_seq_kvlen=None,
            sparse_mode=0,
            gen_mask_parallel=True,
            sync=False,
            softmax_layout="",
            sink=None,
            dropout_mask=None,
            seed=0,
            offset=0,
        ):
            if sink is not None or dropout_mask is not None:
                raise NotImplementedError("emulated torch_npu: sink and dropout_mask are not emulated")
            return gen.forward(
                query,
                key,
                value,
                head_num,
                input_layout,
                pse,
                padding_mask,
                atten_mask,
                scale,
                keep_prob,
                pre_tockens,
                next_tockens,
                inner_precise,
                prefix,
                actual_seq_qlen,
                actual_seq_kvlen,
                sparse_mode,
                gen_mask_parallel,
                sync,
                softmax_layout,
            )

        def bwd(*args, sink=None, **kwargs):
            if sink is not None:
                raise NotImplementedError("emulated torch_npu: sink is not emulated")
            return gen.backward(*args, **kwargs)
    elif gen.has_layout_kwarg:  # TorchNPU 7.2.0's keywords: softmax_layout, no sink
        fwd, bwd = gen.forward, gen.backward
    else:

        def fwd(
            query,
            key,
            value,
            head_num,
            input_layout,
            pse=None,
            padding_mask=None,
            atten_mask=None,
            scale=1.0,
            keep_prob=1.0,
            pre_tockens=INT_MAX,
            next_tockens=INT_MAX,
            inner_precise=0,
            prefix=None,
            actual_seq_qlen=None,
            actual_seq_kvlen=None,
            sparse_mode=0,
            gen_mask_parallel=True,
            sync=False,
        ):
            return gen.forward(
                query,
                key,
                value,
                head_num,
                input_layout,
                pse,
                padding_mask,
                atten_mask,
                scale,
                keep_prob,
                pre_tockens,
                next_tockens,
                inner_precise,
                prefix,
                actual_seq_qlen,
                actual_seq_kvlen,
                sparse_mode,
                gen_mask_parallel,
                sync,
            )

        def bwd(
            query,
            key,
            value,
            dy,
            head_num,
            input_layout,
            *,
            pse=None,
            padding_mask=None,
            atten_mask=None,
            softmax_max=None,
            softmax_sum=None,
            softmax_in=None,
            attention_in=None,
            scale_value=1.0,
            keep_prob=1.0,
            pre_tockens=INT_MAX,
            next_tockens=INT_MAX,
            inner_precise=0,
            seed=0,
            offset=0,
            numels=0,
            prefix=None,
            actual_seq_qlen=None,
            actual_seq_kvlen=None,
            sparse_mode=0,
            gen_mask_parallel=True,
            sync=False,
        ):
            return gen.backward(
                query,
                key,
                value,
                dy,
                head_num,
                input_layout,
                pse=pse,
                padding_mask=padding_mask,
                atten_mask=atten_mask,
                softmax_max=softmax_max,
                softmax_sum=softmax_sum,
                softmax_in=softmax_in,
                attention_in=attention_in,
                scale_value=scale_value,
                keep_prob=keep_prob,
                pre_tockens=pre_tockens,
                next_tockens=next_tockens,
                inner_precise=inner_precise,
                seed=seed,
                offset=offset,
                numels=numels,
                prefix=prefix,
                actual_seq_qlen=actual_seq_qlen,
                actual_seq_kvlen=actual_seq_kvlen,
                sparse_mode=sparse_mode,
                gen_mask_parallel=gen_mask_parallel,
                sync=sync,
            )

    return fwd, bwd


@contextlib.contextmanager
def installed(generation: str = "current"):
    """``sys.modules["torch_npu"]`` is the emulation of ``generation`` inside the block, as before after it."""
    missing = object()
    previous = sys.modules.get("torch_npu", missing)
    try:
        yield install(generation)
    finally:
        if previous is missing:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous


def install(generation: str = "current") -> types.ModuleType:
    """Put the emulation of ``generation`` in ``sys.modules["torch_npu"]`` (prefer :func:`installed`)."""
    gen = _Generation(generation)
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = __doc__
    mod.emulated_generation = generation
    mod.npu_fusion_attention, mod.npu_fusion_attention_grad = _bind(gen)
    if generation == "current":
        mod.npu_ring_attention_update = npu_ring_attention_update
    sys.modules["torch_npu"] = mod
    return mod

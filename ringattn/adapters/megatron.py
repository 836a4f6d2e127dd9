"""megatron-core adapter: EoD-reset ring attention as a drop-in ``core_attention``.

* :class:`RingEoDCoreAttention` — accepted by a layer spec in place of ``core_attention``
  (constructor keywords as ``SelfAttention`` passes them); forward takes ``sbhd``
  (``[s, b, h, d]`` -> ``[s, b, h*d]``) or ``thd`` (``[t, h, d]`` -> ``[t, h*d]``); GQA without
  expanding k/v; the CP group comes from the model's ``pg_collection``. megatron-core's
  ``cp_comm_type`` is honoured: ``"p2p"``/None -> ring, ``"a2a"`` -> Ulysses over the CP group,
  ``"a2a+p2p"`` -> hybrid over megatron's hierarchical CP groups (:func:`cp_ulysses_size`).
* :class:`RingEoDPackedSeqParams` — Megatron's ``PackedSeqParams`` plus the :class:`DocLayout`;
  pass it as ``packed_seq_params`` to ``GPTModel.forward`` (sbhd or thd) so attention knows
  the documents. The core attention also derives a zigzag layout of one sample from a plain thd
  ``PackedSeqParams``' global ``cu_seqlens_q`` (once per batch, shared by the layers), but only
  models without megatron's thd RoPE reach it that way: megatron-core 0.16.1's
  ``rope_utils._apply_rotary_pos_emb_thd`` splits by those ``cu_seqlens`` itself (its own CP
  partition) and fails on ringattn's shards — with RoPE, use :class:`RingEoDPackedSeqParams`.
* :class:`ResetRotaryEmbedding` / :func:`use_reset_position_rope` — the rotary embedding
  takes the ``position_ids`` given to ``GPTModel.forward`` (reset per document, this rank's
  shard), in both formats.
* :func:`get_batch_on_this_cp_rank`, :func:`get_batch`, :func:`is_dataset_built_on_rank` —
  the batch procedure documented for EoD reset in the Ascend Megatron stack: slice for CP
  *before* the pipeline-stage early return; the dataset is built on TP rank 0 of every stage.

Sliding windows and sinks follow megatron-core 0.16.1's ``TransformerConfig``: ``window_size = (left, right)``
(flash_attn's convention; ``left = -1`` means no window; ringattn runs causal windows, ``right = 0``) on the
layers ``is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)`` selects, as
``window = left + 1`` keys; ``softmax_type = "learnable"`` (a ``softmax_offset`` parameter of one logit per
attention head of the TP partition, named and initialised as ``DotProductAttention`` does) and
``"off-by-one"`` (a fixed zero logit) as ringattn's sinks.

Attention dropout is not implemented (``config.attention_dropout`` must be 0).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from .._memo import IdentityMemo
from ..attention import ring_eod_attention
from ..cost import CostModel
from ..eod import eod_metadata
from ..groups import CPGroups
from ..layout import DocLayout

try:
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import is_layer_window_attention
except ImportError as exc:  # pragma: no cover - exercised only without megatron-core
    raise ImportError("ringattn.adapters.megatron needs megatron-core (pip install 'ringattn[megatron]')") from exc

__all__ = [
    "RingEoDCoreAttention",
    "RingEoDPackedSeqParams",
    "ResetRotaryEmbedding",
    "use_reset_position_rope",
    "ringattn_layer_spec",
    "get_batch_on_this_cp_rank",
    "get_batch",
    "is_dataset_built_on_rank",
    "cp_ulysses_size",
    "layer_window",
]

#: megatron-core's ``cp_comm_type`` values ringattn runs (TransformerConfig.cp_comm_type documents
#: "p2p", "all_gather", "a2a" and "a2a+p2p"; None means "p2p")
CP_COMM_TYPES = (None, "p2p", "a2a", "a2a+p2p")

PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

#: per plain thd ``PackedSeqParams`` object (one per batch): ``((cp, ulysses), its cu_seqlens_q, the layout)``
#: derived from it, so that every layer of the batch shares one layout (and its plan and agreement)
DERIVED_LAYOUTS: IdentityMemo[list] = IdentityMemo("layouts derived from thd PackedSeqParams")


@dataclass
class RingEoDPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` carrying the :class:`DocLayout` of the micro-batch.

    ``cu_seqlens_*`` stay None on purpose: the rotary embedding then applies per-token
    frequencies from the reset position ids instead of Megatron's own thd CP partition.
    """

    layout: DocLayout | None = None


def _cp_group(pg_collection):
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_context_parallel_group()
    return group


def _check_cp_comm_type(config, cp_comm_type) -> None:
    """Refuse what ringattn does not run, before any group is touched."""
    if config.context_parallel_size > 1 and isinstance(config.cp_comm_type, (list, tuple)):
        # megatron-core 0.16.1 TransformerLayer indexes the list with the 1-based layer number
        raise ValueError(
            f"cp_comm_type: per-layer lists are not supported (megatron-core 0.16.1 indexes them with the "
            f"1-based layer number); use one of {CP_COMM_TYPES[1:]} for all layers, got {config.cp_comm_type}"
        )
    if cp_comm_type == "all_gather":
        raise ValueError(
            "cp_comm_type='all_gather' is not supported by ringattn (it gathers the whole sequence's KV); "
            "use 'p2p' (ring), 'a2a' (Ulysses) or 'a2a+p2p' (hybrid)"
        )
    if cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type: expected one of {CP_COMM_TYPES}, got {cp_comm_type!r}")


def _hierarchical_groups(pg_collection, config):
    """megatron's ``[a2a group, p2p group]``: ``pg_collection.hcp``, else parallel_state's."""
    hcp = getattr(pg_collection, "hcp", None) if pg_collection is not None else None
    if hcp is None:
        hcp = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    sizes = config.hierarchical_context_parallel_sizes
    if not hcp or len(hcp) != 2:
        raise ValueError(
            "cp_comm_type='a2a+p2p' needs megatron's two hierarchical CP groups (initialize_model_parallel("
            f"hierarchical_context_parallel_sizes=[U, R]) or pg_collection.hcp), got {hcp!r}"
        )
    got = [g.size() for g in hcp]
    if sizes is not None and list(sizes) != got:
        raise ValueError(
            f"hierarchical_context_parallel_sizes: the config says {list(sizes)}, megatron's hierarchical "
            f"CP groups have sizes {got}; initialise megatron's groups with the config's sizes"
        )
    return hcp


def cp_ulysses_size(config: TransformerConfig) -> int:
    """The Ulysses size ringattn runs for a megatron ``TransformerConfig``: the CP size for
    ``cp_comm_type="a2a"``, ``hierarchical_context_parallel_sizes[0]`` for ``"a2a+p2p"``, else 1.

    Pass it to :func:`get_batch` (``ulysses_size=``) so the batch is sharded for the same split.
    """
    cp = config.context_parallel_size
    if cp == 1:  # megatron-core passes no cp_comm_type to attention then
        return 1
    _check_cp_comm_type(config, config.cp_comm_type)
    if config.cp_comm_type in (None, "p2p"):
        return 1
    if config.cp_comm_type == "a2a":
        return cp
    sizes = config.hierarchical_context_parallel_sizes
    if not sizes or len(sizes) != 2 or sizes[0] * sizes[1] != cp:
        raise ValueError(
            f"hierarchical_context_parallel_sizes: cp_comm_type='a2a+p2p' needs [U, R] with U * R = "
            f"context_parallel_size={cp}, got {sizes}"
        )
    return sizes[0]


def layer_window(config: TransformerConfig, layer_number: int) -> int | None:
    """The sliding window (keys per query, itself included) of layer ``layer_number`` (1-based), or None.

    megatron-core 0.16.1: ``TransformerConfig.window_size`` is flash_attn's ``(left, right)``, ``-1`` meaning
    infinite; ``DotProductAttention`` applies it on the layers ``is_layer_window_attention`` selects
    (``window_attn_skip_freq``). A causal window ``(left, 0)`` is ``left + 1`` keys.
    """
    window_size = getattr(config, "window_size", None)
    if not window_size or not is_layer_window_attention(window_size, config.window_attn_skip_freq, layer_number):
        return None
    left, right = window_size
    if right != 0:
        raise ValueError(
            f"window_size: ringattn runs causal sliding windows, (left, 0) in flash_attn's convention; "
            f"got {tuple(window_size)} (set window_size=({left}, 0))"
        )
    return None if left < 0 else left + 1


class RingEoDCoreAttention(nn.Module):
    """Document-causal ring attention in place of megatron-core's ``core_attention``.

    The constructor and ``forward`` take what megatron-core 0.16.1's ``SelfAttention`` passes its
    core attention (the signature of ``megatron.core.transformer.dot_product_attention.DotProductAttention``),
    plus ``comm`` (the plan shape, see :func:`ringattn.ring_eod_attention`). The layer's sliding window
    (:func:`layer_window`) and sinks (``config.softmax_type``) are the config's, as in ``DotProductAttention``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        comm: str | None = None,
    ) -> None:
        super().__init__()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout: ringattn implements no attention dropout; expected 0, got {dropout}; "
                "set attention_dropout=0.0 in the TransformerConfig"
            )
        self.config, self.layer_number, self.attention_type = config, layer_number, attention_type
        _check_cp_comm_type(config, cp_comm_type)
        self.cp_comm_type = cp_comm_type
        self.cp_group = _cp_group(pg_collection)
        #: what attention runs over: the plain CP group (ring) or CPGroups (Ulysses / hybrid)
        self.group, self.ulysses_size = self.cp_group, 1
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1 and cp_comm_type == "a2a":
            self.group = CPGroups.from_groups(self.cp_group, self.cp_group, None)
        elif cp > 1 and cp_comm_type == "a2a+p2p":
            inner, outer = _hierarchical_groups(pg_collection, config)
            # size 1 on either level degrades to the plain mode; from_groups checks sizes and rank order
            self.group = CPGroups.from_groups(
                self.cp_group, inner if inner.size() > 1 else None, outer if outer.size() > 1 else None
            )
        if isinstance(self.group, CPGroups):
            self.ulysses_size = self.group.ulysses_size
            if self.ulysses_size == 1:
                self.group = self.cp_group
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.comm = comm
        self.window = layer_window(config, layer_number)
        self._sinks(config, pg_collection)

    def _sinks(self, config: TransformerConfig, pg_collection) -> None:
        """``softmax_offset`` as megatron-core 0.16.1's DotProductAttention makes it (dot_product_attention.py):
        None ("vanilla"), zeros ("off-by-one", not a parameter), or a parameter initialised with
        ``config.init_method`` ("learnable"), one entry per attention head of this TP rank."""
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type not in ("vanilla", "off-by-one", "learnable"):
            raise ValueError(f"softmax_type: expected 'vanilla', 'off-by-one' or 'learnable', got {softmax_type!r}")
        self.softmax_offset = None
        if softmax_type == "vanilla":
            return
        tp = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        tp_size = (
            tp.size()
            if tp is not None
            else (
                parallel_state.get_tensor_model_parallel_world_size()
                if parallel_state.model_parallel_is_initialized()
                else 1
            )
        )
        heads = config.num_attention_heads // tp_size
        device = (
            "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        )
        offset = torch.zeros(heads, device=device, dtype=config.params_dtype)
        if softmax_type == "off-by-one":  # a fixed zero logit: moves with the module, not in its state dict
            del self.softmax_offset
            self.register_buffer("softmax_offset", offset, persistent=False)
            return
        self.softmax_offset = nn.Parameter(offset)
        if config.perform_initialization:
            config.init_method(self.softmax_offset)

    def _layout(self, packed_seq_params, total_tokens: int) -> DocLayout:
        cp = self.cp_group.size() if self.cp_group is not None else 1
        layout = getattr(packed_seq_params, "layout", None)
        if layout is None and packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            # Megatron shards thd batches in zigzag order itself. The layout is derived once per batch and kept for
            # its packed_seq_params object (DERIVED_LAYOUTS), so every layer shares it (and its plan and agreement):
            # reading cu_seqlens_q back to the host and planning happen once per batch, not once per layer.
            key = (cp, self.ulysses_size)
            cached = DERIVED_LAYOUTS.get(packed_seq_params, lambda: [None, None, None])
            if cached[0] == key and cached[1] is packed_seq_params.cu_seqlens_q:
                layout = cached[2]
            else:
                layout = DocLayout.from_cu_seqlens(
                    packed_seq_params.cu_seqlens_q.cpu(), cp, strategy="zigzag", ulysses_size=self.ulysses_size
                )
                cached[:] = [key, packed_seq_params.cu_seqlens_q, layout]
        if layout is None:
            raise ValueError(
                "packed_seq_params: ringattn needs the documents; pass RingEoDPackedSeqParams(layout=...) "
                "(see get_batch_on_this_cp_rank) or thd PackedSeqParams with cu_seqlens_q"
            )
        if layout.cp_size != cp:
            raise ValueError(
                f"packed_seq_params.layout: cp_size {layout.cp_size} but the CP group has {cp} ranks; "
                "build the batch's layout with get_batch (it takes the CP size from parallel_state)"
            )
        if layout.ulysses_size != self.ulysses_size:
            raise ValueError(
                f"packed_seq_params.layout: ulysses_size {layout.ulysses_size}, but cp_comm_type="
                f"{self.cp_comm_type!r} runs ulysses_size {self.ulysses_size}; shard the batch with "
                "get_batch(..., ulysses_size=cp_ulysses_size(config))"
            )
        return layout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """sbhd: q ``[s, b, hq, d]``, k/v ``[s, b, hkv, d]`` -> ``[s, b, hq*d]``; thd: ``[t, h, d]`` -> ``[t, hq*d]``.

        ``attention_mask`` is ignored: the layout defines the document-causal mask.
        """
        if attention_bias is not None:
            raise ValueError(
                "attention_bias: not supported by ringattn; use a model without an additive attention bias "
                "(or megatron's own core attention)"
            )
        thd = query.dim() == 3
        if thd:
            q, k, v = query, key, value
        else:
            b = query.shape[1]
            q, k, v = (rearrange(x, "s b h d -> (b s) h d") for x in (query, key, value))
        layout = self._layout(packed_seq_params, q.shape[0])
        group = self.group if layout.cp_size > 1 else None
        out = ring_eod_attention(
            q,
            k,
            v,
            layout,
            group=group,
            softmax_scale=self.softmax_scale,
            window=self.window,
            sinks=self.softmax_offset,
            comm=self.comm,
        )
        if thd:
            return rearrange(out, "t h d -> t (h d)")
        return rearrange(out, "(b s) h d -> s b (h d)", b=b)


def ringattn_layer_spec(base_spec: ModuleSpec | None = None, comm: str | None = None) -> ModuleSpec:
    """A GPT layer spec with :class:`RingEoDCoreAttention` as core attention.

    base_spec: a megatron-core ``ModuleSpec`` of a transformer layer (default:
    ``get_gpt_layer_local_spec()``); it is copied, not modified.
    """
    if base_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        base_spec = get_gpt_layer_local_spec()
    spec = copy.deepcopy(base_spec)
    core = RingEoDCoreAttention if comm is None else functools.partial(RingEoDCoreAttention, comm=comm)
    spec.submodules.self_attention.submodules.core_attention = core
    return spec


class ResetRotaryEmbedding(RotaryEmbedding):
    """Megatron's ``RotaryEmbedding`` evaluated at given position ids (reset per document).

    ``position_ids`` ``[b, s_local]`` are set before each forward (see
    :func:`use_reset_position_rope`); the result is ``[s, b, 1, dim]`` for sbhd and
    ``[t, 1, dim]`` for thd (``b = 1``), already this rank's shard, so no CP slicing happens.
    """

    position_ids: torch.Tensor | None = None

    def forward(
        self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: dist.ProcessGroup | None = None
    ) -> torch.Tensor:
        if self.position_ids is None:
            raise ValueError(
                "position_ids: ResetRotaryEmbedding needs the batch's position ids "
                "(pass position_ids to GPTModel.forward after use_reset_position_rope)"
            )
        pos = self.position_ids.to(self.inv_freq.device, self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            pos = pos / self.seq_len_interpolation_factor
        freqs = pos.unsqueeze(-1) * self.inv_freq  # [b, s, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        if packed_seq:
            return rearrange(emb, "b s d -> (b s) 1 d")
        return rearrange(emb, "b s d -> s b 1 d")


def use_reset_position_rope(model: GPTModel) -> ResetRotaryEmbedding:
    """Make ``model`` (a megatron-core ``GPTModel`` with RoPE) rotate by its ``position_ids`` argument.

    Replaces ``model.rotary_pos_emb`` by a :class:`ResetRotaryEmbedding` with the same
    frequencies and registers a forward pre-hook that hands it ``position_ids``.
    """
    old = model.rotary_pos_emb
    new = ResetRotaryEmbedding.__new__(ResetRotaryEmbedding)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    new.inv_freq = old.inv_freq
    model.rotary_pos_emb = new

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        new.position_ids = pos

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return new


def get_batch_on_this_cp_rank(batch: dict[str, Any], layout: DocLayout, cp_rank: int | None = None) -> dict[str, Any]:
    """Shard a ``[b, s]`` batch for CP rank ``cp_rank`` by ``layout``; add attention's metadata.

    Per-token entries (tokens, labels, loss_mask, position_ids) become ``[b, s_local]`` in the
    layout's local order (zigzag: chunks r and 2cp-1-r of every sample); ``attention_mask`` is
    dropped (the layout replaces it); ``packed_seq_params`` (sbhd) carries the layout.
    """
    if cp_rank is None:
        cp_rank = parallel_state.get_context_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    idx = layout.local_indices(cp_rank)
    out = {}
    for key, val in batch.items():
        if key in PER_TOKEN_KEYS and val is not None:
            b = val.shape[0]
            out[key] = val.reshape(-1)[idx.to(val.device)].view(b, -1)
        elif key != "attention_mask":
            out[key] = val
    n = layout.local_tokens(cp_rank)
    out["packed_seq_params"] = RingEoDPackedSeqParams(qkv_format="sbhd", layout=layout, max_seqlen_q=n, max_seqlen_kv=n)
    return out


def is_dataset_built_on_rank() -> bool:
    """EoD reset: the dataset is built on TP rank 0 of *every* pipeline stage (not only first/last)."""
    return parallel_state.get_tensor_model_parallel_rank() == 0


def get_batch(
    data_iterator: Iterator[dict[str, Any]],
    eod_id: int,
    *,
    reset_attention_mask: bool = True,
    reset_position_ids: bool = True,
    eod_mask_loss: bool = False,
    get_batch_on_this_tp_rank: Callable[[Iterator[dict[str, Any]]], dict[str, Any]] | None = None,
    strategy: str = "zigzag",
    ulysses_size: int = 1,
    cost: CostModel | None = None,
) -> dict[str, Any]:
    """Megatron's ``get_batch`` for EoD reset with ring attention.

    1. the TP-rank batch (``get_batch_on_this_tp_rank(data_iterator)`` or ``next(data_iterator)``,
       a dict with ``tokens``/``labels`` ``[b, s]`` and optionally ``loss_mask``);
    2. documents (``--reset-attention-mask``; otherwise one document per sample), position ids
       (reset per document with ``--reset-position-ids``) and the loss mask, from the EoD tokens;
    3. the CP slice (:func:`get_batch_on_this_cp_rank`, layout ``strategy``: ``"zigzag"`` as
       Megatron, ``"balanced"`` for equal attention work per rank, or ``"auto"`` for the least
       predicted step time under ``cost``, a :class:`ringattn.cost.CostModel` of your model and
       cluster, every rank deriving the same layout from the same batch; ``ulysses_size``: the
       Ulysses size of ``cp_comm_type`` "a2a"/"a2a+p2p", see :func:`cp_ulysses_size`), *then*
    4. the pipeline early return: middle stages keep only what attention and RoPE need
       (``packed_seq_params``, ``position_ids``) — they receive the document metadata too.
    """
    batch = get_batch_on_this_tp_rank(data_iterator) if get_batch_on_this_tp_rank else next(data_iterator)
    tokens = batch["tokens"]
    b, s = tokens.shape
    meta = eod_metadata(tokens, eod_id, reset_position_ids=reset_position_ids, eod_mask_loss=eod_mask_loss)
    cu = meta.cu_seqlens.cpu() if reset_attention_mask else torch.arange(0, b * s + 1, s)
    batch = dict(batch)
    batch["position_ids"] = meta.position_ids
    if batch.get("loss_mask") is None:
        batch["loss_mask"] = meta.loss_mask
    cp = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy=strategy, ulysses_size=ulysses_size, cost=cost)
    batch = get_batch_on_this_cp_rank(batch, layout)
    if parallel_state.model_parallel_is_initialized() and not (
        parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()
    ):
        return {"packed_seq_params": batch["packed_seq_params"], "position_ids": batch["position_ids"]}
    return batch

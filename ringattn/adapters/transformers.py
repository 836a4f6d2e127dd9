"""Hugging Face transformers (5.x) adapter: context-parallel training of packed batches, exact.

For any decoder whose attention layers call ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` (Llama,
Qwen2/3, Mistral, ...)::

    from ringattn.adapters.transformers import prepare_model, shard_batch, reduce_loss

    model = prepare_model(model)                  # its own config, attn_implementation="ringattn"
    for batch in loader:                          # e.g. DataCollatorWithFlattening output, same on every CP rank
        inputs = shard_batch(batch, cp_group)     # this rank's tokens + the attention context
                                                  # (cp_group: a ProcessGroup, or ringattn.new_cp_groups(U) for
                                                  # Ulysses x ring / pure Ulysses CP)
        loss = model(**inputs).loss               # its sum over the CP group == the single-device mean
        loss.backward()                           # then sum the gradients over the CP group (see README)

* :func:`register` adds the attention function to transformers' ``AttentionInterface`` under a
  name; :func:`prepare_model` registers it, gives the model its own copy of its config (so a
  config shared with another model is not switched behind the user's back) and selects it.
* :func:`shard_batch` turns a packed batch into this CP rank's ``model(**inputs)`` arguments:
  ``input_ids``, ``position_ids`` (restarting per document), ``labels``, ``shift_labels``
  (shifted over the *whole* batch before sharding), the global ``num_items_in_batch``,
  ``use_cache=False`` and the :class:`RingAttnContext` under ``ringattn_context``. The CP group
  is a ProcessGroup (ring attention) or a :class:`ringattn.CPGroups` (Ulysses x ring; pure
  Ulysses when its ring size is 1): the layout, the padding and the attention follow its split.
* :func:`reduce_loss` sums the per-rank losses for logging; :func:`gather_logits` puts per-token
  outputs back in the batch's order.

Behaviour of transformers 5.24.0 this module relies on (sources in the installed package):

* ``modeling_utils.AttentionInterface.register`` (a ``utils.generic.GeneralInterface`` class-wide
  mapping) makes a name valid for ``set_attn_implementation`` / ``attn_implementation=``
  (``PreTrainedModel.get_correct_attn_implementation`` accepts any ``ALL_ATTENTION_FUNCTIONS`` key).
* The attention layers call ``fn(module, query, key, value, attention_mask, dropout=, scaling=,
  [sliding_window=, softcap=, is_causal=, s_aux=/sinks=, position_bias=], **kwargs)`` with
  ``[b, H, s, d]`` tensors (k/v with the KV heads, not repeated) and expect ``([b, s, H, d], weights)``
  (``models/llama/modeling_llama.py: LlamaAttention.forward``, ``models/qwen3/...: Qwen3Attention``);
  ``**kwargs`` are the model call's extra keyword arguments, passed down unchanged
  (``LlamaForCausalLM.forward`` -> ``LlamaModel.forward`` -> decoder layer -> attention), which
  is how the context reaches the attention function without global state.
* No mask is built: ``masking_utils._preprocess_mask_arguments`` returns early when
  ``config._attn_implementation`` is not a key of ``ALL_MASK_ATTENTION_FUNCTIONS`` (this module
  never registers one), so neither ``create_causal_mask`` nor ``create_sliding_window_causal_mask``
  materialises an O(s^2) mask or scans ``position_ids`` for packed sequences. That early return
  passes a 4-D mask through as is and turns anything else, a 2-D padding mask included, into None:
  the attention function refuses the former, the prepared model's pre-hook the latter.
* Loss: ``loss/loss_utils.py: ForCausalLMLoss`` uses ``shift_labels`` instead of shifting
  ``labels`` when given, and divides the summed cross entropy by ``num_items_in_batch`` when given
  (``fixed_cross_entropy``); the model calls it only if ``labels`` is not None.
* Gradient checkpointing (``modeling_layers.GradientCheckpointingLayer``) binds the layer's
  keyword arguments with ``functools.partial`` and replays the forward in backward, so the
  context is there for the recompute (the ranks replay in the same order).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..agreement import agree, signature
from ..attention import ring_eod_attention
from ..eod import cu_seqlens_from_tokens, position_ids_from_cu_seqlens
from ..groups import CPGroups
from ..layout import DocLayout
from ..plan import ulysses_heads

try:
    from transformers import AttentionInterface, PreTrainedModel
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("ringattn.adapters.transformers needs transformers>=5 (pip install 'ringattn[transformers]')") from exc

__all__ = [
    "DEFAULT_NAME", "CONTEXT_KWARG", "RingAttnContext", "register", "prepare_model", "shard_batch",
    "attention_forward", "reduce_loss", "gather_logits",
]

DEFAULT_NAME = "ringattn"
#: the model-call keyword under which :func:`shard_batch` passes the :class:`RingAttnContext`
CONTEXT_KWARG = "ringattn_context"
#: where the forward pre-hook of a prepared model leaves a refusal for the attention function to agree on
REFUSAL_KWARG = "ringattn_refusal"
IGNORE_INDEX = -100  # ForCausalLMLoss's default ignore_index, DataCollatorWithFlattening's default separator_id


@dataclass(frozen=True, eq=False)
class RingAttnContext:
    """What the attention function needs for one packed batch on one CP rank (built by :func:`shard_batch`).

    layout: the batch's :class:`DocLayout` (padded samples, filler documents included; its
    ``ulysses_size`` is the groups').
    group: the CP process group (None for CP size 1): agreement, :func:`reduce_loss`, :func:`gather_logits`.
    rank: this rank in ``group`` (the CP rank). groups: the :class:`ringattn.CPGroups` given to
    :func:`shard_batch` (None when it got a ProcessGroup, or for CP size 1); :attr:`attention_group`
    is what :func:`ring_eod_attention` gets. position_ids: ``[1, n_local]`` reset position ids of this rank.
    batch_shape: ``(b, s)`` of the batch before padding; padded_len: sample length after padding;
    max_doc_len: the longest real document (a sliding window at least this long masks nothing).
    batch_digest: fingerprint of the global batch, agreed by all ranks before the first exchange
    (catches CP ranks fed different batches). comm, backend: passed to :func:`ring_eod_attention`.
    """

    layout: DocLayout
    group: dist.ProcessGroup | None
    rank: int
    position_ids: torch.Tensor = field(repr=False)
    batch_shape: tuple[int, int]
    padded_len: int
    batch_digest: int
    max_doc_len: int
    comm: str | None = None
    backend: str | None = None
    groups: CPGroups | None = None
    #: signatures the ranks already agreed on for this context (see ringattn.agreement)
    agreed: set = field(default_factory=set, repr=False)

    @property
    def cp_size(self) -> int:
        return self.layout.cp_size

    @property
    def ulysses_size(self) -> int:
        return self.layout.ulysses_size

    @property
    def attention_group(self) -> dist.ProcessGroup | CPGroups | None:
        """The ``group=`` of :func:`ring_eod_attention`: the :class:`CPGroups` if any, else the CP group."""
        return self.groups if self.groups is not None else self.group

    @property
    def local_tokens(self) -> int:
        return self.layout.local_tokens(self.rank)


# ---------------------------------------------------------------------------------------------- registration
def register(name: str = DEFAULT_NAME) -> str:
    """Register :func:`attention_forward` in transformers' ``AttentionInterface`` as ``name`` (idempotent).

    No mask function is registered on purpose (see the module docstring): models then build no mask.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    return name


def _own_config(model) -> None:
    """Give ``model`` a deep copy of its config, rebinding every submodule that held the old objects.

    ``PreTrainedModel.__init__`` keeps the config object it is given (only ``from_pretrained`` copies
    it), and ``set_attn_implementation`` writes ``config._attn_implementation_internal``: without a
    copy, every other model built from the same config object would switch too.
    """
    memo: dict = {}
    new = copy.deepcopy(model.config, memo)
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is not None and id(cfg) in memo:
            module.config = memo[id(cfg)]
    model.config = new


def _check_loss_function(model) -> None:
    fn = getattr(model, "loss_function", None)
    if fn is None:
        return
    params = inspect.signature(fn).parameters
    if "shift_labels" not in params:
        raise ValueError(
            f"loss_function: {getattr(fn, '__name__', fn)} takes no shift_labels; under context parallelism the labels "
            "must be shifted over the whole batch before sharding (transformers' ForCausalLMLoss takes shift_labels)")


def prepare_model(model: PreTrainedModel, name: str = DEFAULT_NAME) -> PreTrainedModel:
    """Make ``model`` (a transformers ``PreTrainedModel``) run ringattn; returns it.

    * registers the attention function as ``name`` and selects it with ``set_attn_implementation``,
      on a private copy of the model's config (other models sharing the config object keep theirs);
    * refuses a model whose loss function ignores ``shift_labels``;
    * adds a forward pre-hook for calls that carry a :class:`RingAttnContext`: missing
      ``position_ids`` are filled from the context (never the model's default ``arange``), position
      ids of the wrong length and any ``attention_mask`` are refused (transformers would drop a 2-D
      mask silently), and ``use_cache`` defaults to False.

    Call it on the model itself, before wrapping it (DDP, FSDP): the hook stays on the model.
    """
    register(name)
    _check_loss_function(model)
    _own_config(model)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"attn_implementation: {type(model).__name__} did not take {name!r} (its attention layers "
                         "must call ALL_ATTENTION_FUNCTIONS.get_interface)")
    if getattr(model, "_ringattn_hook", None) is None:
        model._ringattn_hook = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    return model


def _mask_refusal(mask) -> str:
    what = f"a {mask.dim()}-D" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
    return (f"attention_mask: ringattn takes the documents from the context and builds no mask; got {what} mask "
            "(pass attention_mask=None, as shard_batch does)")


def _pre_forward(module, args, kwargs):
    """Forward pre-hook of a prepared model, for calls that carry a :class:`RingAttnContext`.

    It never raises on what only some ranks might pass: it stashes the refusal under
    ``REFUSAL_KWARG`` for the attention function, whose agreement makes every rank raise it.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, RingAttnContext):
        return None  # the attention function refuses the call without a context
    if len(args) > 1:
        raise ValueError("ringattn: pass the model inputs as keywords (model(**shard_batch(...)))")
    refusal = None
    mask = kwargs.get("attention_mask")
    if mask is not None:
        # transformers would drop a 2-D mask without a word for an implementation without a mask function
        # (masking_utils._preprocess_mask_arguments returns None), so padding would be attended: refuse it
        refusal = _mask_refusal(mask)
        kwargs["attention_mask"] = None
    pos = kwargs.get("position_ids")
    n = ctx.local_tokens
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.shape[-1] != n):
        refusal = refusal or (f"position_ids: expected this CP rank's {n} reset position ids (shard_batch's), got "
                              f"shape {tuple(getattr(pos, 'shape', ()))}")
        pos = None
    if pos is None:  # never the model's default arange: the context's reset position ids
        ref = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        device = ref.device if isinstance(ref, torch.Tensor) else ctx.position_ids.device
        kwargs["position_ids"] = ctx.position_ids.to(device)
    if kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False
    if refusal is not None:
        kwargs[REFUSAL_KWARG] = refusal
    return args, kwargs


# ---------------------------------------------------------------------------------------------- batches
def _resolve_group(group):
    """``(CP group or None, CPGroups or None, CP rank, CP size)``; both None for CP size 1.

    ``group``: a ``torch.distributed`` ProcessGroup (ring), a :class:`ringattn.CPGroups` (Ulysses x
    ring, as :func:`ringattn.new_cp_groups` builds it), or None: the world group when
    torch.distributed is initialised, else CP size 1. Local checks only (no communication).
    """
    groups = None
    if isinstance(group, CPGroups):
        groups, group = group, group.cp
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"group: the CPGroups' cp group must be a torch.distributed ProcessGroup, got "
                             f"{type(group).__name__}")
    elif group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, None, 0, 1
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected a torch.distributed ProcessGroup, a ringattn.CPGroups or None, got "
                         f"{type(group).__name__}")
    size = dist.get_world_size(group)
    if groups is not None and groups.cp_size != size:
        raise ValueError(f"group: the CPGroups split {groups.cp_size} ranks (ulysses_size={groups.ulysses_size} x "
                         f"ring_size={groups.ring_size}) but its cp group has {size}")
    if size == 1:
        return None, None, 0, 1
    return group, groups, dist.get_rank(group), size


def _as_2d(name: str, x, shape=None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected [batch, seq], got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (as input_ids), got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.int64)


def _documents(batch, ids: torch.Tensor, eod_id, pos) -> torch.Tensor:
    """Global document boundaries (int64, flattened ``[b*s]``), every sample boundary included."""
    b, s = ids.shape
    total = b * s
    if eod_id is not None:
        return cu_seqlens_from_tokens(ids, eod_id)  # documents end with their EoD (ringattn.eod)
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        cu = torch.as_tensor(cu).detach().to("cpu", torch.int64).reshape(-1)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(f"cu_seq_lens_q: expected boundaries from 0 to {total} (the batch's tokens), got "
                             f"{cu.tolist()[:4]}...{cu.tolist()[-2:]}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError("cu_seq_lens_q: expected strictly increasing boundaries")
        missing = sorted(set(range(s, total, s)) - set(cu.tolist()))
        if missing:
            raise ValueError(f"cu_seq_lens_q: every sample boundary must be a document boundary; missing {missing[:4]}")
        return cu
    if pos is not None:
        # a document starts wherever the position ids do not grow by one: transformers' own rule for packed
        # position ids (masking_utils.find_packed_sequence_indices: position_diff != 1), plus every sample start
        starts = torch.ones(b, s, dtype=torch.bool)
        starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    else:
        starts = torch.zeros(b, s, dtype=torch.bool)
        starts[:, 0] = True
    first = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    return torch.cat([first, torch.tensor([total])])


def _digest(*tensors: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def shard_batch(batch: Mapping[str, Any], group: dist.ProcessGroup | CPGroups | None = None, *,
                eod_id: int | None = None, strategy: str = "zigzag", pad_to_multiple_of: int | None = None,
                pad_token_id: int = 0, num_items_in_batch: int | torch.Tensor | None = None, comm: str | None = None,
                backend: str | None = None, device: torch.device | str | None = None,
                **layout_kwargs: Any) -> dict[str, Any]:
    """This CP rank's ``model(**inputs)`` arguments for a packed batch; every CP rank passes the same batch.

    batch: ``input_ids`` ``[b, s]`` (``[1, T]`` from ``DataCollatorWithFlattening``) and optionally
    ``labels`` (aligned with ``input_ids``, -100 = ignored; default: ``input_ids``), ``shift_labels``
    (already shifted; used as given), ``position_ids``, ``cu_seq_lens_q``, ``attention_mask`` (all ones only).
    Documents, in order of precedence: ``eod_id`` (a document ends with its EoD token, as
    :mod:`ringattn.eod`), ``cu_seq_lens_q``, ``position_ids`` (a document starts where they do not
    grow by one), else one document per sample. Position ids: the batch's (without ``eod_id``),
    else restarting at 0 per document.

    Labels are shifted over the whole sample *before* sharding (``shift_labels[i] = labels[i+1]``), and
    no prediction crosses a document: the last token of every document gets -100 (the collator's
    -100 at document starts does this already). ``num_items_in_batch``: the number of labels that
    count in the whole batch (override it, e.g. with the count over data-parallel ranks).

    Each sample is padded to a multiple of ``pad_to_multiple_of`` (default: what the layout needs,
    :meth:`DocLayout.required_multiple` for the CP split, ``strategy``, ``chunks_per_rank`` and the
    number of samples: ``2*R``, ``chunks_per_rank*R`` for ``balanced``, and each ring rank's tokens
    in ``U`` equal parts) with a filler document (``pad_token_id``, labels -100) that no real token
    attends to. An explicit ``pad_to_multiple_of`` must give a length the layout accepts.

    group: the CP group. A ProcessGroup runs ring attention over it; a :class:`ringattn.CPGroups`
    (``ringattn.new_cp_groups(U, cp_group)``, or ``CPGroups.from_groups`` over existing groups)
    runs Ulysses x ring with ``U = groups.ulysses_size`` (pure Ulysses when ``ring_size == 1``,
    the plain ring when ``U == 1``); None: the world group if torch.distributed is initialised,
    else CP size 1. Shards by the CP rank (``cp_rank = ring_rank * U + ulysses_rank``).
    ``strategy`` and ``**layout_kwargs`` go to :meth:`DocLayout.from_cu_seqlens` (its
    ``ulysses_size`` comes from the groups); ``comm`` and ``backend`` to :func:`ring_eod_attention`. Returns ``input_ids``, ``position_ids``,
    ``labels``, ``shift_labels`` as ``[1, n_local]`` (this rank's tokens of every sample, in the
    layout's local order, on ``device``), ``num_items_in_batch``, ``use_cache=False`` and
    ``ringattn_context``. Raises ``ValueError`` (no communication) for malformed batches.
    """
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(f"batch: expected a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch or batch["input_ids"] is None:
        raise ValueError("batch: expected input_ids (inputs_embeds are not supported)")
    group, groups, rank, cp = _resolve_group(group)
    ulysses = groups.ulysses_size if groups is not None else 1
    if layout_kwargs.get("ulysses_size", ulysses) != ulysses:
        raise ValueError(f"ulysses_size: shard_batch takes the Ulysses split from the group (here {ulysses}), got "
                         f"ulysses_size={layout_kwargs['ulysses_size']!r}; pass group=ringattn.new_cp_groups(U, cp_group)")
    layout_kwargs["ulysses_size"] = ulysses
    ids = _as_2d("input_ids", batch["input_ids"])
    b, s = ids.shape
    if s == 0:
        raise ValueError("input_ids: sequence length must be positive")
    shape = (b, s)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() != 2 or tuple(mask.shape) != shape or not bool((mask != 0).all()):
            raise ValueError("attention_mask: ringattn takes documents, not padding masks; expected none or all ones "
                             f"[b, s] (use DataCollatorWithFlattening, or pass eod_id), got shape {tuple(mask.shape)}"
                             + ("" if mask.dim() != 2 else " with padded positions"))
    pos_in = batch.get("position_ids")
    pos_in = None if pos_in is None else _as_2d("position_ids", pos_in, shape)
    cu = _documents(batch, ids, eod_id, pos_in)
    if pos_in is not None and eod_id is None:
        pos = pos_in
    else:
        pos = position_ids_from_cu_seqlens(cu, b * s).view(b, s)

    labels = batch.get("labels")
    labels = ids if labels is None else _as_2d("labels", labels, shape)
    shift = batch.get("shift_labels")
    if shift is not None:
        shift = _as_2d("shift_labels", shift, shape)
    else:
        shift = torch.full_like(labels, IGNORE_INDEX)
        shift[:, :-1] = labels[:, 1:]
        shift.view(-1)[cu[1:] - 1] = IGNORE_INDEX  # the last token of a document predicts nothing
    if num_items_in_batch is None:
        num_items_in_batch = (shift != IGNORE_INDEX).sum()

    if pad_to_multiple_of is not None:
        multiple = pad_to_multiple_of
    else:  # the layout's own rule (one source of truth: DocLayout.required_multiple)
        multiple = DocLayout.required_multiple(cp, strategy=strategy, chunks_per_rank=layout_kwargs.get("chunks_per_rank"),
                                               ulysses_size=ulysses, num_samples=b)
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"pad_to_multiple_of: expected a positive int, got {multiple!r}")
    padded = -(-s // multiple) * multiple
    fill = padded - s
    starts = cu[:-1]
    cu_padded = sorted({int(x) // s * padded + int(x) % s for x in starts}
                       | ({j * padded + s for j in range(b)} if fill else set()) | {b * padded})

    def pad(x, value, filler=None):
        out = torch.full((b, padded), value, dtype=x.dtype)
        out[:, :s] = x
        if filler is not None:
            out[:, s:] = filler
        return out

    ids_p = pad(ids, pad_token_id)
    pos_p = pad(pos, 0, torch.arange(fill, dtype=pos.dtype))
    labels_p = pad(labels, IGNORE_INDEX)
    shift_p = pad(shift, IGNORE_INDEX)
    layout = DocLayout.from_cu_seqlens(cu_padded, cp, sample_len=padded, strategy=strategy, **layout_kwargs)
    idx = layout.local_indices(rank)

    def local(x):
        return x.reshape(-1)[idx].unsqueeze(0).to(device)

    local_pos = local(pos_p)
    ctx = RingAttnContext(layout=layout, group=group, rank=rank, position_ids=local_pos, batch_shape=shape,
                          padded_len=padded, batch_digest=_digest(ids_p, pos_p, shift_p),
                          max_doc_len=int((cu[1:] - cu[:-1]).max()), comm=comm, backend=backend, groups=groups)
    return {
        "input_ids": local(ids_p),
        "position_ids": local_pos,
        "labels": local(labels_p),
        "shift_labels": local(shift_p),
        "num_items_in_batch": torch.as_tensor(num_items_in_batch).to(device),
        "use_cache": False,
        CONTEXT_KWARG: ctx,
    }


# ---------------------------------------------------------------------------------------------- attention
def _refusal(ctx, module, query, key, value, attention_mask, dropout, sliding_window, softcap, is_causal, s_aux,
             sinks, position_bias, kwargs) -> str | None:
    """The first thing this call asks for that ringattn cannot honour, as a message; None if none."""
    config = getattr(module, "config", None)
    if kwargs.get(REFUSAL_KWARG):
        return kwargs[REFUSAL_KWARG]
    if attention_mask is not None:
        return _mask_refusal(attention_mask)
    if dropout:
        return f"dropout: ringattn implements no attention dropout; expected 0, got {dropout} (config.attention_dropout)"
    # transformers' window keeps key j for query i iff i - j < sliding_window (masking_utils.sliding_window_overlay;
    # flash-attn's window_size=(w-1, w-1)): inside documents no longer than the window it masks nothing
    if sliding_window is not None and ctx.max_doc_len > sliding_window:
        return (f"sliding_window: a window of {sliding_window} tokens is shorter than the longest document "
                f"({ctx.max_doc_len} tokens); ringattn implements full document-causal attention only")
    if softcap is not None:
        return f"softcap: ringattn implements no logit soft-capping; got {softcap}"
    if s_aux is not None or sinks is not None:
        return "sinks: ringattn implements no attention sinks (s_aux)"
    if position_bias is not None:
        return "position_bias: ringattn implements no additive attention bias"
    if (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is False:
        return "is_causal: ringattn implements causal (decoder) attention only; got is_causal=False"
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        return "output_attentions: ringattn never materialises attention weights"
    if kwargs.get("use_cache"):
        return "use_cache: a KV cache of one CP shard is meaningless; pass use_cache=False (shard_batch does)"
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name}: expected [batch, heads, seq, head_dim], got {tuple(getattr(x, 'shape', ()))}"
    if key.shape[2] != query.shape[2]:
        return (f"key: expected as many tokens as the query ({query.shape[2]}), got {key.shape[2]} "
                "(cross-attention or a KV cache is not supported)")
    if ctx.ulysses_size > 1:  # the all-to-all scatters heads: ring_eod_attention's rule, named for the model
        try:
            ulysses_heads(query.shape[1], key.shape[1], ctx.ulysses_size)
        except ValueError as exc:
            names = ", ".join(f"{n}={getattr(config, n)}" for n in ("num_attention_heads", "num_key_value_heads")
                              if isinstance(getattr(config, n, None), int))
            return (f"{exc}; this layer has {query.shape[1]} query and {key.shape[1]} KV heads"
                    + (f" (config {names})" if names else "")
                    + f" and the CP groups have ulysses_size={ctx.ulysses_size}: use a Ulysses size that divides the "
                      "query heads and divides or is a multiple of the KV heads")
    return None


def _agreement_device(group, query) -> torch.device:
    if str(dist.get_backend(group)).lower() == "gloo" or not isinstance(query, torch.Tensor):
        return torch.device("cpu")
    return query.device


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      s_aux: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                      position_bias: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[b, Hq, s, d]`` q, ``[b, Hkv, s, d]`` k/v -> (``[b, s, Hq, d]``, None).

    Runs :func:`ring_eod_attention` over the context's layout and group (its :class:`CPGroups` for
    Ulysses x ring) with the model's ``scaling``; a float32 query under autocast (mixed precision)
    runs with q, k and v in the autocast dtype.
    Refused (the same ``ValueError`` on every CP rank, before any communication): no context,
    an attention mask, dropout > 0, a sliding window shorter than the longest document (a longer
    one masks nothing and is accepted), softcap, sinks, position bias, non-causal attention,
    ``output_attentions``, ``use_cache``, a key longer than the query, and with a Ulysses size
    ``U > 1`` query heads not divisible by ``U`` or KV heads neither divisible by nor dividing ``U``.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, RingAttnContext):
        raise ValueError(f"{CONTEXT_KWARG}: the ringattn attention needs the context of the batch; call the model with "
                         "the inputs of shard_batch (model(**inputs)), or set another attn_implementation")
    verdict = _refusal(ctx, module, query, key, value, attention_mask, dropout, sliding_window, softcap, is_causal,
                       s_aux, sinks, position_bias, kwargs)
    if ctx.group is not None:
        facts = (ctx.batch_digest, ctx.layout.fingerprint, kwargs.get(REFUSAL_KWARG), attention_mask is None, float(dropout or 0.0),
                 sliding_window, softcap, s_aux is None and sinks is None, position_bias is None, is_causal,
                 bool(kwargs.get("output_attentions")), bool(kwargs.get("use_cache")), scaling)
        sig = signature(facts)
        agreed_key = ("attention", id(ctx.group), sig)
        if agreed_key not in ctx.agreed:
            details = (f"batch {ctx.batch_digest:#x}, layout {ctx.layout.fingerprint:#x}, mask {attention_mask is None}, "
                       f"dropout {facts[4]}, sliding_window {sliding_window}, softcap {softcap}, scaling {scaling}")
            agree(ctx.group, verdict, sig, details, _agreement_device(ctx.group, query))
            ctx.agreed.add(agreed_key)
    if verdict is not None:
        raise ValueError(verdict)
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # mixed precision (Trainer bf16=True/fp16=True on fp32 weights): the projections come out in the autocast dtype
        # and RoPE promotes q and k back to float32; transformers casts such a query to the autocast dtype for its
        # kernels (integrations/flash_attention.py: get_target_dtype), and so does autocast for sdpa
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    b, hq, s, d = query.shape
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], key.shape[3])
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], value.shape[3])
    out = ring_eod_attention(q, k, v, ctx.layout, ctx.attention_group, scaling, comm=ctx.comm, backend=ctx.backend)
    return out.view(b, s, hq, d), None


# ---------------------------------------------------------------------------------------------- loss, outputs
def reduce_loss(loss: torch.Tensor,
                group: dist.ProcessGroup | CPGroups | RingAttnContext | None = None) -> torch.Tensor:
    """The batch loss for logging: the sum of the CP ranks' losses (detached).

    With :func:`shard_batch`'s ``num_items_in_batch`` each rank's loss is its share of the batch
    mean, so the sum is the single-device mean. ``group``: the CP group, a :class:`ringattn.CPGroups`
    (summed over its ``cp`` group) or a :class:`RingAttnContext` (None: the world group if
    torch.distributed is initialised).
    """
    if isinstance(group, RingAttnContext):
        group = group.group
        if group is None:
            return loss.detach().clone()
    group, _, _, _ = _resolve_group(group)
    total = loss.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


@torch.no_grad()
def gather_logits(x: torch.Tensor, context: RingAttnContext) -> torch.Tensor:
    """Any per-token output of this rank (``[1, n_local, ...]``, e.g. logits) in the batch's order.

    Collective over the context's CP group (the whole CP group in Ulysses x ring); returns
    ``[b, s, ...]`` (the batch's shape before padding), not differentiable.
    """
    layout, n = context.layout, context.local_tokens
    if x.shape[:2] != (1, n):
        raise ValueError(f"x: expected [1, {n}, ...] (this rank's tokens), got {tuple(x.shape)}")
    x = x[0]
    rest = tuple(x.shape[1:])
    full = x.new_empty((layout.total_tokens,) + rest)
    if context.group is None:
        full[layout.local_indices(0, x.device)] = x
    else:
        sizes = [layout.local_tokens(r) for r in range(layout.cp_size)]
        buf = x.new_zeros((max(sizes),) + rest)
        buf[:n] = x
        parts = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(parts, buf.contiguous(), group=context.group)
        for r, part in enumerate(parts):
            full[layout.local_indices(r, x.device)] = part[:sizes[r]]
    b, s = context.batch_shape
    return full.view((b, context.padded_len) + rest)[:, :s]

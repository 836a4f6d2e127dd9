"""Preparing a model: its own config, ringattn as its attention, a pre-hook for batch-context calls."""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from transformers import PreTrainedModel

from ..._memo import IdentityMemo
from .attention import register
from .context import (
    CONTEXT_KWARG,
    DEFAULT_NAME,
    NOT_RINGATTN,
    PREPARED_KWARG,
    REFUSAL_KWARG,
    RingAttnContext,
    mask_refusal,
)

__all__ = ["prepare_model", "HOOKS"]

#: per prepared model: ``(handle of its forward pre-hook, the attention name)`` (preparing again replaces it)
HOOKS: IdentityMemo = IdentityMemo("prepared models' pre-hooks")


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
            "must be shifted over the whole batch before sharding: give the model a loss function that takes "
            "shift_labels (transformers' ForCausalLMLoss does)"
        )


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
        raise ValueError(
            f"attn_implementation: {type(model).__name__} did not take {name!r} (its attention layers "
            "must call ALL_ATTENTION_FUNCTIONS.get_interface); ringattn supports models whose attention "
            "goes through transformers' AttentionInterface (Llama, Qwen2/3, Mistral, Gemma 3, gpt-oss, ...)"
        )
    entry = HOOKS.get(model, lambda: [None, None])
    if entry[1] != name:
        if entry[0] is not None:
            entry[0].remove()
        hook = functools.partial(_pre_forward, name=name)
        entry[:] = [model.register_forward_pre_hook(hook, with_kwargs=True), name]
    return model


def _pre_forward(module, args, kwargs, name: str = DEFAULT_NAME):
    """Forward pre-hook of a prepared model, for calls that carry a :class:`RingAttnContext`.

    It refuses at once a model no longer on ringattn's attention (``set_attn_implementation`` to another one
    after :func:`prepare_model`): its attention would ignore the context and train on a wrong loss. Otherwise
    it never raises on what only some ranks might pass: it stashes the refusal under ``REFUSAL_KWARG`` for
    the attention function, whose agreement makes every rank raise it.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, RingAttnContext):
        return None  # the attention function refuses the call without a context
    current = getattr(module.config, "_attn_implementation", None)
    if current != name:
        raise ValueError(
            f"attn_implementation: the model runs {current!r} attention, not ringattn's {name!r}, so it "
            f"would attend only within this CP rank's shard: {NOT_RINGATTN}"
        )
    if len(args) > 1:
        raise ValueError("ringattn: pass the model inputs as keywords (model(**shard_batch(...)))")
    refusal = None
    mask = kwargs.get("attention_mask")
    if mask is not None:
        # transformers would drop a 2-D mask without a word for an implementation without a mask function
        # (masking_utils._preprocess_mask_arguments returns None), so padding would be attended: refuse it
        refusal = mask_refusal(mask)
        kwargs["attention_mask"] = None
    pos = kwargs.get("position_ids")
    n = ctx.local_tokens
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.shape[-1] != n):
        refusal = refusal or (
            f"position_ids: expected this CP rank's {n} reset position ids (shard_batch's), got "
            f"shape {tuple(getattr(pos, 'shape', ()))}"
        )
        pos = None
    if pos is None:  # never the model's default arange: the context's reset position ids
        ref = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        device = ref.device if isinstance(ref, torch.Tensor) else ctx.position_ids.device
        kwargs["position_ids"] = ctx.position_ids.to(device)
    if kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False
    kwargs[PREPARED_KWARG] = True
    if refusal is not None:
        kwargs[REFUSAL_KWARG] = refusal
    return args, kwargs

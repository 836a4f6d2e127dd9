"""The attention function transformers calls: ``[b, H, s, d]`` in, :func:`ringattn.ring_eod_attention` over the
batch context."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from ..._memo import IdentityMemo
from ...agreement import agree_once, agreement_device
from ...attention import ring_eod_attention
from ...plan import ulysses_heads
from .context import ATTENDED, CONTEXT_KWARG, DEFAULT_NAME, PREPARED_KWARG, REFUSAL_KWARG, RingAttnContext, mask_refusal

__all__ = ["attention_forward", "register"]


#: what to do when the CP ranks disagree on one of the facts the attention function agrees on
REMEDIES = {
    "batch": "give every CP rank the same batch (shard the data loader over data-parallel ranks only, e.g. a "
    "DistributedSampler with num_replicas = the data-parallel size) and call shard_batch on each",
    "layout": "call shard_batch with the same arguments (strategy, pad_to_multiple_of, ...) on every CP rank",
}
_SAME_CALL = "every CP rank must run the same model with the same call arguments"


#: per context, with register() alone (no pre-hook): whether the model's position ids were the context's
_POSITIONS_CHECKED: IdentityMemo[list] = IdentityMemo("position ids checked per context")


def _own_positions(ctx: RingAttnContext, pos) -> bool:
    """Whether the layer got the context's position ids: the same tensor, or (checked once per context, a host
    read of this rank's ids) equal values; None when transformers passes no position ids to attention."""
    if pos is None or pos is ctx.position_ids:
        return True
    seen = _POSITIONS_CHECKED.get(ctx, lambda: [None])
    if seen[0] is None:
        seen[0] = (
            isinstance(pos, torch.Tensor)
            and pos.shape[-1] == ctx.position_ids.shape[-1]
            and torch.equal(pos.reshape(-1).cpu(), ctx.position_ids.reshape(-1).cpu())
        )
    return seen[0]


def _refusal(ctx: RingAttnContext, module: nn.Module, query, key, value, attention_mask, call: dict) -> str | None:
    """The first thing this call asks for that ringattn cannot honour, as a message; None if none.

    ``call``: the attention function's keyword options (dropout, sliding_window, softcap, is_causal, s_aux,
    sinks, position_bias) and the model call's extra keywords, as transformers passed them.
    """
    config = getattr(module, "config", None)
    dropout, softcap = call.get("dropout"), call.get("softcap")
    is_causal = call.get("is_causal")
    if call.get(REFUSAL_KWARG):
        return call[REFUSAL_KWARG]
    if not call.get(PREPARED_KWARG) and not _own_positions(ctx, call.get("position_ids")):
        # the model made its own position ids (an arange when the call had none): never what the documents need.
        # A prepared model's pre-hook passes the context's; with register() alone, pass shard_batch's
        return (
            "position_ids: the model did not get shard_batch's reset position ids (it made its own, an arange "
            "over this CP rank's shard); pass model(**shard_batch(...)) with its position_ids, or call "
            "prepare_model(model), whose pre-hook supplies them"
        )
    if attention_mask is not None:
        return mask_refusal(attention_mask)
    if dropout:
        return (
            f"dropout: ringattn implements no attention dropout; expected 0, got {dropout} (config.attention_dropout); "
            "set attention_dropout=0.0 in the model's config"
        )
    # transformers' window keeps key j for query i iff j > i - sliding_window (masking_utils.sliding_window_overlay):
    # exactly ring_eod_attention's window=; it is checked there (a positive int or None)
    if softcap is not None:
        return (
            f"softcap: ringattn implements no logit soft-capping; got {softcap} (config.attn_logit_softcapping); "
            "run this model with another attn_implementation"
        )
    if call.get("s_aux") is not None and call.get("sinks") is not None:
        return "sinks: got both s_aux and sinks; pass the layer's sink logits once"
    if call.get("position_bias") is not None:
        return (
            "position_bias: ringattn implements no additive attention bias; run this model with another "
            "attn_implementation"
        )
    if (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is False:
        return (
            "is_causal: ringattn implements causal (decoder) attention only; got is_causal=False; run encoders and "
            "bidirectional layers with another attn_implementation"
        )
    if call.get("output_attentions") or getattr(config, "output_attentions", False):
        return (
            "output_attentions: ringattn never materialises attention weights; call the model with "
            "output_attentions=False"
        )
    if call.get("use_cache"):
        return "use_cache: a KV cache of one CP shard is meaningless; pass use_cache=False (shard_batch does)"
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name}: expected [batch, heads, seq, head_dim], got {tuple(getattr(x, 'shape', ()))}"
    if key.shape[2] != query.shape[2]:
        return (
            f"key: expected as many tokens as the query ({query.shape[2]}), got {key.shape[2]} "
            "(cross-attention or a KV cache is not supported)"
        )
    if ctx.ulysses_size > 1:  # the all-to-all scatters heads: ring_eod_attention's rule, named for the model
        try:
            ulysses_heads(query.shape[1], key.shape[1], ctx.ulysses_size)
        except ValueError as exc:
            names = ", ".join(
                f"{n}={getattr(config, n)}"
                for n in ("num_attention_heads", "num_key_value_heads")
                if isinstance(getattr(config, n, None), int)
            )
            return (
                f"{exc}; this layer has {query.shape[1]} query and {key.shape[1]} KV heads"
                + (f" (config {names})" if names else "")
                + f" and the CP groups have ulysses_size={ctx.ulysses_size}"
            )
    return None


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[b, Hq, s, d]`` q, ``[b, Hkv, s, d]`` k/v -> (``[b, s, Hq, d]``, None).

    Runs :func:`ring_eod_attention` over the context's layout and group (its :class:`CPGroups` for
    Ulysses x ring) with the model's ``scaling`` (a float32 query under autocast runs with q, k and v in
    the autocast dtype), the layer's ``sliding_window`` (Mistral's config-wide
    window; Qwen2, Gemma 3 and gpt-oss pass it on their sliding layers only) as ``window=`` and the
    layer's learned sinks (gpt-oss ``s_aux``) as ``sinks=``.
    Refused (the same ``ValueError`` on every CP rank, before any communication): no context,
    an attention mask, dropout > 0, softcap, position bias, non-causal attention,
    ``output_attentions``, ``use_cache``, a key longer than the query, and with a Ulysses size
    ``U > 1`` query heads not divisible by ``U`` or KV heads neither divisible by nor dividing ``U``.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, RingAttnContext):
        raise ValueError(
            f"{CONTEXT_KWARG}: the ringattn attention needs the context of the batch; call the model with "
            "the inputs of shard_batch (model(**inputs)), or set another attn_implementation"
        )
    call = dict(
        kwargs,
        dropout=dropout,
        sliding_window=sliding_window,
        softcap=softcap,
        is_causal=is_causal,
        s_aux=s_aux,
        sinks=sinks,
        position_bias=position_bias,
    )
    verdict = _refusal(ctx, module, query, key, value, attention_mask, call)
    if ctx.group is not None:
        facts = {
            "batch": f"{ctx.batch_digest:#x}",
            "layout": f"{ctx.layout!r} {ctx.layout.fingerprint:#x}",
            "refusal": kwargs.get(REFUSAL_KWARG),
            "attention_mask": attention_mask is None,
            "dropout": float(dropout or 0.0),
            "sliding_window": sliding_window,
            "softcap": softcap,
            "sinks": s_aux is None and sinks is None,
            "position_bias": position_bias is None,
            "is_causal": is_causal,
            "output_attentions": bool(kwargs.get("output_attentions")),
            "use_cache": bool(kwargs.get("use_cache")),
            "scaling": scaling,
        }
        remedies = {name: REMEDIES.get(name, _SAME_CALL) for name in facts}
        agree_once(ctx, ctx.group, verdict, facts, agreement_device(ctx.group, query), remedies)
    if verdict is not None:
        raise ValueError(verdict)
    ATTENDED.get(ctx, lambda: [0])[0] += 1
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
    sinks = s_aux if s_aux is not None else sinks
    out = ring_eod_attention(
        q,
        k,
        v,
        ctx.layout,
        ctx.attention_group,
        scaling,
        window=sliding_window,
        sinks=sinks,
        comm=ctx.comm,
        backend=ctx.backend,
    )
    return out.view(b, s, hq, d), None


def register(name: str = DEFAULT_NAME) -> str:
    """Register :func:`attention_forward` in transformers' ``AttentionInterface`` as ``name`` (idempotent).

    No mask function is registered on purpose (see the module docstring): models then build no mask.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    return name

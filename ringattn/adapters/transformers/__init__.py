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

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ringattn.adapters.transformers needs transformers>=5 (pip install 'ringattn[transformers]')"
    ) from exc

from .attention import attention_forward, register  # noqa: E402  (after the check above)
from .batch import shard_batch  # noqa: E402
from .context import CONTEXT_KWARG, DEFAULT_NAME, RingAttnContext  # noqa: E402
from .loss import gather_logits, reduce_loss  # noqa: E402
from .model import prepare_model  # noqa: E402

__all__ = [
    "DEFAULT_NAME",
    "CONTEXT_KWARG",
    "RingAttnContext",
    "register",
    "prepare_model",
    "shard_batch",
    "attention_forward",
    "reduce_loss",
    "gather_logits",
]

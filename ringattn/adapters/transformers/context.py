"""The batch context: what :func:`~ringattn.adapters.transformers.shard_batch` hands to the attention function."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..._memo import IdentityMemo
from ...groups import CPGroups
from ...layout import DocLayout

__all__ = [
    "DEFAULT_NAME",
    "CONTEXT_KWARG",
    "REFUSAL_KWARG",
    "PREPARED_KWARG",
    "IGNORE_INDEX",
    "RingAttnContext",
    "mask_refusal",
    "ATTENDED",
    "NOT_RINGATTN",
]

DEFAULT_NAME = "ringattn"
#: the model-call keyword under which :func:`shard_batch` passes the :class:`RingAttnContext`
CONTEXT_KWARG = "ringattn_context"
#: where the forward pre-hook of a prepared model leaves a refusal for the attention function to agree on
REFUSAL_KWARG = "ringattn_refusal"
#: set by the forward pre-hook of a prepared model: the call's position ids are the context's (the hook saw to it)
PREPARED_KWARG = "ringattn_prepared"
IGNORE_INDEX = -100  # ForCausalLMLoss's default ignore_index, DataCollatorWithFlattening's default separator_id
#: per context: how many times ringattn's attention function ran on it (see :func:`attended_check`)
ATTENDED: IdentityMemo[list] = IdentityMemo("attention calls per batch context")
#: the remedy for a batch context that reached an attention other than ringattn's
NOT_RINGATTN = (
    "call ringattn.adapters.transformers.prepare_model(model) before training on shard_batch's output; if "
    "you switched the model to another attention (e.g. sdpa for generation), switch back with "
    "model.set_attn_implementation('ringattn') before the next training step"
)


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


def mask_refusal(mask) -> str:
    what = f"a {mask.dim()}-D" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
    return (
        f"attention_mask: ringattn takes the documents from the context and builds no mask; got {what} mask "
        "(pass attention_mask=None, as shard_batch does)"
    )


def attended(ctx: RingAttnContext) -> int:
    """How many times ringattn's attention function has run on ``ctx`` (its layers, forward and recompute)."""
    return ATTENDED.get(ctx, lambda: [0])[0]


class _AttendedCheck(torch.autograd.Function):
    """Identity in forward; in backward, refuses a context that no ringattn attention ran on.

    :func:`~ringattn.adapters.transformers.shard_batch` routes ``num_items_in_batch`` through it, so the loss
    (``sum / num_items_in_batch`` in transformers' ``ForCausalLMLoss``) carries the check into its graph: a model
    that is not on ringattn's attention (never prepared, or switched back to sdpa/eager) attends only within this
    rank's shard and would train on a wrong loss without a word; its backward raises instead.
    """

    @staticmethod
    def forward(ctx, count: torch.Tensor, batch_context) -> torch.Tensor:
        ctx.batch_context = batch_context
        return count.clone()

    @staticmethod
    def backward(ctx, grad):
        if attended(ctx.batch_context) == 0:
            raise ValueError(
                "ringattn_context: this step's shard_batch output went through an attention that is not "
                f"ringattn's (the model computed attention within this CP rank's shard only): {NOT_RINGATTN}"
            )
        return None, None


def attended_check(count: torch.Tensor, context: RingAttnContext) -> torch.Tensor:
    """``count`` (float) with :class:`_AttendedCheck` in its graph (the value is unchanged)."""
    return _AttendedCheck.apply(count.float().requires_grad_(), context)

"""Loss and outputs under CP: the batch loss for logging, per-token outputs in the batch's order."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...groups import CPGroups, resolve_group
from .context import NOT_RINGATTN, RingAttnContext, attended

__all__ = ["reduce_loss", "gather_logits"]


def reduce_loss(
    loss: torch.Tensor, group: dist.ProcessGroup | CPGroups | RingAttnContext | None = None
) -> torch.Tensor:
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
    group, _, _, _ = resolve_group(group)
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
    if not attended(context):
        raise ValueError(
            f"context: no ringattn attention ran on this batch, so these outputs attended only within "
            f"this CP rank's shard: {NOT_RINGATTN}"
        )
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
            full[layout.local_indices(r, x.device)] = part[: sizes[r]]
    b, s = context.batch_shape
    return full.view((b, context.padded_len) + rest)[:, :s]

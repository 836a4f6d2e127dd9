"""Documents, reset position ids and loss mask from EoD-separated token ids.

Semantics follow Megatron's ``get_ltor_masks_and_position_ids(data, eod_token,
reset_position_ids, reset_attention_mask, eod_mask_loss)``:

* a document ends *with* its EoD token (the EoD belongs to the document it closes; the next
  document starts right after it);
* every sample boundary is a document boundary (samples never attend to each other);
* with ``reset_position_ids`` the position ids restart at 0 at every document start;
* with ``eod_mask_loss`` the loss mask is 0 on EoD tokens, 1 elsewhere.

``cu_seqlens`` is *global* over the flattened micro-batch ``[b * s]``: it starts at 0, is
strictly increasing and ends at ``b * s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["EodMetadata", "cu_seqlens_from_tokens", "position_ids_from_cu_seqlens", "eod_metadata"]


@dataclass(frozen=True)
class EodMetadata:
    """What attention and the loss need from an EoD-packed batch.

    cu_seqlens: int64 ``[num_docs + 1]`` global document boundaries (flattened ``[b*s]``).
    position_ids: int64 ``[b, s]``.
    loss_mask: float32 ``[b, s]``.
    """

    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(
            f"tokens: expected a 2-D tensor [batch, seq], got {getattr(tokens, 'shape', type(tokens))}; "
            "pass the token ids of the micro-batch (tokens.unsqueeze(0) for a single sample)"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens: expected an integer tensor, got dtype {tokens.dtype}; pass token ids, not embeddings or a mask"
        )
    if tokens.shape[1] == 0:
        raise ValueError("tokens: sequence length must be positive; pass a non-empty batch")


def cu_seqlens_from_tokens(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Global document boundaries of ``tokens [b, s]`` (int64, on the CPU).

    A boundary follows every EoD token and every sample end; the result starts at 0 and ends
    at ``b * s``.
    """
    _check_tokens(tokens)
    b, s = tokens.shape
    is_eod = (tokens == eod_id).cpu()
    is_eod[:, -1] = True  # a sample end closes its last document
    ends = torch.nonzero(is_eod.reshape(-1), as_tuple=False).reshape(-1) + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends.to(torch.int64)])


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int], total: int) -> torch.Tensor:
    """Reset position ids ``[total]``: the offset of every token inside its document."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    if starts.numel() != total:
        raise ValueError(f"cu_seqlens: expected to end at {total}, got {int(cu[-1])}")
    return torch.arange(total, dtype=torch.int64) - starts


def eod_metadata(
    tokens: torch.Tensor,
    eod_id: int,
    *,
    reset_position_ids: bool = True,
    eod_mask_loss: bool = False,
) -> EodMetadata:
    """Megatron's ``get_ltor_masks_and_position_ids`` for EoD reset, as boundaries.

    tokens: integer ``[b, s]``. Returns :class:`EodMetadata` with tensors on ``tokens.device``
    (``cu_seqlens`` stays int64 on the same device).

    Two samples of 6 tokens, EoD id 0; the second sample's last document has no EoD (the sample
    end closes it):

    >>> import torch
    >>> tokens = torch.tensor([[5, 6, 0, 7, 8, 0],
    ...                        [9, 0, 3, 4, 5, 6]])
    >>> meta = eod_metadata(tokens, eod_id=0, eod_mask_loss=True)
    >>> meta.cu_seqlens.tolist()
    [0, 3, 6, 8, 12]
    >>> meta.position_ids.tolist()
    [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    >>> meta.loss_mask.tolist()
    [[1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    """
    _check_tokens(tokens)
    b, s = tokens.shape
    cu = cu_seqlens_from_tokens(tokens, eod_id)
    if reset_position_ids:
        pos = position_ids_from_cu_seqlens(cu, b * s).view(b, s)
    else:
        pos = torch.arange(s, dtype=torch.int64).expand(b, s).clone()
    loss_mask = torch.ones(b, s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[(tokens == eod_id).cpu()] = 0.0
    dev = tokens.device
    return EodMetadata(cu.to(dev), pos.to(dev), loss_mask.to(dev))

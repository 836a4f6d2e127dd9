"""Log-sum-exp merge of partial attention results, in fp32."""
from __future__ import annotations

import torch

__all__ = ["merge_"]


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge one partial result into an accumulator, in place.

    out_acc: fp32 ``[n, H, D]``; lse_acc: fp32 ``[n, H]`` (``-inf`` where nothing was merged
    yet, with ``out_acc`` 0 there). out: ``[n, H, D]`` any float dtype; lse: ``[n, H]`` finite.
    Afterwards ``lse_acc = logaddexp(lse_acc, lse)`` and ``out_acc`` is the softmax-weighted
    combination of both, as if attention had run over the union of their keys.
    """
    lse = lse.float()
    new = torch.logaddexp(lse_acc, lse)
    out_acc.mul_(torch.exp(lse_acc - new).unsqueeze(-1))
    out_acc.add_(out.float() * torch.exp(lse - new).unsqueeze(-1))
    lse_acc.copy_(new)

"""Log-sum-exp merge of partial attention results, in fp32."""
from __future__ import annotations

import torch

__all__ = ["merge"]


def merge(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
    """Merge a partial result into an accumulator; returns ``(out, lse)`` (fp32).

    out_acc: fp32 ``[n, H, D]``; lse_acc: fp32 ``[n, H]`` (finite); out: ``[n, H, D]`` any float
    dtype; lse: ``[n, H]``. The result is attention over the union of both key sets:
    ``lse = logaddexp(lse_acc, lse)``, ``out = exp(lse_acc - lse)*out_acc + exp(lse_i - lse)*out``.
    Elementwise per row, so the executor runs it once per step on all of the step's rows.
    """
    lse = lse.float()
    new = torch.logaddexp(lse_acc, lse)
    merged = out_acc * torch.exp(lse_acc - new).unsqueeze(-1) + out.float() * torch.exp(lse - new).unsqueeze(-1)
    return merged, new

"""Log-sum-exp merge of partial attention results, in fp32."""

from __future__ import annotations

import torch

__all__ = ["merge"]


def merge(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial result into an accumulator; returns ``(out, lse)`` (fp32).

    out_acc: fp32 ``[n, H, D]``; lse_acc: fp32 ``[n, H]`` (finite); out: ``[n, H, D]`` any float
    dtype; lse: ``[n, H]``. The result is attention over the union of both key sets:
    ``lse = logaddexp(lse_acc, lse)``, ``out = exp(lse_acc - lse)*out_acc + exp(lse_i - lse)*out``.
    Elementwise per row, so the executor runs it once per step on all of the step's rows.

    Attention over 8 keys equals the merge of attention over keys ``[0, 5)`` and ``[5, 8)``:

    >>> import torch
    >>> from ringattn.kernels import VarlenCall, get_backend
    >>> kernel = get_backend("cpu", "math")
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(8, 2, 16, generator=g) for _ in range(3))
    >>> def dense(nk):
    ...     return VarlenCall(cu_q=(0, 8), cu_k=(0, nk), causal=False)
    >>> out, lse = kernel.forward(q, k, v, dense(8), 0.25)
    >>> out_a, lse_a = kernel.forward(q, k[:5], v[:5], dense(5), 0.25)
    >>> out_b, lse_b = kernel.forward(q, k[5:], v[5:], dense(3), 0.25)
    >>> merged, merged_lse = merge(out_a, lse_a, out_b, lse_b)
    >>> torch.allclose(merged, out, atol=1e-6) and torch.allclose(merged_lse, lse, atol=1e-6)
    True
    """
    lse = lse.float()
    new = torch.logaddexp(lse_acc, lse)
    merged = out_acc * torch.exp(lse_acc - new).unsqueeze(-1) + out.float() * torch.exp(lse - new).unsqueeze(-1)
    return merged, new

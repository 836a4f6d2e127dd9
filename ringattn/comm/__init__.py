"""Runs plans over torch.distributed (HCCL, NCCL or gloo, taken from the group)."""

from .executor import run_backward, run_forward

__all__ = ["run_forward", "run_backward"]

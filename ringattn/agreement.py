"""Agreement before communication: every rank reaches the same verdict, or all raise.

One small collective (an all-gather of ``[verdict, signature]`` int64 pairs) checks that every
rank's input passed local validation and that all ranks agree on what must be identical:
layout metadata, head counts, head dim, dtype, softmax scale, plan shape and the Ulysses x ring
split (the caller builds the signature; see ``ringattn.attention``). On failure a
second all-gather carries the messages, so every rank raises the same ``ValueError`` naming
the offending ranks and problems. Nothing else is communicated before this returns.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = ["signature", "agree"]


def signature(parts: tuple) -> int:
    """A 62-bit fingerprint of ``parts`` (their ``repr``), identical on every rank."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def agree(group: dist.ProcessGroup, verdict: str | None, sig: int, details: str, device: torch.device) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all are fine and agree.

    verdict: this rank's local validation error (None if fine). sig: :func:`signature` of
    what must agree. details: human-readable form of the signature, used in the message.
    device: where the collective's tensor lives (the group's backend must support it).
    """
    size = dist.get_world_size(group)
    mine = torch.tensor([0 if verdict is None else 1, sig], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    if all(bad == 0 for bad, _ in rows) and len({s for _, s in rows}) == 1:
        return
    reports: list = [None] * size
    dist.all_gather_object(reports, (verdict, details), group=group)
    problems = [f"rank {r}: {v}" for r, (v, _) in enumerate(reports) if v is not None]
    groups: dict[int, list[int]] = {}
    for r, (_, s) in enumerate(rows):
        groups.setdefault(s, []).append(r)
    if len(groups) > 1:
        described = "; ".join(f"ranks {ranks}: {reports[ranks[0]][1]}" for ranks in groups.values())
        problems.append(f"ranks disagree on layout/heads/head_dim/dtype/scale/comm ({described})")
    raise ValueError("ringattn: input rejected on every rank before communication: " + " | ".join(problems))

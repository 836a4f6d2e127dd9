"""Agreement before communication: every rank reaches the same verdict, or all raise.

One small collective (an all-gather of ``[verdict, signature]`` int64 pairs) checks that every
rank's input passed local validation and that all ranks agree on the *facts* that must be
identical (a mapping ``field name -> value``: layout, head counts, head dim, dtype, softmax scale,
plan shape, the Ulysses x ring split, ...; the caller names them, see ``ringattn.attention``). On
failure a second all-gather carries the messages and every rank's facts, so every rank raises the
same ``ValueError``: the ranks whose local validation failed with their messages, and for the
ranks that disagree *only the fields that differ*, with each rank's value and what to do about it.
Nothing else is communicated before this returns.

:func:`agree_once` is the agree-once protocol every caller uses: the ranks agree on the first call
for an object (a layout, an adapter's batch context) and a group, and again whenever the facts
change; the memory of what was agreed lives here (:data:`AGREED`, per object, dropped with it),
not in the object.

>>> facts = {"comm": "direct", "dtype": "torch.bfloat16"}
>>> print(disagreement({0: facts, 1: facts, 2: {"comm": "ring", "dtype": "torch.bfloat16"}},
...                    {"comm": "pass the same comm= on every rank"}))
ranks disagree on comm (ranks [0, 1]: 'direct'; ranks [2]: 'ring'): pass the same comm= on every rank
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ._memo import IdentityMemo

__all__ = ["signature", "agree", "agree_once", "agreement_device", "disagreement", "AGREED"]

#: per object (a layout, an adapter's context): the ``(group id, signature)`` pairs its ranks agreed on
AGREED: IdentityMemo[set] = IdentityMemo("agreements per object")


def signature(parts: Any) -> int:
    """A 62-bit fingerprint of ``parts`` (their ``repr``), identical on every rank."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def agreement_device(group: dist.ProcessGroup, like: Any = None) -> torch.device:
    """Where the agreement's small tensor lives: the host for gloo, else ``like``'s device (NCCL/HCCL
    collectives take device tensors only)."""
    if str(dist.get_backend(group)).lower() == "gloo" or not isinstance(like, torch.Tensor):
        return torch.device("cpu")
    return like.device


def disagreement(facts: Mapping[int, Mapping[str, Any]], remedies: Mapping[str, str] | None = None) -> str | None:
    """What the ranks disagree on (``facts``: rank -> its facts), field by field, or None.

    Only fields whose values differ are named, each with every group of ranks sharing a value and,
    where ``remedies`` has one, what to do.
    """
    remedies = remedies or {}
    fields = list(dict.fromkeys(name for f in facts.values() for name in f))
    parts = []
    for name in fields:
        by_value: dict[str, list[int]] = {}
        for rank, f in sorted(facts.items()):
            by_value.setdefault(repr(f.get(name)), []).append(rank)
        if len(by_value) > 1:
            groups = "; ".join(f"ranks {ranks}: {value}" for value, ranks in by_value.items())
            fix = remedies.get(name)
            parts.append(f"{name} ({groups})" + (f": {fix}" if fix else ""))
    if not parts:
        return None
    return "ranks disagree on " + " | ".join(parts)


def agree(
    group: dist.ProcessGroup,
    verdict: str | None,
    facts: Mapping[str, Any],
    device: torch.device,
    remedies: Mapping[str, str] | None = None,
) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all are fine and agree on ``facts``.

    verdict: this rank's local validation error (None if fine). facts: ``field -> value`` that must be
    identical on every rank (values with a deterministic ``repr``). remedies: ``field -> what to do``
    when that field differs. device: where the collective's tensor lives (:func:`agreement_device`).
    """
    size = dist.get_world_size(group)
    mine = torch.tensor(
        [0 if verdict is None else 1, signature(tuple(facts.items()))], dtype=torch.int64, device=device
    )
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    if all(bad == 0 for bad, _ in rows) and len({s for _, s in rows}) == 1:
        return
    reports: list = [None] * size
    dist.all_gather_object(reports, (verdict, dict(facts)), group=group)
    problems = [f"rank {r}: {v}" for r, (v, _) in enumerate(reports) if v is not None]
    differ = disagreement({r: f for r, (_, f) in enumerate(reports)}, remedies)
    if differ:
        problems.append(differ)
    raise ValueError("ringattn: input rejected on every rank before communication: " + " | ".join(problems))


def agree_once(
    owner: object,
    group: dist.ProcessGroup,
    verdict: str | None,
    facts: Mapping[str, Any],
    device: torch.device,
    remedies: Mapping[str, str] | None = None,
    always: bool = False,
) -> bool:
    """:func:`agree` on the first call for ``(owner, group, facts)``, and on every call with ``always``.

    Returns True when these facts were agreed for ``owner`` and ``group`` on an earlier call and
    nothing was communicated now: the caller's local verdict is then this rank's alone (the other
    ranks are not told). ``owner``: the object the agreement belongs to (a layout, a batch context).
    """
    key = (id(group), signature(tuple(facts.items())))
    seen = AGREED.get(owner, set)
    if not always and key in seen:
        return True
    agree(group, verdict, facts, device, remedies)
    seen.add(key)
    return False

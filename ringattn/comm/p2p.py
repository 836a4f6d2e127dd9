"""Point-to-point batches over an explicit process group.

One :class:`Batch` is the set of isend/irecv a rank posts at one point of a plan; every rank
posts its batches in the same global order, so matching never depends on timing. Errors
while waiting name the plan step and the peers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Batch", "post"]

TAG_KV = 11
TAG_GRAD = 12


@dataclass
class Batch:
    """Posted P2P ops of one step; ``wait()`` blocks until all completed."""

    what: str
    works: list = field(default_factory=list)
    peers: tuple[int, ...] = ()
    tensors: list = field(default_factory=list)  # keep send/recv tensors alive until waited

    def wait(self) -> None:
        try:
            for w in self.works:
                w.wait()
        except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) on timeout / peer loss
            raise RuntimeError(f"ringattn: {self.what} with peer rank(s) {list(self.peers)} failed: {exc}") from exc
        finally:
            self.works = []


def post(group, what: str, sends, recvs, tag: int) -> Batch:
    """Post ``sends``/``recvs`` (lists of ``(group_peer, tensor)``) as one batch.

    Sends come first, then receives, each in the order given, on every rank.
    """
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p, tag=tag) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p, tag=tag) for p, t in recvs]
    peers = tuple(sorted({p for p, _ in sends} | {p for p, _ in recvs}))
    if not ops:
        return Batch(what)
    return Batch(what, dist.batch_isend_irecv(ops), peers, [t for _, t in sends] + [t for _, t in recvs])

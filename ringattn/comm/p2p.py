"""Point-to-point batches over an explicit process group.

One :class:`Batch` is the set of isend/irecv a rank posts at one point of a plan; every rank
posts its batches in the same global order, so matching never depends on timing. Errors
while waiting name the plan step and the peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Batch", "post", "host_staging"]

TAG_KV = 11
TAG_GRAD = 12


@dataclass
class Batch:
    """Posted P2P ops of one step; ``wait()`` blocks until all completed."""

    what: str
    works: list = field(default_factory=list)
    peers: tuple[int, ...] = ()
    tensors: list = field(default_factory=list)  # keep send/recv tensors alive until waited
    unstage: list = field(default_factory=list)  # (device tensor, host tensor) to copy after the wait

    def wait(self) -> None:
        try:
            for w in self.works:
                w.wait()
        except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) on timeout / peer loss
            raise RuntimeError(
                f"ringattn: {self.what} with peer rank(s) {list(self.peers)} failed: {exc} {PEER_HINT}"
            ) from exc
        finally:
            self.works = []
        for dst, host in self.unstage:
            dst.copy_(host)
        self.unstage = []


#: appended to exchange failures: what usually causes them and how to get a clean error instead
PEER_HINT = (
    "(a peer that raised - e.g. a ValueError on input that changed after the layout's first call -, died "
    "or hangs leaves this rank waiting; validate=True makes the ranks agree on every call)"
)


def host_staging(group, device: torch.device) -> bool:
    """True when ``group`` cannot move tensors of ``device`` itself (gloo with accelerator tensors).

    That is how several ranks share one GPU/NPU: NCCL/HCCL refuse two ranks on one device,
    gloo moves host memory, so messages are staged through the host.
    """
    return device.type != "cpu" and dist.get_backend(group) == "gloo"


def post(group, what: str, sends, recvs, tag: int) -> Batch:
    """Post ``sends``/``recvs`` (lists of ``(group_peer, tensor)``) as one batch.

    Sends come first, then receives, each in the order given, on every rank. Device tensors
    go through host copies where the group's backend needs it (:func:`host_staging`).
    """
    unstage = []
    if sends or recvs:
        device = (sends or recvs)[0][1].device
        if host_staging(group, device):
            sends = [(p, t.to("cpu", copy=True)) for p, t in sends]
            staged = []
            for p, t in recvs:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                unstage.append((t, host))
                staged.append((p, host))
            recvs = staged
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p, tag=tag) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p, tag=tag) for p, t in recvs]
    peers = tuple(sorted({p for p, _ in sends} | {p for p, _ in recvs}))
    if not ops:
        return Batch(what)
    try:
        works = dist.batch_isend_irecv(ops)
    except Exception as exc:  # a peer that already failed can make posting itself raise
        raise RuntimeError(
            f"ringattn: posting {what} with peer rank(s) {list(peers)} failed: {exc} {PEER_HINT}"
        ) from exc
    return Batch(what, works, peers, [t for _, t in sends] + [t for _, t in recvs], unstage)

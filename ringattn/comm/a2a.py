"""Ulysses all-to-alls: scatter heads and gather a ring rank's tokens, and back.

A Ulysses group of ``U`` ranks holds one ring rank's ``L`` tokens, ``n = L / U`` each
(contiguous parts of the ring rank's local order, Ulysses rank ``u`` holding part ``u``).
:func:`gather_tokens` sends part ``[:, j]`` of ``[n, U, ...]`` (the head group of rank ``j``) to
rank ``j`` and returns ``[U * n, ...]`` (every rank's tokens, in part order, of this rank's head
group); :func:`scatter_tokens` is its inverse. Each is one ``all_to_all_single``;
:func:`pack_qkv` lays q, k and v side by side so that one collective carries all three, and
:func:`pack_rows` / :func:`unpack_rows` do the same for tensors of different dtypes (the
fp32 dK/dV of replicated KV heads travel beside dq in q's dtype).

``all_to_all_single`` is posted with ``async_op=True`` and waited on; a failure while posting or
waiting (a peer that raised, died or hangs, within the group's timeout) becomes a
``RuntimeError`` naming the phase and the peers. Device tensors on a gloo group go through host
memory (gloo's ``alltoall_base`` takes CPU and CUDA tensors only), as P2P messages do
(:func:`ringattn.comm.p2p.host_staging`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import p2p

__all__ = ["all_to_all", "gather_tokens", "scatter_tokens", "pack_qkv", "pack_rows", "unpack_rows"]


def all_to_all(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """``out[j]`` = ``x[j]`` of group rank ``j`` (dim 0 of ``x`` has the group's size)."""
    x = x.contiguous()
    staged = p2p.host_staging(group, x.device)
    send = x.to("cpu", copy=True) if staged else x
    recv = torch.empty_like(send)
    peers = dist.get_process_group_ranks(group)
    try:
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    except Exception as exc:  # a peer that already failed can make posting itself raise
        raise RuntimeError(
            f"ringattn: posting the {what} with Ulysses peer rank(s) {peers} failed: {exc} {p2p.PEER_HINT}"
        ) from exc
    try:
        work.wait()
    except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) on timeout / peer loss
        raise RuntimeError(f"ringattn: {what} with Ulysses peer rank(s) {peers} failed: {exc} {p2p.PEER_HINT}") from exc
    return recv.to(x.device) if staged else recv


def gather_tokens(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """``[n, U, ...]`` (my tokens, grouped by destination) -> ``[U * n, ...]`` (every part's tokens, my group)."""
    y = all_to_all(x.transpose(0, 1), group, what)
    return y.reshape((-1,) + tuple(y.shape[2:]))


def scatter_tokens(y: torch.Tensor, ulysses_size: int, group, what: str) -> torch.Tensor:
    """The inverse of :func:`gather_tokens`: ``[U * n, ...]`` -> ``[n, U, ...]``."""
    parts = y.reshape((ulysses_size, -1) + tuple(y.shape[1:]))
    return all_to_all(parts, group, what).transpose(0, 1)


def pack_qkv(q, k, v, ulysses_size: int, kv_replication: int) -> torch.Tensor:
    """``[n, U, Hq/U + 2 Hkv', D]``: q, k and v heads of each destination side by side.

    KV heads are split (``Hkv' = Hkv / U``) or, with ``kv_replication > 1``, each replicated
    that many times first (``Hkv' = 1``; replica ``j`` of head ``h`` goes to rank ``h * rep + j``,
    which holds the query heads that read head ``h``).
    """
    u = ulysses_size
    n, hq, d = q.shape
    if kv_replication > 1:
        k, v = (x.repeat_interleave(kv_replication, dim=1) for x in (k, v))
    hk = k.shape[1] // u
    return torch.cat([q.reshape(n, u, hq // u, d), k.reshape(n, u, hk, d), v.reshape(n, u, hk, d)], dim=2)


def pack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[m, U, ...]`` tensors along their trailing elements; as raw bytes if dtypes differ."""
    m, u = parts[0].shape[:2]
    if len({p.dtype for p in parts}) == 1:
        return torch.cat([p.reshape(m, u, -1) for p in parts], dim=2)
    return torch.cat([p.contiguous().reshape(m, u, -1).view(torch.uint8) for p in parts], dim=2)


def unpack_rows(buf: torch.Tensor, likes: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Split :func:`pack_rows`' ``[m, U, ...]`` result back into tensors of trailing shapes/dtypes ``likes``."""
    m, u = buf.shape[:2]
    raw = buf.dtype == torch.uint8 and any(dt != torch.uint8 for _, dt in likes)
    out, off = [], 0
    for shape, dtype in likes:
        width = math.prod(shape) * (dtype.itemsize if raw else 1)
        piece = buf[:, :, off : off + width]
        off += width
        out.append((piece.contiguous().view(dtype) if raw else piece).reshape((m, u) + tuple(shape)))
    return out

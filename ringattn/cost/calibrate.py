"""Calibration: measure this machine's kernel rate and links and write a :class:`~ringattn.cost.HardwareProfile`.

``python -m ringattn.cost --calibrate`` (under torchrun, on the ranks, devices and interconnect you train on).
It sits above the cost model and uses the library's own kernels and P2P path, the way training runs them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..comm.p2p import post
from ..kernels import VarlenCall, get_backend
from .model import FWD_BWD_FACTOR, flops_per_entry
from .profiles import HardwareProfile

__all__ = ["measure_kernel", "measure_p2p", "measure_a2a", "measure_links", "main"]


def _timed(fn, sync, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_kernel(
    kernel, device, heads: int, kv_heads: int, head_dim: int, dtype, seq: int, docs: int, repeat: int, sync
) -> tuple[int, float]:
    """``(unmasked entries, seconds)`` of ``kernel`` forward + backward on ``docs`` causal segments
    of ``seq // docs`` tokens each, the way the executor calls it (one :class:`VarlenCall`, built once)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    n = seq // docs
    total = n * docs
    q, dout = mk(total, heads, head_dim), mk(total, heads, head_dim)
    k, v = mk(total, kv_heads, head_dim), mk(total, kv_heads, head_dim)
    cu = tuple(range(0, total + 1, n))
    call = VarlenCall(cu, cu, True)
    scale = head_dim**-0.5

    def run():
        out, lse = kernel.forward(q, k, v, call, scale)
        kernel.backward(dout, q, k, v, out.to(dtype), lse, call, scale)

    return docs * n * (n + 1) // 2, _timed(run, sync, repeat)


def measure_p2p(group, device, nbytes: int, repeat: int, sync) -> tuple[float, float]:
    """``(bytes/s per rank and direction, seconds of a small exchange)``: every rank sends ``nbytes``
    to the next rank while receiving as much from the previous one (one ring step of the
    executor, through :func:`ringattn.comm.p2p.post`); the slowest rank's time counts."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = (rank + 1) % size, (rank - 1) % size

    def exchange(n: int):
        send = torch.ones(n, dtype=torch.uint8, device=device)
        recv = torch.empty(n, dtype=torch.uint8, device=device)

        def run():
            post(group, "calibration exchange", [(nxt, send)], [(prv, recv)], 99).wait()

        return run

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    big = slowest(_timed(exchange(nbytes), sync, repeat))
    small = slowest(_timed(exchange(8), sync, repeat))
    return nbytes / big, small


def measure_a2a(group, device, nbytes: int, repeat: int, sync) -> float | None:
    """All-to-all bytes/s per rank (bytes a rank sends to the others over the time), or None
    where the backend has no all-to-all."""
    size = dist.get_world_size(group)
    if size < 2:
        return None
    per = max(1, nbytes // size)
    send = torch.ones(per * size, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    try:
        seconds = _timed(lambda: dist.all_to_all_single(recv, send, group=group), sync, repeat)
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return per * (size - 1) / float(t.item())


def measure_links(group, device, nbytes: int, repeat: int, sync, node_size: int = 0):
    """``(P2P bytes/s, seconds of a small exchange, all-to-all bytes/s or None)`` over ``group``.

    With ``node_size > 0`` (a two-level cluster, ``node_size`` consecutive ranks per node) the
    all-to-all is measured inside each node at once (subgroups of ``node_size`` ranks; the slowest
    node counts) and the P2P ring over the whole group, whose node-crossing hops gate it when the
    group spans nodes. Collective over ``group``.
    """
    size = dist.get_world_size(group)
    bw, small = measure_p2p(group, device, nbytes, repeat, sync)
    if not node_size:
        return bw, small, measure_a2a(group, device, nbytes, repeat, sync)
    if size % node_size:
        raise ValueError(f"node_size: expected a divisor of the group's size {size}, got {node_size}")
    node, _ = dist.new_subgroups(group_size=node_size, group=group)
    a2a = measure_a2a(node, device, nbytes, repeat, sync)
    t = torch.tensor([a2a or 0.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bw, small, float(t.item()) or None


def main(argv=None) -> None:
    """``python -m ringattn.cost --calibrate``: measure this machine and write a profile JSON."""
    p = argparse.ArgumentParser(
        prog="python -m ringattn.cost",
        description="Measure the attention kernel rate (the selected backend) and the P2P bandwidth over the "
        "current group and write a HardwareProfile JSON. Run it under torchrun with the ranks, devices "
        "and interconnect you train on, e.g. torchrun --nproc-per-node 8 -m ringattn.cost --calibrate.",
    )
    p.add_argument("--calibrate", action="store_true", required=True)
    p.add_argument("--out", default="ringattn_profile.json", help="where rank 0 writes the profile")
    p.add_argument("--device", default=None, help="cpu, cuda or npu (default: cuda/npu where available)")
    p.add_argument("--backend", default=None, help="kernel backend (default: from the device)")
    p.add_argument("--dist-backend", default=None, help="process group backend (default: gloo on cpu, nccl, hccl)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32 on accelerators, 8 on cpu)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default heads/4)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128, 64 on cpu)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq", type=int, default=None, help="tokens per kernel call (default 8192, 2048 on cpu)")
    p.add_argument(
        "--short",
        type=int,
        default=128,
        help="segment length of the second measurement (many short segments), for segment_overhead",
    )
    p.add_argument("--p2p-bytes", type=int, default=None, help="message size (default 64 MiB, 8 MiB on cpu)")
    p.add_argument(
        "--p2p-bandwidth",
        type=float,
        default=None,
        help="bytes/s to record instead of measuring (needed without a group of 2+ ranks)",
    )
    p.add_argument(
        "--node-size",
        type=int,
        default=0,
        help="ranks per node of a two-level cluster (recorded in the profile): the all-to-all is measured "
        "inside each node (a2a_bandwidth), the P2P ring over all ranks (p2p_bandwidth: between nodes, "
        "so run over 2+ nodes or give --p2p-bandwidth); default 0: one level",
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (cpu)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = (
            "cuda"
            if torch.cuda.is_available()
            else ("npu" if hasattr(torch, "npu") and torch.npu.is_available() else "cpu")
        )
    cpu = args.device == "cpu"
    heads = args.heads or (8 if cpu else 32)
    kv_heads = args.kv_heads or max(1, heads // 4)
    head_dim = args.head_dim or (64 if cpu else 128)
    seq = args.seq or (2048 if cpu else 8192)
    nbytes = args.p2p_bytes or ((8 if cpu else 64) << 20)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        dist_backend = args.dist_backend or {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[args.device]
        dist.init_process_group(dist_backend)
        group = dist.group.WORLD
    rank = dist.get_rank() if group is not None else 0
    if args.device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        getattr(torch, args.device).set_device(local)
    device = (
        torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "npu":
            torch.npu.synchronize()

    kernel = get_backend(device.type, args.backend)
    if group is not None:
        dist.barrier()
    # one long causal segment gives the rate; the same tokens in short segments the fixed cost per segment
    e_long, t_long = measure_kernel(kernel, device, heads, kv_heads, head_dim, dtype, seq, 1, args.repeat, sync)
    n_short = max(1, seq // args.short)
    e_short, t_short = measure_kernel(kernel, device, heads, kv_heads, head_dim, dtype, seq, n_short, args.repeat, sync)
    per_entry = t_long / e_long
    overhead = max(0.0, (t_short - e_short * per_entry) / n_short)
    if group is not None:  # every rank computes at once (as in training); the median rank counts
        got = [None] * world
        dist.all_gather_object(got, (per_entry, overhead))
        per_entry = sorted(g[0] for g in got)[world // 2]
        overhead = sorted(g[1] for g in got)[world // 2]
    rate = FWD_BWD_FACTOR * flops_per_entry(heads, head_dim) / per_entry
    node = args.node_size
    if node < 0 or (node and group is not None and world % node):
        raise SystemExit(f"--node-size: expected 0 or a divisor of the {world} ranks, got {node}")
    if args.p2p_bandwidth is not None:
        bw, small, a2a, how = args.p2p_bandwidth, 0.0, None, "P2P bandwidth given (--p2p-bandwidth)"
        if node and group is not None:  # the all-to-all inside a node can still be measured
            _, small, a2a = measure_links(group, device, nbytes, args.repeat, sync, node)
            how += f"; all-to-all inside nodes of {node} ranks"
    elif group is None:
        raise SystemExit(
            "--calibrate: measuring P2P bandwidth needs a group of 2+ ranks: run under torchrun "
            "--nproc-per-node 2 (or more), or pass --p2p-bandwidth BYTES_PER_S"
        )
    elif node and world <= node:
        raise SystemExit(
            f"--calibrate --node-size {node}: the {world} ranks are one node, so the P2P ring measures "
            "no link between nodes: run over 2+ nodes, or pass --p2p-bandwidth BYTES_PER_S"
        )
    else:
        bw, small, a2a = measure_links(group, device, nbytes, args.repeat, sync, node)
        how = f"P2P: ring exchange of {nbytes} B over {world} ranks ({dist.get_backend(group)})"
        if node:
            how += f", crossing nodes of {node} ranks; all-to-all inside each node"
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    profile = HardwareProfile(
        flops=rate,
        p2p_bandwidth=bw,
        a2a_bandwidth=a2a,
        latency=3 * small,  # a step posts 3 exchanges: forward KV, backward KV, dK/dV
        segment_overhead=overhead,
        node_size=node,
        name=f"calibrated-{device.type}-{kernel.__name__.rsplit('.', 1)[-1]}",
        source=(
            f"python -m ringattn.cost --calibrate, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
            f"{kind}, kernel backend {kernel.__name__.rsplit('.', 1)[-1]}: Hq={heads} Hkv={kv_heads} D={head_dim} "
            f"{args.dtype}: one causal segment of {seq} tokens (rate) and {n_short} of {seq // n_short} (segment "
            f"overhead), median rank of {world}; {how}; latency = 3 small exchanges per step"
        ),
    )
    if rank == 0:
        profile.save(args.out)
        print(
            f"kernel rate {rate / 1e12:.4g} TFLOP/s, {overhead * 1e6:.4g} us per segment, P2P {bw / 1e9:.4g} GB/s"
            + (f", all-to-all {a2a / 1e9:.4g} GB/s" if a2a else "")
            + f", latency {profile.latency * 1e6:.4g} us/step"
            + (f", {node} ranks per node" if node else "")
        )
        print(f"wrote {args.out}")
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

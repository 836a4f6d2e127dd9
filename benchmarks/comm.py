"""Comm shapes side by side: forward+backward time of plain / ring / direct in one run.

    torchrun --standalone --nproc-per-node 4 benchmarks/comm.py [--workloads a,b] [--sample-len 8192]

Every standard workload is rescaled to ``--sample-len`` tokens per sample; for each, the three
plan shapes run interleaved (``--rounds`` rounds, barrier before each timing) so that machine
noise hits them alike. Prints the median time of the busiest rank per shape and its ratio to
the plain ring, beside the plan's KV traffic. Timings on a 2-core CPU with gloo mostly show
compute; run it on the target cluster (NCCL/HCCL) for the communication share.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn import DocLayout, build_plan
from ringattn.plan import COMM_SHAPES
from ringattn.workloads import load_workload, rescale_cu_seqlens, workload_names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(workload_names()))
    p.add_argument("--sample-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="gloo")
    args = p.parse_args()
    dist.init_process_group(args.backend)
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if rank == 0:
        print(f"CP={cp} ({args.backend}), Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} fp32, "
              f"sample_len={args.sample_len}, {args.rounds} rounds; time = busiest rank's fwd+bwd median")
        print(f"{'workload':<26} {'comm':>6} {'steps':>5} {'KV recv max':>11} {'ms':>8} {'vs plain':>8}")
    for name in args.workloads.split(","):
        wl = load_workload(name)
        cu = rescale_cu_seqlens(wl["cu_seqlens"], wl["sample_len"], args.sample_len)
        layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=args.sample_len)
        n = layout.local_tokens(rank)
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(n, args.heads, args.head_dim, generator=g, requires_grad=True)
        k = torch.randn(n, args.kv_heads, args.head_dim, generator=g, requires_grad=True)
        v = torch.randn(n, args.kv_heads, args.head_dim, generator=g, requires_grad=True)
        times = {c: [] for c in COMM_SHAPES}
        for rnd in range(args.rounds + 1):
            for comm in COMM_SHAPES:
                dist.barrier()
                t0 = time.perf_counter()
                ringattn.ring_eod_attention(q, k, v, layout, comm=comm).sum().backward()
                dt = torch.tensor(time.perf_counter() - t0)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if rnd:  # round 0 warms up connections and caches
                    times[comm].append(dt.item())
        if rank == 0:
            base = statistics.median(times["plain"])
            for comm in COMM_SHAPES:
                st = build_plan(layout, comm).stats
                med = statistics.median(times[comm])
                print(f"{wl['name']:<26} {comm:>6} {st.num_steps:>5} {max(st.kv_recv_tokens):>11} "
                      f"{med * 1e3:>8.1f} {med / base:>8.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

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

import torch
import torch.distributed as dist
from _timed import add_run_args, local_qkv, rescaled, timed_rounds

import ringattn
from ringattn import DocLayout, build_plan
from ringattn.plan import COMM_SHAPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, sample_len=8192, rounds=5)
    p.add_argument("--backend", default="gloo")
    args = p.parse_args()
    dist.init_process_group(args.backend)
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if rank == 0:
        print(
            f"CP={cp} ({args.backend}), Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} fp32, "
            f"sample_len={args.sample_len}, {args.rounds} rounds; time = busiest rank's fwd+bwd median"
        )
        print(f"{'workload':<26} {'comm':>6} {'steps':>5} {'KV recv max':>11} {'ms':>8} {'vs plain':>8}")
    for name in args.workloads.split(","):
        wl, cu = rescaled(name, args.sample_len)
        layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=args.sample_len)
        q, k, v = local_qkv(
            layout.local_tokens(rank), args.heads, args.kv_heads, args.head_dim, torch.Generator().manual_seed(rank)
        )
        times = timed_rounds(
            {
                comm: lambda comm=comm: ringattn.ring_eod_attention(q, k, v, layout, comm=comm).sum().backward()
                for comm in COMM_SHAPES
            },
            args.rounds,
        )
        if rank == 0:
            base = statistics.median(times["plain"])
            for comm in COMM_SHAPES:
                st = build_plan(layout, comm).stats
                med = statistics.median(times[comm])
                print(
                    f"{wl['name']:<26} {comm:>6} {st.num_steps:>5} {max(st.kv_recv_tokens):>11} "
                    f"{med * 1e3:>8.1f} {med / base:>8.3f}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

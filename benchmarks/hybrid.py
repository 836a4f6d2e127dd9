"""Ring, Ulysses and hybrid side by side: forward+backward time and bytes of every U x R in one run.

    torchrun --standalone --nproc-per-node 4 benchmarks/hybrid.py [--workloads a,b] [--sample-len 4096]

For CP = the world size, every factorisation ``U x R`` the heads allow (``1 x CP`` is the pure
ring, ``CP x 1`` pure Ulysses) runs on every standard workload, rescaled to ``--sample-len``
tokens per sample, in the layout ``--strategy``. The factorisations run interleaved
(``--rounds`` rounds, barrier before each timing) so that machine noise hits them alike. Prints
the busiest rank's median fwd+bwd time and its ratio to the pure ring, beside the exact bytes a
rank receives (all-to-all and ring KV, forward and backward, from :meth:`DocLayout.cp_stats`).
On a CPU with gloo the time is mostly compute; run it on the target cluster for the
communication share.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from _timed import add_run_args, local_qkv, rescaled, timed_rounds

import ringattn
from ringattn import DocLayout
from ringattn.plan import ulysses_heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, sample_len=4096, rounds=5)
    p.add_argument("--strategy", default="zigzag", choices=["zigzag", "balanced"])
    p.add_argument("--comm", default=None, choices=["plain", "ring", "direct"])
    p.add_argument("--backend", default="gloo")
    args = p.parse_args()
    dist.init_process_group(args.backend)
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    splits = []
    for u in (d for d in range(1, cp + 1) if cp % d == 0):
        try:
            ulysses_heads(args.heads, args.kv_heads, u)
        except ValueError:
            continue
        splits.append((u, ringattn.new_cp_groups(u)))  # collective: same order on every rank
    if rank == 0:
        print(
            f"CP={cp} ({args.backend}), Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} fp32, "
            f"sample_len={args.sample_len}, {args.strategy}, {args.rounds} rounds; time = busiest rank's fwd+bwd "
            f"median; MiB = max per rank received, all-to-all + ring KV, forward + backward"
        )
        print(f"{'workload':<26} {'U x R':>6} {'a2a MiB':>8} {'ring MiB':>8} {'total MiB':>9} {'ms':>8} {'vs ring':>7}")
    for name in args.workloads.split(","):
        wl, cu = rescaled(name, args.sample_len)
        layouts, runs = {}, {}
        for u, groups in splits:
            layout = layouts[u] = DocLayout.from_cu_seqlens(
                cu, cp, sample_len=args.sample_len, strategy=args.strategy, ulysses_size=u
            )
            qkv = local_qkv(
                layout.local_tokens(rank), args.heads, args.kv_heads, args.head_dim, torch.Generator().manual_seed(rank)
            )
            runs[u] = lambda qkv=qkv, layout=layout, groups=groups: (
                ringattn.ring_eod_attention(*qkv, layout, groups, comm=args.comm).sum().backward()
            )
        times_of = timed_rounds(runs, args.rounds)
        if rank == 0:
            base = statistics.median(times_of[splits[0][0]])
            for u, layout in layouts.items():
                st = layout.cp_stats(args.heads, args.kv_heads, args.head_dim, 4, args.comm)
                a2a = max(a + b for a, b in zip(st.a2a_fwd_bytes, st.a2a_bwd_bytes)) / 2**20
                ring = max(a + b for a, b in zip(st.ring_fwd_bytes, st.ring_bwd_bytes)) / 2**20
                med = statistics.median(times_of[u])
                print(
                    f"{wl['name']:<26} {f'{u}x{cp // u}':>6} {a2a:>8.2f} {ring:>8.2f} "
                    f"{max(st.total_bytes) / 2**20:>9.2f} "
                    f"{med * 1e3:>8.1f} {med / base:>7.3f}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

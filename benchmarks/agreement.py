"""Cost of the agreement collective per call: validate=True vs the cached (first-use) path.

    torchrun --standalone --nproc-per-node 4 benchmarks/agreement.py [--tokens 4096,16384]

For each size, alternates forward calls with ``validate=True`` (one all-gather every call)
and ``validate=False`` (agreed once per layout), and prints the median time of both, the
difference per call in microseconds and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn import DocLayout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1024,8192")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if rank == 0:
        print(f"CP={cp} gloo; forward only; median of {args.rounds} alternating calls")
        print(f"{'tokens':>7} {'cached ms':>10} {'validate ms':>12} {'cost us':>8} {'ratio':>6}")
    for total in (int(x) for x in args.tokens.split(",")):
        cu = list(range(0, total, 512)) + [total]
        layout = DocLayout.from_cu_seqlens(cu, cp)
        n = layout.local_tokens(rank)
        q, k, v = torch.randn(n, 8, 64), torch.randn(n, 2, 64), torch.randn(n, 2, 64)
        ringattn.ring_eod_attention(q, k, v, layout)  # first use: agreement + connections
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for validate in (False, True):
                dist.barrier()
                t0 = time.perf_counter()
                ringattn.ring_eod_attention(q, k, v, layout, validate=validate)
                times[validate].append(time.perf_counter() - t0)
        if rank == 0:
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"{total:>7} {a * 1e3:>10.3f} {b * 1e3:>12.3f} {(b - a) * 1e6:>8.0f} {b / a:>6.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

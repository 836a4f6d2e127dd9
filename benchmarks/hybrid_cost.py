"""Predicted efficiency of ring-only CP vs the best Ulysses x ring split on the standard workloads.

    python benchmarks/hybrid_cost.py [--profile h100-nvlink-ib400] [--cp 16,32,64] [--workloads a,b]
        [--heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16] [--comm direct]

For every workload and CP size, under a two-level profile (default: H100 NVLink inside 8-GPU
nodes, 400 Gb/s InfiniBand between them; ``ringattn.cost.PRESETS``), prints the cost model's
predicted efficiency (ideal / step time) of the best pure ring (the best of zigzag, balanced and
auto, ``U = 1``), of ``8 x CP/8`` (the best strategy), and of the best ``U x R`` split over every
valid factorisation and strategy (what ``python -m ringattn.plan --compare`` lists), with the
busiest rank's compute / ring exchange / all-to-all milliseconds of the best split. These are
model predictions from exact counts (deterministic for a profile), not measurements.
"""

from __future__ import annotations

import argparse

from ringattn.cost import CostModel
from ringattn.inspect import compare_factorisations, load_profile
from ringattn.workloads import load_workload, workload_names


def best(rows, u=None):
    """The valid row with the least step time (optionally of one ``U``), or None."""
    ok = [r for r in rows if r[3] is not None and (u is None or r[0] == u)]
    return min(ok, key=lambda r: (r[4].step_s, r[0])) if ok else None


def label(row) -> str:
    u, r, strategy, layout, _ = row
    return f"{u}x{r} {layout.auto_choice if strategy == 'auto' else strategy}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="h100-nvlink-ib400")
    p.add_argument("--cp", default="16,32,64")
    p.add_argument("--workloads", default=",".join(workload_names()))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--comm", default="direct")
    args = p.parse_args()
    model = CostModel(load_profile(args.profile), args.heads, args.kv_heads, args.head_dim, args.dtype)
    prof = model.profile
    print(
        f"profile {prof.name}: {prof.flops / 1e12:g} TFLOP/s, P2P {prof.p2p_bandwidth / 1e9:g} GB/s, all-to-all "
        f"{prof.all_to_all_bandwidth / 1e9:g} GB/s, node size {prof.node_size or '-'}; Hq={args.heads} "
        f"Hkv={args.kv_heads} D={args.head_dim} {args.dtype}, comm={args.comm}"
    )
    print(
        "| workload | CP | ring only (best of zigzag/balanced/auto) | 8 x CP/8 (best strategy) | best U x R | "
        "best: compute / ring / all-to-all ms |"
    )
    print("|---|---:|---|---|---|---|")
    for name in args.workloads.split(","):
        wl = load_workload(name)
        for cp in (int(x) for x in args.cp.split(",")):
            rows = compare_factorisations(wl["cu_seqlens"], cp, wl["sample_len"], model, args.comm)
            ring, node, top = best(rows, 1), best(rows, 8), best(rows)
            cell = lambda r: f"{r[4].efficiency:.3f} ({label(r)})" if r else "not valid"  # noqa: E731
            b = top[4].busiest
            print(
                f"| {wl['name']} | {cp} | {cell(ring)} | {cell(node)} | {cell(top)} | "
                f"{top[4].compute_s[b] * 1e3:.2f} / {top[4].comm_s[b] * 1e3:.2f} / {top[4].a2a_s[b] * 1e3:.2f} |"
            )


if __name__ == "__main__":
    main()

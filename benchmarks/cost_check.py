"""Measured check of the cost model: predicted vs measured forward+backward time, side by side.

    torchrun --standalone --nproc-per-node 4 -m ringattn.cost --calibrate --threads 1 --out cpu_profile.json
    torchrun --standalone --nproc-per-node 4 benchmarks/cost_check.py --profile cpu_profile.json

For each standard workload (rescaled to ``--sample-len`` tokens per sample), builds the zigzag,
balanced and auto layouts (auto minimising the model built from ``--profile``), predicts each
one's step time with that model, and measures ``ring_eod_attention`` forward+backward with the
same plans on this group: the layouts run interleaved for ``--rounds`` rounds (barrier before
each run), and the busiest rank's best time counts (contention from other processes only adds
time). Layouts with identical pieces (auto choosing zigzag's or balanced's) are one entry, timed
once. Prints predicted and measured times, the orderings they imply and whether they match:
every pair the model orders (predicted times more than ``--tie`` apart) must be measured in
that order; pairs it predicts within ``--tie`` (``~``) are not judged.
Use the attention shape and dtype the profile was calibrated with (the defaults match
``--calibrate`` on CPU).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from _timed import add_run_args, local_qkv, rescaled, timed_rounds

import ringattn
from ringattn import DocLayout
from ringattn.cost import CostModel
from ringattn.inspect import load_profile

STRATEGIES = ("zigzag", "balanced", "auto")


def order(values: dict, tie: float = 0.0) -> str:
    """``a < b ~ c``: ascending; ``~`` joins values within ``tie`` (relative) of the previous one."""
    keys = sorted(values, key=lambda k: (values[k], k))
    out = keys[0]
    for prev, k in zip(keys, keys[1:]):
        out += (" ~ " if values[k] <= values[prev] * (1 + tie) else " < ") + k
    return out


def consistent(pred: dict, meas: dict, tie: float) -> bool:
    """Every pair the model orders (beyond ``tie``) is measured in the same order."""
    return all(meas[a] < meas[b] for a in pred for b in pred if pred[a] * (1 + tie) < pred[b])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="profile JSON (python -m ringattn.cost --calibrate) or preset")
    add_run_args(p, sample_len=8192, rounds=7)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--comm", default="direct")
    p.add_argument(
        "--tie", type=float, default=0.01, help="predicted times within this fraction are a tie (not judged)"
    )
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model = CostModel(load_profile(args.profile), args.heads, args.kv_heads, args.head_dim, dtype)
    if rank == 0:
        prof = model.profile
        print(
            f"CP={cp} gloo, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}, comm={args.comm}, "
            f"sample_len={args.sample_len}, {args.rounds} rounds; profile {prof.name}: "
            f"{prof.flops / 1e12:.4g} TFLOP/s, "
            f"{prof.p2p_bandwidth / 1e9:.4g} GB/s, latency {prof.latency * 1e3:.3g} ms/step"
        )
        print(f"{'workload':<26} {'strategy':<22} {'predicted ms':>12} {'measured ms':>11} {'pred/meas':>9}")
    matches = 0
    names = args.workloads.split(",")
    for name in names:
        wl, cu = rescaled(name, args.sample_len)
        layouts = {
            s: DocLayout.from_cu_seqlens(
                cu, cp, sample_len=args.sample_len, strategy=s, cost=model if s == "auto" else None
            )
            for s in STRATEGIES
        }
        # identical layouts are one entry: "auto=balanced" when auto chose balanced's pieces
        entries: dict[str, DocLayout] = {}
        for s, layout in layouts.items():
            same = [e for e, other in entries.items() if other.pieces == layout.pieces]
            if same:
                entries[same[0] + "=" + s] = entries.pop(same[0])
            else:
                entries[s] = layout
        g = torch.Generator().manual_seed(rank)
        runs = {}
        for s, layout in entries.items():
            qkv = local_qkv(layout.local_tokens(rank), args.heads, args.kv_heads, args.head_dim, g, dtype)
            runs[s] = lambda qkv=qkv, layout=layout: (
                ringattn.ring_eod_attention(*qkv, layout, comm=args.comm).float().sum().backward()
            )
        times = timed_rounds(runs, args.rounds)
        if rank == 0:
            pred = {s: model.predict(entries[s], args.comm).step_s for s in entries}
            meas = {s: min(times[s]) for s in entries}
            for s in entries:
                label = s.replace("auto", f"auto: {layouts['auto'].auto_choice}")
                print(
                    f"{wl['name']:<26} {label:<22} {pred[s] * 1e3:>12.1f} {meas[s] * 1e3:>11.1f} "
                    f"{pred[s] / meas[s]:>9.2f}"
                )
            ok = consistent(pred, meas, args.tie)
            matches += ok
            print(
                f"{'':<26} predicted: {order(pred, args.tie)}; measured: {order(meas)} -> "
                f"{'match' if ok else 'MISMATCH'}"
            )
    if rank == 0:
        print(f"orderings matched on {matches} of {len(names)} workloads")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

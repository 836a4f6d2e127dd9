"""Host planning time per training step: layout + this rank's plan, per strategy and CP size.

    python benchmarks/planning.py [--cp 16,64] [--workloads a,b] [--samples 8 --sample-len 16384] [--reference]

What every rank does on every step: build the micro-batch's ``DocLayout`` (zigzag, balanced or
auto with the default cost model) and its own plan (``rank_plan``, comm ``direct``). Each
standard workload is cut into ``--samples`` samples of ``--sample-len`` tokens (its document
boundaries plus the sample boundaries; pretrain_mix_128k gives 61 documents in 8 x 16K).
Every measurement is a fresh layout (nothing cached), for the first, middle and last rank,
``--repeat`` times, after one untimed warm-up per strategy (module imports); prints the median
and the worst time, and for information the time to plan all ranks with statistics
(``build_plan``, what the inspector and benchmarks use).

Python's cyclic garbage collector runs when enough container objects have been allocated, and a
full (generation 2) collection walks every tracked object of the process -- torch alone holds
~150K -- so a measurement that happens to trigger one includes its pause (about 80-120 ms on this
2-core machine), whatever the planner's own cost. The benchmark records those pauses with
``gc.callbacks`` and prints, beside the worst time, how many full collections fell inside the timed
regions and the worst time with their pauses taken out. In a training process the pause is the
whole process's (model, optimizer, framework objects); ``gc.freeze()`` after setup, or Megatron's
``--manual-gc``, keeps it off the step. ``--gc-freeze`` measures that setting.
``--reference`` also times the original all-pairs planner (tests/plan_reference.py), which
built every rank's plan on every call, side by side.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

from ringattn import DocLayout, build_plan, rank_plan
from ringattn.workloads import load_workload, workload_names


def cut(cu, sample_len: int, samples: int) -> list[int]:
    total = sample_len * samples
    if cu[-1] != total:
        raise SystemExit(f"workload has {cu[-1]} tokens, not {samples} x {sample_len}")
    return sorted(set(cu) | set(range(0, total + 1, sample_len)))


class GCPauses:
    """Time spent in full (generation 2) collections since the last ``reset`` (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.full_seconds, self.full_count, self._start = 0.0, 0, None
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.full_seconds, self.full_count = 0.0, 0

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.full_seconds += time.perf_counter() - self._start
            self.full_count += 1
            self._start = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", default="16,64")
    p.add_argument("--workloads", default=",".join(n for n in workload_names() if n.endswith("128k")))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-len", type=int, default=16384)
    p.add_argument("--strategies", default="zigzag,balanced,auto")
    p.add_argument("--comm", default="direct")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reference", action="store_true", help="also time the original all-pairs planner")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after the imports, as a training process would after setup",
    )
    args = p.parse_args()
    pauses = GCPauses()
    reference_plan = None
    if args.reference:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.plan_reference import reference_plan
    print(
        f"{args.samples} x {args.sample_len} tokens, comm={args.comm}; layout + rank_plan of one rank, fresh layout "
        f"each time; ranks first/middle/last x {args.repeat}"
    )
    print(
        f"{'workload':<26} {'docs':>4} {'CP':>3} {'strategy':<20} {'median ms':>9} {'worst ms':>8} "
        f"{'full GCs':>8} {'worst ms w/o GC':>15} {'all ranks ms':>12}"
        + (f" {'all-pairs ms':>12} {'speed-up':>8}" if args.reference else "")
    )
    for strategy in args.strategies.split(","):  # warm-up: auto imports the cost model and solver on first use
        rank_plan(DocLayout.from_cu_seqlens([0, 64], 4, strategy=strategy), 0, args.comm)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    for name in args.workloads.split(","):
        wl = load_workload(name)
        cu = cut(wl["cu_seqlens"], args.sample_len, args.samples)
        for cp in (int(x) for x in args.cp.split(",")):
            for strategy in args.strategies.split(","):
                times, net, full = [], [], 0
                for _ in range(args.repeat):
                    for rank in (0, cp // 2, cp - 1):
                        pauses.reset()
                        t0 = time.perf_counter()
                        layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=args.sample_len, strategy=strategy)
                        rank_plan(layout, rank, args.comm)
                        times.append(time.perf_counter() - t0)
                        net.append(times[-1] - pauses.full_seconds)
                        full += pauses.full_count
                layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=args.sample_len, strategy=strategy)
                t0 = time.perf_counter()
                build_plan(layout, args.comm)
                all_ranks = time.perf_counter() - t0
                label = f"auto: {layout.auto_choice}" if strategy == "auto" else strategy
                line = (
                    f"{wl['name']:<26} {len(cu) - 1:>4} {cp:>3} {label:<20} {statistics.median(times) * 1e3:>9.1f} "
                    f"{max(times) * 1e3:>8.1f} {full:>8} {max(net) * 1e3:>15.1f} {all_ranks * 1e3:>12.1f}"
                )
                if reference_plan is not None:
                    fresh = DocLayout.from_cu_seqlens(cu, cp, sample_len=args.sample_len, strategy=strategy)
                    t0 = time.perf_counter()
                    reference_plan(fresh, args.comm)
                    ref = time.perf_counter() - t0
                    line += f" {ref * 1e3:>12.1f} {ref / statistics.median(times):>8.0f}x"
                print(line, flush=True)


if __name__ == "__main__":
    main()

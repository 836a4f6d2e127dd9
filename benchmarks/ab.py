"""Side-by-side benchmark of two revisions: ``benchmarks/kernels.py`` or ``benchmarks/planning.py`` of REV and
of the working tree.

    python benchmarks/ab.py REV [--script kernels|planning] [--rounds 3] -- [the script's arguments]

Each revision runs its *own* script against its own source tree (REV is exported with ``git archive`` into a
temporary folder), alternately, ``--rounds`` times, so machine noise hits both alike. Prints, per row, the
median of each revision's figure and their ratio (working tree / REV; below 1 is faster): for ``kernels``
the busiest-rank forward+backward time per workload and CP size, for ``planning`` the median layout +
rank-plan time per workload, CP size and strategy. Both run with ``--threads`` intra-op threads (default 1:
on a shared machine a descheduled OpenMP thread stalls a whole parallel region, which swamps any difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_kernels(output: str) -> dict:
    """``{(workload, strategy, cp): busiest ms}`` from kernels.py's table (with or without a strategy column)."""
    rows = {}
    for line in output.splitlines():
        f = line.split()
        if len(f) < 6 or f[0] in ("workload", "device"):
            continue
        try:
            if f[1].isdigit():  # older table: workload tokens CP busiest ...
                rows[(f[0], "-", int(f[2]))] = float(f[3])
            else:
                rows[(f[0], f[1], int(f[3]))] = float(f[4])
        except ValueError:
            continue
    return rows


def parse_planning(output: str) -> dict:
    """``{(workload, strategy, cp): median ms}`` from planning.py's table (auto's choice dropped from the key)."""
    rows = {}
    for line in output.splitlines():
        f = line.split()
        if len(f) < 8 or not f[1].isdigit() or not f[2].isdigit():
            continue
        strategy = f[3].rstrip(":")
        try:
            rows[(f[0], strategy, int(f[2]))] = float(f[5] if strategy == "auto" else f[4])
        except ValueError:
            continue
    return rows


PARSERS = {"kernels": (parse_kernels, "busiest-rank fwd+bwd ms"), "planning": (parse_planning, "median planning ms")}


def run(tree: Path, script: str, args: list[str], threads: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "RINGATTN_WORKLOADS": str(ROOT / "ringattn" / "data" / "workloads"),
    }  # older revisions kept them elsewhere
    out = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / f"{script}.py"), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return PARSERS[script][0](out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev")
    p.add_argument("--script", choices=sorted(PARSERS), default="kernels")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    kargs = argv[split + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.rev], check=True, capture_output=True).stdout
        tar_path = Path(tmp) / "rev.tar"
        tar_path.write_bytes(archive)
        old_tree = Path(tmp) / "rev"
        with tarfile.open(tar_path) as t:
            t.extractall(old_tree)
        results = {"rev": [], "tree": []}
        for _ in range(a.rounds):
            results["rev"].append(run(old_tree, a.script, kargs, a.threads))
            results["tree"].append(run(ROOT, a.script, kargs, a.threads))
    print(
        f"benchmarks/{a.script}.py {' '.join(kargs)}: {PARSERS[a.script][1]}, median of {a.rounds} alternating "
        f"rounds, {a.threads} thread(s); ratio = working tree / {a.rev}"
    )
    print(f"{'workload':<26} {'strategy':<9} {'CP':>3} {a.rev[:10] + ' ms':>14} {'tree ms':>10} {'ratio':>6}")
    keys = sorted({k for r in results["tree"] for k in r} & {k for r in results["rev"] for k in r})
    ratios = []
    for key in keys:
        old = statistics.median(r[key] for r in results["rev"] if key in r)
        new = statistics.median(r[key] for r in results["tree"] if key in r)
        ratios.append(new / old)
        print(f"{key[0]:<26} {key[1]:<9} {key[2]:>3} {old:>14.2f} {new:>10.2f} {new / old:>6.2f}")
    if ratios:
        print(f"geometric mean ratio {statistics.geometric_mean(ratios):.2f} over {len(ratios)} rows")


if __name__ == "__main__":
    main()

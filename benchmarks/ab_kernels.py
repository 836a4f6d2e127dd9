"""Side-by-side kernel benchmark of two revisions: ``benchmarks/kernels.py`` of REV and of the working tree.

    python benchmarks/ab_kernels.py REV [--rounds 3] -- [kernels.py arguments]

Each revision runs its *own* ``benchmarks/kernels.py`` against its own source tree (REV is exported with
``git archive`` into a temporary folder), alternately, ``--rounds`` times, so machine noise hits both
alike. Prints, per workload and CP size, the median busiest-rank forward+backward time of each and their
ratio (working tree / REV; below 1 is faster). Both run with ``--threads`` intra-op threads (default 1:
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


def parse(output: str) -> dict:
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


def run(tree: Path, args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "kernels.py"), *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return parse(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    kargs = argv[split + 1:]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.rev], check=True, capture_output=True).stdout
        tar_path = Path(tmp) / "rev.tar"
        tar_path.write_bytes(archive)
        old_tree = Path(tmp) / "rev"
        with tarfile.open(tar_path) as t:
            t.extractall(old_tree)
        results = {"rev": [], "tree": []}
        for _ in range(a.rounds):
            results["rev"].append(run(old_tree, kargs, a.threads))
            results["tree"].append(run(ROOT, kargs, a.threads))
    print(f"benchmarks/kernels.py {' '.join(kargs)}: median of {a.rounds} alternating rounds, {a.threads} thread(s); "
          f"ratio = working tree / {a.rev}")
    print(f"{'workload':<26} {'CP':>3} {a.rev[:10] + ' ms':>14} {'tree ms':>10} {'ratio':>6}")
    keys = sorted({(w, cp) for r in results["tree"] for (w, _, cp) in r})
    for w, cp in keys:
        old = statistics.median(v for r in results["rev"] for (ww, _, c), v in r.items() if (ww, c) == (w, cp))
        new = statistics.median(v for r in results["tree"] for (ww, _, c), v in r.items() if (ww, c) == (w, cp))
        print(f"{w:<26} {cp:>3} {old:>14.2f} {new:>10.2f} {new / old:>6.2f}")


if __name__ == "__main__":
    main()

"""What a sliding window saves: the busiest rank's work and KV received, with the window vs full attention.

    python benchmarks/window.py [--cp 8,16,32] [--windows 1024,4096,8192] [--strategy zigzag] [--comm direct]

For every standard workload (the 128K ones and the 4 x 32K batch), CP size and window, from the plans
(exact counts, no timing): the busiest rank's work (unmasked score entries per head) and the largest KV
received by a rank in forward, in tokens and in MiB for Hkv=8, D=128, bf16 (4 KiB a token), with the window
and as a fraction of full document-causal attention; and the exchange steps. Same numbers as
``python -m ringattn.inspect --workload NAME --cp N --window W`` prints in its ``window`` line.
"""

from __future__ import annotations

import argparse

from ringattn import DocLayout, build_plan
from ringattn.plan import PlanStats
from ringattn.workloads import load_workload, workload_names

KV_BYTES = PlanStats.kv_bytes_per_token(8, 128, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", default="8,16,32")
    p.add_argument("--windows", default="1024,4096,8192")
    p.add_argument("--strategy", default="zigzag")
    p.add_argument("--comm", default="direct")
    a = p.parse_args()
    cps = [int(x) for x in a.cp.split(",")]
    windows = [int(x) for x in a.windows.split(",")]
    print(
        f"strategy {a.strategy}, comm {a.comm}; work: busiest rank's unmasked entries (M); KV: largest forward "
        f"receive of a rank (tokens, MiB at Hkv=8 D=128 bf16); ratio = window / full"
    )
    print(
        f"{'workload':<26} {'CP':>3} {'window':>6} {'work M':>9} {'ratio':>6} {'KV tokens':>10} {'KV MiB':>7} "
        f"{'ratio':>6} {'steps':>5}"
    )
    for name in workload_names():
        wl = load_workload(name)
        for cp in cps:
            layout = DocLayout.from_cu_seqlens(wl["cu_seqlens"], cp, sample_len=wl["sample_len"], strategy=a.strategy)
            full = build_plan(layout, a.comm).stats
            rows = [(None, full)] + [(w, build_plan(layout, a.comm, w).stats) for w in windows]
            for w, st in rows:
                kv = max(st.kv_recv_tokens)
                print(
                    f"{name:<26} {cp:>3} {w or 'full':>6} {max(st.work) / 1e6:>9.1f} "
                    f"{max(st.work) / max(full.work):>6.3f} {kv:>10} {kv * KV_BYTES / 2**20:>7.1f} "
                    f"{(kv / max(full.kv_recv_tokens) if max(full.kv_recv_tokens) else 1.0):>6.3f} {st.num_steps:>5}"
                )


if __name__ == "__main__":
    main()

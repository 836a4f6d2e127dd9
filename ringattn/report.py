"""Plan inspector: ``python -m ringattn.plan --workload NAME|PATH --cp N [--comm ...] [--png FILE]``.

Prints, per rank: tokens, work (unmasked score entries), work over the mean, block pairs
computed/skipped, KV tokens received (and as a multiple of the rank's local length) and the
number of steps in which it receives; then a summary line per comm shape, the plain ring
included, so targeted plans are read beside the baseline.
"""
from __future__ import annotations

import argparse

from .layout import STRATEGIES, DocLayout
from .plan import COMM_SHAPES, DEFAULT_COMM, Plan, build_plan
from .workloads import load_workload

__all__ = ["rank_table", "summary_line", "work_matrix", "traffic_matrix", "main"]


def rank_table(plan: Plan) -> str:
    st = plan.stats
    mean = st.total_work / st.cp_size
    lines = [f"{'rank':>4} {'tokens':>8} {'work':>13} {'work/mean':>9} {'pairs':>6} {'skipped':>7} "
             f"{'KV recv':>9} {'x local':>7} {'recv steps':>10}"]
    for r in range(st.cp_size):
        steps = sum(1 for n in st.kv_recv_per_step[r] if n)
        lines.append(
            f"{r:>4} {st.tokens[r]:>8} {st.work[r]:>13} {st.work[r] / mean:>9.3f} {st.pairs_computed[r]:>6} "
            f"{st.pairs_skipped[r]:>7} {st.kv_recv_tokens[r]:>9} {st.kv_recv_tokens[r] / st.tokens[r]:>7.3f} {steps:>10}"
        )
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    st = plan.stats
    per_step_max = [max(col) for col in zip(*st.kv_recv_per_step)]
    return (f"{plan.comm:>6}: steps {st.num_steps}, imbalance {st.imbalance:.3f}, KV recv total {sum(st.kv_recv_tokens)} "
            f"tokens, max/rank {max(st.kv_recv_tokens)} ({max(r / t for r, t in zip(st.kv_recv_tokens, st.tokens)):.3f}x local), "
            f"critical path {sum(per_step_max)} tokens")


def work_matrix(plan: Plan) -> list[list[int]]:
    """``m[x][o]``: score entries rank x computes on rank o's KV."""
    cp = plan.stats.cp_size
    m = [[0] * cp for _ in range(cp)]
    for rp in plan.ranks:
        for s in rp.steps:
            m[rp.rank][s.origin] += s.work
    return m


def traffic_matrix(plan: Plan) -> list[list[int]]:
    """``m[src][dst]``: KV tokens sent over the link src -> dst in the forward pass."""
    cp = plan.stats.cp_size
    m = [[0] * cp for _ in range(cp)]
    for rp in plan.ranks:
        for s in rp.steps:
            if s.send:
                m[rp.rank][s.send.peer] += s.send.tokens
    return m


def save_png(plan: Plan, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        raise SystemExit("--png needs matplotlib: pip install 'ringattn[plot]'") from exc
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (name, m, xl, yl) in zip(axes, [
        ("work (score entries)", work_matrix(plan), "KV origin rank", "query rank"),
        ("KV traffic (tokens)", traffic_matrix(plan), "receiver rank", "sender rank"),
    ]):
        im = ax.imshow(m, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ringattn.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, help="standard workload name or JSON path")
    p.add_argument("--cp", type=int, required=True)
    p.add_argument("--strategy", default="zigzag", choices=STRATEGIES)
    p.add_argument("--chunks-per-rank", type=int, default=None, help="chunks of each sample per rank (balanced)")
    p.add_argument("--comm", default=DEFAULT_COMM, choices=COMM_SHAPES)
    p.add_argument("--png", help="write the rank x rank work and traffic matrices to this PNG")
    args = p.parse_args(argv)
    wl = load_workload(args.workload)
    layout = DocLayout.from_cu_seqlens(wl["cu_seqlens"], args.cp, sample_len=wl["sample_len"], strategy=args.strategy,
                                       chunks_per_rank=args.chunks_per_rank)
    plan = build_plan(layout, args.comm)
    title = f"{wl['name']}: {layout.num_docs} docs, {layout.total_tokens} tokens, CP={args.cp}, {args.strategy}, comm={args.comm}"
    print(title)
    print(rank_table(plan))
    for comm in COMM_SHAPES:
        print(summary_line(build_plan(layout, comm)))
    if args.png:
        save_png(plan, args.png, title)
        print(f"wrote {args.png}")

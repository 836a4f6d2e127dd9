"""Plan inspector: ``python -m ringattn.inspect --workload NAME|PATH --cp N [--ulysses U] [--comm ...] [--png FILE]``
(``python -m ringattn.plan`` is an alias). ``--window W`` plans a sliding window of ``W`` keys: the tables show
the work and traffic that remain, and a line compares them with full attention.

Prints, per (ring) rank: tokens, work (unmasked score entries), work over the mean, block pairs
computed/skipped, KV tokens received (and as a multiple of the rank's local length) and the
number of steps in which it receives; then a summary line per comm shape, the plain ring
included, so targeted plans are read beside the baseline. Then, per CP rank, the bytes it
moves for the given heads (``--heads/--kv-heads/--head-dim/--dtype``, default Llama-3-8B-like
32/8/128 bf16): all-to-all and ring KV, forward and backward; and, for the workload and CP
size, ring-only beside every valid Ulysses x ring factorisation ``U x R``.

``--compare`` prints the layout strategies side by side instead (zigzag, balanced, auto) under
a cost model (``--profile`` preset or JSON, ``--heads/--kv-heads/--head-dim/--dtype``): work
imbalance, KV received per rank, exchange steps, the busiest rank's predicted compute and
exchange time, the predicted step time and efficiency of the pure ring; then the same three
strategies for every Ulysses x ring factorisation ``U x R`` of the CP size (``U = 1`` the pure
ring, ``R = 1`` pure Ulysses): work imbalance, all-to-all and ring bytes per rank, the busiest
rank's compute, ring exchange and all-to-all time, step time and efficiency, and the best split.
"""

from __future__ import annotations

import argparse

from .cost import PRESETS, CostModel, HardwareProfile
from .layout import STRATEGIES, DocLayout
from .plan import COMM_SHAPES, DEFAULT_COMM, CPStats, Plan, build_plan
from .workloads import load_workload

__all__ = [
    "rank_table",
    "summary_line",
    "window_line",
    "work_matrix",
    "traffic_matrix",
    "cp_rank_table",
    "factorisations",
    "factorisation_table",
    "compare_table",
    "compare_factorisations",
    "factorisation_compare_table",
    "load_profile",
    "main",
]

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MIB = 1 << 20


def rank_table(plan: Plan) -> str:
    st = plan.stats
    mean = st.total_work / st.cp_size
    lines = [
        f"{'rank':>4} {'tokens':>8} {'work':>13} {'work/mean':>9} {'pairs':>6} {'skipped':>7} "
        f"{'KV recv':>9} {'x local':>7} {'recv steps':>10}"
    ]
    for r in range(st.cp_size):
        steps = sum(1 for n in st.kv_recv_per_step[r] if n)
        lines.append(
            f"{r:>4} {st.tokens[r]:>8} {st.work[r]:>13} {st.work[r] / mean:>9.3f} {st.pairs_computed[r]:>6} "
            f"{st.pairs_skipped[r]:>7} {st.kv_recv_tokens[r]:>9} {st.kv_recv_tokens[r] / st.tokens[r]:>7.3f} "
            f"{steps:>10}"
        )
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    st = plan.stats
    per_step_max = [max(col) for col in zip(*st.kv_recv_per_step)]
    return (
        f"{plan.comm:>6}: steps {st.num_steps}, imbalance {st.imbalance:.3f}, KV recv total {sum(st.kv_recv_tokens)} "
        f"tokens, max/rank {max(st.kv_recv_tokens)} "
        f"({max(r / t for r, t in zip(st.kv_recv_tokens, st.tokens)):.3f}x local), "
        f"critical path {sum(per_step_max)} tokens"
    )


def window_line(windowed: Plan, full: Plan) -> str:
    """What a sliding window keeps of full attention: the busiest rank's work and KV received, and the totals."""
    w, f = windowed.stats, full.stats
    return (
        f"window {w.window}: busiest rank work {max(w.work)} of {max(f.work)} ({max(w.work) / max(f.work):.3f}), "
        f"KV recv max/rank {max(w.kv_recv_tokens)} of {max(f.kv_recv_tokens)} tokens, total work "
        f"{w.total_work / f.total_work:.3f}, total KV recv {sum(w.kv_recv_tokens)} of {sum(f.kv_recv_tokens)}, "
        f"steps {w.num_steps} of {f.num_steps}"
    )


def cp_rank_table(st: CPStats) -> str:
    """Per CP rank: ring/Ulysses rank, tokens, all-to-all and ring KV MiB received, forward and backward."""
    lines = [
        f"{'cp rank':>7} {'ring':>4} {'uly':>3} {'tokens':>8} {'a2a fwd MiB':>11} {'ring fwd MiB':>12} "
        f"{'a2a bwd MiB':>11} {'ring bwd MiB':>12} {'total MiB':>9} {'inter-node':>10}"
    ]
    for c in range(st.cp_size):
        r, u = divmod(c, st.ulysses_size)
        lines.append(
            f"{c:>7} {r:>4} {u:>3} {st.tokens[c]:>8} {st.a2a_fwd_bytes[c] / MIB:>11.2f} "
            f"{st.ring_fwd_bytes[c] / MIB:>12.2f} {st.a2a_bwd_bytes[c] / MIB:>11.2f} "
            f"{st.ring_bwd_bytes[c] / MIB:>12.2f} {st.total_bytes[c] / MIB:>9.2f} "
            f"{st.inter_total_bytes[c] / MIB:>10.2f}"
        )
    return "\n".join(lines)


def factorisations(
    cu_seqlens,
    cp: int,
    sample_len: int,
    strategy: str,
    chunks_per_rank,
    comm: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    itemsize: int,
    node_size: int | None = None,
) -> list[tuple[int, int, CPStats | str]]:
    """``(U, R, CPStats or why invalid)`` for every ``U`` dividing ``cp`` (``U = 1``: ring only)."""
    rows = []
    for u in (d for d in range(1, cp + 1) if cp % d == 0):
        try:
            layout = DocLayout.from_cu_seqlens(
                cu_seqlens,
                cp,
                sample_len=sample_len,
                strategy=strategy,
                chunks_per_rank=chunks_per_rank,
                ulysses_size=u,
            )
            rows.append((u, cp // u, layout.cp_stats(heads, kv_heads, head_dim, itemsize, comm, node_size)))
        except ValueError as exc:
            rows.append((u, cp // u, str(exc)))
    return rows


def factorisation_table(rows) -> str:
    """Ring-only beside every ``U x R``: per-rank maxima of tokens and bytes, work imbalance, ring steps."""
    lines = [
        f"{'U x R':>7} {'tokens':>8} {'ring tok':>8} {'imbalance':>9} {'a2a fwd MiB':>11} {'ring fwd MiB':>12} "
        f"{'fwd MiB':>8} {'fwd+bwd MiB':>11} {'inter fwd':>9} {'inter f+b':>9} {'steps':>5}  (MiB: max per rank)"
    ]
    for u, r, st in rows:
        name = f"{u}x{r}"
        if isinstance(st, str):
            lines.append(f"{name:>7} not valid: {st}")
            continue
        lines.append(
            f"{name:>7} {max(st.tokens):>8} {max(st.ring.tokens):>8} {st.imbalance:>9.3f} "
            f"{max(st.a2a_fwd_bytes) / MIB:>11.1f} {max(st.ring_fwd_bytes) / MIB:>12.1f} "
            f"{max(st.fwd_bytes) / MIB:>8.1f} {max(st.total_bytes) / MIB:>11.1f} "
            f"{max(st.inter_fwd_bytes) / MIB:>9.1f} {max(st.inter_total_bytes) / MIB:>9.1f} {st.num_steps:>5}"
        )
    return "\n".join(lines)


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


def load_profile(name_or_path: str) -> HardwareProfile:
    """A preset name (see :data:`ringattn.cost.PRESETS`) or a profile JSON path."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    return HardwareProfile.load(name_or_path)


def compare_table(
    cu_seqlens,
    cp: int,
    sample_len: int,
    model: CostModel,
    comm: str = DEFAULT_COMM,
    strategies=("zigzag", "balanced", "auto"),
) -> str:
    """The layout strategies side by side under ``model`` (one row each)."""
    lines = [
        f"{'strategy':<22} {'imbal':>6} {'KV recv max':>11} {'x local':>7} {'KV recv mean':>12} {'steps':>5} "
        f"{'compute ms':>10} {'comm ms':>8} {'step ms':>8} {'efficiency':>10}"
    ]
    for strategy in strategies:
        layout = DocLayout.from_cu_seqlens(
            cu_seqlens, cp, sample_len=sample_len, strategy=strategy, cost=model if strategy == "auto" else None
        )
        st = build_plan(layout, comm).stats
        pred = model.predict(layout, comm)
        b = pred.busiest
        label = f"auto: {layout.auto_choice}" if strategy == "auto" else strategy
        lines.append(
            f"{label:<22} {st.imbalance:>6.3f} {max(st.kv_recv_tokens):>11} "
            f"{max(r / t for r, t in zip(st.kv_recv_tokens, st.tokens)):>7.3f} {sum(st.kv_recv_tokens) / cp:>12.0f} "
            f"{st.num_steps:>5} {pred.compute_s[b] * 1e3:>10.3f} {pred.comm_s[b] * 1e3:>8.3f} "
            f"{pred.step_s * 1e3:>8.3f} "
            f"{pred.efficiency:>10.3f}"
        )
    return "\n".join(lines)


def compare_factorisations(
    cu_seqlens,
    cp: int,
    sample_len: int,
    model: CostModel,
    comm: str = DEFAULT_COMM,
    strategies=("zigzag", "balanced", "auto"),
) -> list[tuple]:
    """``(U, R, strategy, layout, Prediction)`` for every ``U`` dividing ``cp`` and every strategy,
    or ``(U, R, strategy or None, None, why not valid)`` (``None``: no strategy can run that ``U``,
    e.g. heads the split cannot scatter). auto minimises ``model`` for each split."""
    rows = []
    for u in (d for d in range(1, cp + 1) if cp % d == 0):
        try:
            model.ring_model(u, cp)
        except ValueError as exc:
            rows.append((u, cp // u, None, None, str(exc)))
            continue
        for strategy in strategies:
            try:
                layout = DocLayout.from_cu_seqlens(
                    cu_seqlens,
                    cp,
                    sample_len=sample_len,
                    strategy=strategy,
                    ulysses_size=u,
                    cost=model if strategy == "auto" else None,
                )
            except ValueError as exc:
                rows.append((u, cp // u, strategy, None, str(exc)))
                continue
            rows.append((u, cp // u, strategy, layout, model.predict(layout, comm)))
    return rows


def factorisation_compare_table(rows) -> str:
    """:func:`compare_factorisations` as a table (MiB: max per rank, forward + backward; times: the
    busiest rank's), then the best split and the best pure ring."""
    lines = [
        f"{'U x R':>7} {'strategy':<22} {'imbal':>6} {'a2a MiB':>8} {'ring MiB':>8} {'steps':>5} "
        f"{'compute ms':>10} {'ring ms':>8} {'a2a ms':>7} {'step ms':>8} {'efficiency':>10}"
    ]
    valid = []
    for u, r, strategy, layout, pred in rows:
        name = f"{u}x{r}"
        if layout is None:
            lines.append(f"{name:>7} {strategy or 'all':<22} not valid: {pred}")
            continue
        valid.append((pred.step_s, u, strategy, layout, pred))
        label = f"auto: {layout.auto_choice}" if strategy == "auto" else strategy
        b = pred.busiest
        lines.append(
            f"{name:>7} {label:<22} {layout.stats(pred.comm).imbalance:>6.3f} {max(pred.a2a_bytes) / MIB:>8.1f} "
            f"{max(pred.bytes_in) / MIB:>8.1f} {pred.steps:>5} {pred.compute_s[b] * 1e3:>10.3f} "
            f"{pred.comm_s[b] * 1e3:>8.3f} {pred.a2a_s[b] * 1e3:>7.3f} {pred.step_s * 1e3:>8.3f} "
            f"{pred.efficiency:>10.3f}"
        )
    if valid:

        def name(v):
            layout = v[3]
            return (
                f"{v[1]}x{layout.ring_size} {v[2]}"
                + (f" ({layout.auto_choice})" if v[2] == "auto" else "")
                + f": {v[0] * 1e3:.3f} ms, efficiency {v[4].efficiency:.3f}"
            )

        best = min(valid, key=lambda v: (v[0], v[1]))
        ring = [v for v in valid if v[1] == 1]
        lines.append(
            f"best split: {name(best)}" + (f"; best pure ring: {name(min(ring, key=lambda v: v[0]))}" if ring else "")
        )
    return "\n".join(lines)


def save_png(plans, path: str, title: str) -> None:
    """One row per ``(label, Plan)`` of ``plans`` (or a single Plan): the rank x rank work and KV-traffic matrices
    and, per rank, its work and KV received beside the mean, with the imbalance. All rows share one colour
    scale and one axis per quantity, so layouts compare by eye (a balanced layout looks as flat as it is)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        raise SystemExit(
            "--png needs matplotlib: pip install matplotlib (or ringattn's plot extra: pip install '.[plot]' "
            "from a clone)"
        ) from exc
    if isinstance(plans, Plan):
        plans = [("", plans)]
    works = [work_matrix(p) for _, p in plans]
    traffic = [traffic_matrix(p) for _, p in plans]
    w_max = max(max(map(max, m)) for m in works) or 1
    t_max = max(max(map(max, m)) for m in traffic) or 1
    r_max = max(max(p.stats.work) for _, p in plans) or 1
    k_max = max(max(p.stats.kv_recv_tokens) for _, p in plans) or 1
    fig, axes = plt.subplots(len(plans), 4, figsize=(18, 4.2 * len(plans)), squeeze=False)
    for row, ((label, plan), wm, tm) in enumerate(zip(plans, works, traffic)):
        st = plan.stats
        ranks = range(st.cp_size)
        ax = axes[row]
        im = ax[0].imshow(wm, cmap="viridis", vmin=0, vmax=w_max)
        ax[0].set(title=f"{label}work (score entries)".strip(), xlabel="KV origin rank", ylabel="query rank")
        fig.colorbar(im, ax=ax[0], shrink=0.8)
        im = ax[1].imshow(tm, cmap="magma", vmin=0, vmax=t_max)
        ax[1].set(title="KV traffic (tokens)", xlabel="receiver rank", ylabel="sender rank")
        fig.colorbar(im, ax=ax[1], shrink=0.8)
        mean = st.total_work / st.cp_size
        ax[2].bar(ranks, st.work, color="tab:blue")
        ax[2].axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3g}")
        ax[2].set(title=f"work per rank: imbalance {st.imbalance:.3f}", xlabel="rank", ylim=(0, r_max * 1.05))
        ax[2].legend(loc="lower right")
        ax[3].bar(ranks, st.kv_recv_tokens, color="tab:red")
        ax[3].set(
            title=f"KV received: max {max(st.kv_recv_tokens)}, total {sum(st.kv_recv_tokens)} tokens",
            xlabel="rank",
            ylim=(0, k_max * 1.05),
        )
    fig.suptitle(title + "  (one colour scale and one axis per column across the rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m ringattn.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", required=True, help="standard workload name or JSON path")
    p.add_argument("--cp", type=int, required=True)
    p.add_argument("--strategy", default="zigzag", choices=STRATEGIES)
    p.add_argument("--chunks-per-rank", type=int, default=None, help="chunks of each sample per rank (balanced)")
    p.add_argument("--comm", default=DEFAULT_COMM, choices=COMM_SHAPES)
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses size U (CP = U x ring size; default 1: pure ring)")
    p.add_argument("--heads", type=int, default=32, help="query heads, for bytes (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads, for bytes (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim, for bytes (default 128)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="element type, for bytes")
    p.add_argument(
        "--node-size",
        type=int,
        default=8,
        help="CP ranks per node, for inter-node bytes (default 8; --compare uses the profile's node_size)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding window of W keys per query (default: none); the tables show what remains",
    )
    p.add_argument(
        "--png",
        help="write the rank x rank work and traffic matrices, per-rank work and KV received and "
        "the imbalance to this PNG",
    )
    p.add_argument(
        "--png-strategies",
        default=None,
        help="comma-separated strategies to draw side by side in the PNG, on one scale (default: --strategy)",
    )
    p.add_argument("--compare", action="store_true", help="strategies side by side under a cost model")
    p.add_argument(
        "--profile",
        default="h100-nvlink",
        help=f"cost model hardware (--compare): a preset ({', '.join(PRESETS)}) or a profile JSON path",
    )
    args = p.parse_args(argv)
    wl = load_workload(args.workload)
    if args.compare:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
        model = CostModel(load_profile(args.profile), args.heads, args.kv_heads, args.head_dim, dtype)
        prof = model.profile
        print(
            f"{wl['name']}: {len(wl['cu_seqlens']) - 1} docs, {wl['cu_seqlens'][-1]} tokens, CP={args.cp}, "
            f"comm={args.comm}; profile {prof.name}: {prof.flops / 1e12:g} TFLOP/s, "
            f"{prof.p2p_bandwidth / 1e9:g} GB/s P2P, "
            f"{prof.all_to_all_bandwidth / 1e9:g} GB/s all-to-all, latency {prof.latency * 1e6:g} us"
            + (f", {prof.node_size} CP ranks per node" if prof.node_size else "")
            + f"; Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}"
        )
        print(compare_table(wl["cu_seqlens"], args.cp, wl["sample_len"], model, args.comm))
        where = (
            f"{prof.node_size} CP ranks per node: all-to-alls at {prof.all_to_all_bandwidth / 1e9:g} GB/s "
            f"inside a node, {prof.p2p_bandwidth / 1e9:g} GB/s between nodes; a ring spanning nodes at "
            f"{prof.p2p_bandwidth / 1e9:g} GB/s"
            if prof.node_size
            else f"one level: all-to-alls at {prof.all_to_all_bandwidth / 1e9:g} GB/s, ring at "
            f"{prof.p2p_bandwidth / 1e9:g} GB/s"
        )
        print(f"\nevery Ulysses x ring split of CP={args.cp} (all-to-alls not overlapped; {where}):")
        print(
            factorisation_compare_table(
                compare_factorisations(wl["cu_seqlens"], args.cp, wl["sample_len"], model, args.comm)
            )
        )
        return
    layout = DocLayout.from_cu_seqlens(
        wl["cu_seqlens"],
        args.cp,
        sample_len=wl["sample_len"],
        strategy=args.strategy,
        chunks_per_rank=args.chunks_per_rank,
        ulysses_size=args.ulysses,
    )
    window = args.window
    plan = build_plan(layout, args.comm, window)
    split = f" = {args.ulysses} Ulysses x {layout.ring_size} ring" if args.ulysses > 1 else ""
    title = (
        f"{wl['name']}: {layout.num_docs} docs, {layout.total_tokens} tokens, CP={args.cp}{split}, {args.strategy}, "
        f"comm={args.comm}" + (f", window={window}" if window is not None else "")
    )
    heads = (args.heads, args.kv_heads, args.head_dim, DTYPE_BYTES[args.dtype])
    print(title)
    if args.ulysses > 1:
        print(
            f"ring plan over the {layout.ring_size} ring ranks (each Ulysses rank runs it on its share of the heads):"
        )
    print(rank_table(plan))
    for comm in COMM_SHAPES:
        print(summary_line(build_plan(layout, comm, window)))
    if window is not None:
        print(window_line(build_plan(layout, args.comm, window), build_plan(layout, args.comm)))
    print(
        f"\nbytes received per CP rank, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}, "
        f"{args.node_size} CP ranks per node (all-to-all: sent = received; backward ring: KV replay + fp32 dK/dV; "
        f"inter-node: forward + backward from other nodes):"
    )
    print(cp_rank_table(layout.cp_stats(*heads, comm=args.comm, node_size=args.node_size, window=window)))
    print(
        f"\nring only vs Ulysses x ring at CP={args.cp} ({args.strategy}, comm={args.comm}, same heads, "
        f"{args.node_size} CP ranks per node):"
    )
    print(
        factorisation_table(
            factorisations(
                wl["cu_seqlens"],
                args.cp,
                wl["sample_len"],
                args.strategy,
                args.chunks_per_rank,
                args.comm,
                *heads,
                args.node_size,
            )
        )
    )
    if args.png:
        rows = []
        for strategy in args.png_strategies.split(",") if args.png_strategies else [args.strategy]:
            other = (
                layout
                if strategy == args.strategy
                else DocLayout.from_cu_seqlens(
                    wl["cu_seqlens"],
                    args.cp,
                    sample_len=wl["sample_len"],
                    strategy=strategy,
                    chunks_per_rank=args.chunks_per_rank if strategy == "balanced" else None,
                    ulysses_size=args.ulysses,
                )
            )
            name = f"auto ({other.auto_choice})" if strategy == "auto" else strategy
            rows.append((f"{name}: ", build_plan(other, args.comm, window)))
        save_png(rows, args.png, title.replace(f", {args.strategy},", ","))
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

"""Kernel time of the busiest CP rank vs single-device varlen attention, side by side.

    python benchmarks/kernels.py [--device cuda] [--cp 4,8] [--workloads a,b] [--heads 32 --head-dim 128]
                                 [--strategy zigzag,balanced,auto] [--profile PRESET|JSON]

For each standard workload, CP size and layout strategy (several strategies are timed
interleaved, each repeat running every strategy's ranks in turn, so their rows compare side by
side; best time per rank over ``--repeat``), runs every rank's planned block
pairs (forward + backward, the executor's own step functions, random bf16 data, no
communication) on one device, and prints: the busiest rank's time, the single-device varlen
time over the whole pack divided by CP, their ratio (1.0 = perfect split), and useful TFLOP/s
(unmasked score entries only: 4*H*D flops per entry forward, 2.5x that backward). ``auto``
uses the default cost model, or ``--profile``. On CPU the workloads are rescaled
(``--sample-len``) and heads/dims default small.
"""

from __future__ import annotations

import argparse
import time

import torch

from ringattn import DocLayout, build_plan
from ringattn.comm.executor import backward_step, forward_step, plan_exec
from ringattn.cost import CostModel
from ringattn.inspect import load_profile
from ringattn.kernels import VarlenCall, get_backend
from ringattn.workloads import load_workload, rescale_cu_seqlens, workload_names


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def rank_runner(rp, heads, kv_heads, dim, dtype, device, kernel, scale):
    """A closure running all of one rank's steps forward then backward on random data."""
    g = torch.Generator(device="cpu").manual_seed(rp.rank)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    n = rp.local_tokens
    q, dout = mk(n, heads, dim), mk(n, heads, dim)
    srcs = [mk(n if i == 0 else (st.recv.tokens if st.recv else 0), 2, kv_heads, dim) for i, st in enumerate(rp.steps)]
    out = torch.empty(n, heads, dim, dtype=torch.float32, device=device)
    lse = torch.empty(n, heads, dtype=torch.float32, device=device)

    ex = plan_exec(rp)

    def run():
        for sx, src in zip(ex.steps, srcs):
            forward_step(sx, q, src, out, lse, kernel, scale)
        o = out.to(dtype)
        dq = torch.zeros(n, heads, dim, dtype=torch.float32, device=device)
        for sx, src in zip(ex.steps, srcs):
            if sx.calls:
                backward_step(
                    sx,
                    dout,
                    q,
                    src,
                    o,
                    lse,
                    dq,
                    torch.zeros(src.shape, dtype=torch.float32, device=device),
                    kernel,
                    scale,
                )

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="kernel backend (default: from the device)")
    p.add_argument("--cp", default="4,8")
    p.add_argument("--workloads", default=",".join(workload_names()))
    p.add_argument("--sample-len", type=int, default=None, help="rescale workloads (default: full on GPU, 4096 on CPU)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--comm", default="direct")
    p.add_argument("--strategy", default="zigzag", help="layout strategies, comma-separated (zigzag, balanced, auto)")
    p.add_argument(
        "--profile", default=None, help="cost model hardware for auto (preset or JSON; default model if unset)"
    )
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type != "cpu"
    heads = args.heads or (32 if gpu else 4)
    kv_heads = args.kv_heads or heads
    dim = args.head_dim or (128 if gpu else 64)
    sample_len = args.sample_len or (None if gpu else 4096)
    dtype = getattr(torch, args.dtype)
    kernel = get_backend(device.type, args.backend)
    # auto: the default model, or --profile with this run's attention shape
    cost = CostModel(load_profile(args.profile), heads, kv_heads, dim, dtype) if args.profile else None
    scale = dim**-0.5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    strategies = args.strategy.split(",")
    print(
        f"device {name}, backend {kernel.__name__.rsplit('.', 1)[-1]}, Hq={heads} Hkv={kv_heads} D={dim} "
        f"{args.dtype}, comm={args.comm}, best of {args.repeat}"
    )
    print(
        f"{'workload':<26} {'strategy':<20} {'tokens':>7} {'CP':>3} {'busiest ms':>10} {'single/CP ms':>12} "
        f"{'ratio':>6} {'imbal':>6} {'TFLOP/s busiest':>15} {'TFLOP/s single':>14}"
    )
    for wname in args.workloads.split(","):
        wl = load_workload(wname)
        cu, slen = wl["cu_seqlens"], wl["sample_len"]
        if sample_len and sample_len != slen:
            cu, slen = rescale_cu_seqlens(cu, slen, sample_len), sample_len
        total = cu[-1]
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        q, k, v, dout = mk(total, heads, dim), mk(total, kv_heads, dim), mk(total, kv_heads, dim), mk(total, heads, dim)
        whole = VarlenCall(tuple(cu), tuple(cu), True)

        def single():
            o, l = kernel.forward(q, k, v, whole, scale)
            kernel.backward(dout, q, k, v, o.to(dtype), l, whole, scale)

        t_single = timed(single, device, args.repeat)
        work_total = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))
        flops = lambda work: 3.5 * 4 * work * heads * dim  # noqa: E731
        for cp in (int(x) for x in args.cp.split(",")):
            layouts = {
                st: DocLayout.from_cu_seqlens(cu, cp, sample_len=slen, strategy=st, cost=cost) for st in strategies
            }
            plans = {st: build_plan(layouts[st], args.comm) for st in strategies}
            runners = {
                st: [rank_runner(rp, heads, kv_heads, dim, dtype, device, kernel, scale) for rp in plans[st].ranks]
                for st in strategies
            }
            # interleaved: every repeat times every strategy's ranks, so load drift hits them alike
            times = {st: [float("inf")] * cp for st in strategies}
            for _ in range(args.repeat):
                for st in strategies:
                    for r, run in enumerate(runners[st]):
                        times[st][r] = min(times[st][r], timed(run, device, 1))
            for st in strategies:
                plan = plans[st]
                busiest = max(range(cp), key=lambda r: times[st][r])
                t_busy = times[st][busiest]
                label = f"auto: {layouts[st].auto_choice}" if st == "auto" else st
                print(
                    f"{wl['name']:<26} {label:<20} {total:>7} {cp:>3} {t_busy * 1e3:>10.2f} "
                    f"{t_single / cp * 1e3:>12.2f} {t_busy / (t_single / cp):>6.2f} {plan.stats.imbalance:>6.2f} "
                    f"{flops(plan.stats.work[busiest]) / t_busy / 1e12:>15.3f} "
                    f"{flops(work_total) / t_single / 1e12:>14.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

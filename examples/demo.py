"""Multi-rank demo: EoD-packed batch -> ring attention forward + backward, checked.

    torchrun --standalone --nproc-per-node 4 examples/demo.py [--workload NAME|PATH] [--comm ring] [--ulysses 2]

Builds a seeded packed batch of EoD-separated documents (or a standard workload, rescaled
to ``--sample-len``), shards it with the ``--strategy`` layout (zigzag by default; balanced or
auto), runs ``ring_eod_attention`` forward and backward on CPU with gloo, compares every rank's
output and gradients with a float64 single-device reference computed per document with plain
torch, and prints a per-rank table of tokens, work, skipped block pairs and KV traffic. Exits
non-zero on a mismatch. ``--ulysses U`` runs hybrid context parallelism: CP = U Ulysses x CP/U
ring ranks (4 ranks, ``--ulysses 2``: 2 x 2), with groups from ``ringattn.new_cp_groups``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn import DocLayout, eod_metadata
from ringattn.cost import CostModel
from ringattn.inspect import load_profile
from ringattn.layout import STRATEGIES
from ringattn.plan import build_plan
from ringattn.workloads import load_workload, rescale_cu_seqlens

EOD = 0


def packed_tokens(cu_seqlens, sample_len: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random tokens ``[b, s]`` whose documents (given by ``cu_seqlens``) end with the EoD id."""
    total = cu_seqlens[-1]
    tokens = torch.randint(1, vocab, (total,), generator=gen)
    ends = torch.tensor(cu_seqlens[1:]) - 1
    tokens[ends] = EOD
    return tokens.view(total // sample_len, sample_len)


def random_doc_lengths(sample_len: int, samples: int, gen: torch.Generator) -> list[int]:
    cu = [0]
    for b in range(samples):
        end = (b + 1) * sample_len
        while cu[-1] < end:
            n = int(torch.randint(1, sample_len // 3, (1,), generator=gen))
            cu.append(min(end, cu[-1] + n))
    return cu


def reference(q, k, v, dout, cu_seqlens, scale):
    """float64 per-document causal attention with torch SDPA (math), out and grads."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    outs = []
    for a, b in zip(cu_seqlens, cu_seqlens[1:]):
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))
    out = torch.cat(outs)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", help="standard workload name or JSON path (default: a seeded random batch)")
    p.add_argument("--sample-len", type=int, default=1024, help="tokens per sample (workloads are rescaled)")
    p.add_argument("--samples", type=int, default=2, help="samples per micro-batch for the random batch")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--comm", default=None, choices=["plain", "ring", "direct"])
    p.add_argument("--strategy", default="zigzag", choices=list(STRATEGIES))
    p.add_argument(
        "--profile",
        default=None,
        help="with --strategy auto: cost model hardware (preset or profile JSON; default model if unset)",
    )
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses size U: CP = U x ring (default 1: pure ring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed forward+backward runs before the timed one")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)

    if args.workload:
        wl = load_workload(args.workload)
        cu = rescale_cu_seqlens(wl["cu_seqlens"], wl["sample_len"], args.sample_len)
        title = f"workload {wl['name']} rescaled to sample_len={args.sample_len}"
    else:
        cu = random_doc_lengths(args.sample_len, args.samples, gen)
        title = f"seeded random batch ({args.samples} x {args.sample_len} tokens)"
    tokens = packed_tokens(cu, args.sample_len, 32000, gen)
    meta = eod_metadata(tokens, EOD)  # documents and reset position ids, as Megatron defines them
    cost = (
        CostModel(load_profile(args.profile), args.heads, args.kv_heads, args.head_dim, args.dtype)
        if args.profile
        else None
    )
    layout = DocLayout.from_tokens(tokens, EOD, cp, strategy=args.strategy, ulysses_size=args.ulysses, cost=cost)
    groups = ringattn.new_cp_groups(args.ulysses) if args.ulysses > 1 else None  # collective, every rank
    assert list(layout.cu_seqlens) == meta.cu_seqlens.tolist()

    dtype = getattr(torch, args.dtype)
    total = layout.total_tokens
    q = torch.randn(total, args.heads, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(total, args.kv_heads, args.head_dim, generator=gen).to(dtype)
    v = torch.randn(total, args.kv_heads, args.head_dim, generator=gen).to(dtype)
    dout = torch.randn(total, args.heads, args.head_dim, generator=gen).to(dtype)

    idx = layout.local_indices(rank)
    assert torch.equal(layout.position_ids(rank), meta.position_ids.reshape(-1)[idx])
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
    attn = ringattn.RingEoDAttention(comm=args.comm, group=groups)
    for _ in range(args.warmup):  # first P2P between a pair of ranks sets up its connection
        attn(ql, kl, vl, layout).backward(dout[idx])
    ql.grad = kl.grad = vl.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    out = attn(ql, kl, vl, layout)
    t1 = time.perf_counter()
    out.backward(dout[idx])
    t2 = time.perf_counter()

    scale = args.head_dim**-0.5
    ref = reference(q, k, v, dout, list(layout.cu_seqlens), scale)
    errs = torch.tensor(
        [(x.double() - r[idx]).abs().max().item() for x, r in zip((out, ql.grad, kl.grad, vl.grad), ref)]
    )
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    times = torch.tensor([t1 - t0, t2 - t1])
    all_times = [torch.zeros(2) for _ in range(cp)]
    dist.all_gather(all_times, times)

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ok = bool((errs <= tol).all())
    if rank == 0 and args.ulysses > 1:
        comm = args.comm or ringattn.attention.DEFAULT_COMM
        cs = layout.cp_stats(args.heads, args.kv_heads, args.head_dim, q.element_size(), comm)
        print(
            f"ringattn demo: {title}, {layout.num_docs} documents, CP={cp} = {args.ulysses} Ulysses x "
            f"{layout.ring_size} ring, {args.strategy}, comm={comm}, Hq={args.heads} Hkv={args.kv_heads} "
            f"D={args.head_dim} {args.dtype}"
        )
        print(
            f"{'rank':>4} {'ring':>4} {'uly':>3} {'tokens':>7} {'a2a KiB':>9} {'ring KV KiB':>11} {'fwd ms':>7} "
            f"{'bwd ms':>7}   (KiB received, forward)"
        )
        for r in range(cp):
            rr, uu = layout.split(r)
            print(
                f"{r:>4} {rr:>4} {uu:>3} {cs.tokens[r]:>7} {cs.a2a_fwd_bytes[r] / 1024:>9.1f} "
                f"{cs.ring_fwd_bytes[r] / 1024:>11.1f} {all_times[r][0] * 1e3:>7.1f} {all_times[r][1] * 1e3:>7.1f}"
            )
        print(
            f"ring work imbalance (max/mean) {cs.imbalance:.3f}; ring exchange steps {cs.num_steps}; "
            "one all-to-all in and one out, forward and backward"
        )
    elif rank == 0:
        comm = args.comm or ringattn.attention.DEFAULT_COMM
        st = build_plan(layout, comm).stats
        kv_row = 2 * args.kv_heads * args.head_dim * q.element_size()
        strategy = f"auto ({layout.auto_choice})" if args.strategy == "auto" else args.strategy
        print(
            f"ringattn demo: {title}, {layout.num_docs} documents, CP={cp}, {strategy}, comm={comm}, "
            f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}"
        )
        print(
            f"{'rank':>4} {'tokens':>7} {'work':>10} {'work/mean':>9} {'pairs':>6} {'skipped':>7} "
            f"{'KV recv tok':>11} {'KV recv KiB':>11} {'steps':>5} {'fwd ms':>7} {'bwd ms':>7}"
        )
        mean = st.total_work / cp
        for r in range(cp):
            steps = sum(1 for n in st.kv_recv_per_step[r] if n)
            print(
                f"{r:>4} {st.tokens[r]:>7} {st.work[r]:>10} {st.work[r] / mean:>9.3f} {st.pairs_computed[r]:>6} "
                f"{st.pairs_skipped[r]:>7} {st.kv_recv_tokens[r]:>11} {st.kv_recv_tokens[r] * kv_row / 1024:>11.1f} "
                f"{steps:>5} {all_times[r][0] * 1e3:>7.1f} {all_times[r][1] * 1e3:>7.1f}"
            )
        print(f"work imbalance (max/mean) {st.imbalance:.3f}; exchange steps {st.num_steps}")
    if rank == 0:
        print(
            "max abs error vs float64 reference: "
            + ", ".join(f"{n} {e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errs.tolist()))
            + f" (tolerance {tol:g})"
        )
        print("OK" if ok else "MISMATCH")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

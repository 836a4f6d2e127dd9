"""Ulysses x ring (hybrid) context parallelism against the float64 dense reference.

Every (U, R) of the acceptance set runs in one job on the long-lived rank pool of its CP size:
MHA, GQA with Hkv >= U (KV heads split) and Hkv < U (KV heads replicated), MQA, zigzag and
balanced layouts, micro-batches of 2 samples, fp32 (1e-5) and bf16 (test_attention.check_case),
the CPU backend and one case on the NPU backend's emulation.
"""

from __future__ import annotations

import random

import pytest
import torch

import ringattn
from ringattn import DocLayout

from .cases import Case, assemble, cp_groups, global_tensors, random_cu_seqlens, run_cases
from .dist import unwrap
from .test_attention import check_case

FACTORISATIONS = [(2, 1), (4, 1), (1, 4), (2, 2), (2, 3), (3, 2)]


def heads_for(u: int) -> dict[str, tuple[int, int]]:
    """(Hq, Hkv) per attention kind for Ulysses size ``u`` (Hq % u == 0 always)."""
    kinds = {"MHA": (u, u) if u > 1 else (2, 2), "GQA Hkv>=U": (2 * u, u) if u > 1 else (4, 2), "MQA": (2 * u, 1)}
    if u >= 4:  # Hkv < U with more than one KV head: each KV head replicated U / Hkv times
        kinds["GQA Hkv<U"] = (2 * u, u // 2)
    return kinds


def hybrid_cases(u: int, r: int) -> list[Case]:
    rng = random.Random(100 * u + r)
    s = 8 * u * r  # divisible by 2R (zigzag) and 4R (balanced); each ring rank's 2 samples split into U parts
    kinds = heads_for(u)
    cases = []
    for i, (kind, (hq, hkv)) in enumerate(kinds.items()):
        strategy = ("zigzag", "balanced")[i % 2]
        cases.append(
            Case(
                f"hybrid {u}x{r} {kind} fp32 {strategy} 2 samples",
                random_cu_seqlens(rng, s, num_samples=2, p_single=0.2, max_doc=s),
                s,
                hq=hq,
                hkv=hkv,
                d=32,
                seed=10 * i + u + r,
                comm=("direct", "ring")[i % 2],
                strategy=strategy,
                chunks_per_rank=4 if strategy == "balanced" else None,
                ulysses=u,
            )
        )
    hq, hkv = kinds["GQA Hkv>=U"]
    cases.append(
        Case(
            f"hybrid {u}x{r} GQA bf16 zigzag 2 samples",
            random_cu_seqlens(rng, s, 2, max_doc=s // 2),
            s,
            hq=hq,
            hkv=hkv,
            d=32,
            dtype="bfloat16",
            seed=7 + u,
            ulysses=u,
        )
    )
    hq, hkv = kinds["GQA Hkv<U"] if u >= 4 else kinds["MQA"]
    cases.append(
        Case(
            f"hybrid {u}x{r} replicated KV bf16 balanced",
            random_cu_seqlens(rng, s, 2, max_doc=s // 2),
            s,
            hq=hq,
            hkv=hkv,
            d=32,
            dtype="bfloat16",
            seed=8 + u,
            strategy="balanced",
            chunks_per_rank=2,
            ulysses=u,
        )
    )
    # the NPU backend (on the emulation of the documented torch_npu contract) on the gathered heads
    cases.append(
        Case(
            f"hybrid {u}x{r} replicated KV fp32 npu",
            random_cu_seqlens(rng, s, 2, max_doc=s),
            s,
            hq=hq,
            hkv=hkv,
            d=32,
            seed=9 + u,
            backend="npu",
            ulysses=u,
        )
    )
    return cases


@pytest.mark.parametrize("u, r", FACTORISATIONS, ids=[f"ulysses{u}x{r}" for u, r in FACTORISATIONS])
def test_hybrid_matches_dense_reference(u, r, rank_pools):
    cases = hybrid_cases(u, r)
    per_rank = unwrap(rank_pools(u * r).run(run_cases, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([res[i] for res in per_rank], case.cu_seqlens[-1]))


def _traffic_worker(rank, cp, payload):
    """Run one case while counting every all-to-all and P2P message; return the counts and bytes."""
    import torch.distributed as dist

    case, u = payload
    moved = {"a2a": 0, "a2a_bytes": 0, "p2p": 0, "p2p_bytes": 0}
    real_a2a, real_p2p = dist.all_to_all_single, dist.batch_isend_irecv

    def a2a(out, inp, *args, group=None, **kw):
        size = dist.get_world_size(group)
        moved["a2a"] += 1
        moved["a2a_bytes"] += inp.numel() * inp.element_size() * (size - 1) // size  # own chunk stays local
        return real_a2a(out, inp, *args, group=group, **kw)

    def p2p(ops):
        for op in ops:
            if op.op.__name__ == "irecv":
                moved["p2p"] += 1
                moved["p2p_bytes"] += op.tensor.numel() * op.tensor.element_size()
        return real_p2p(ops)

    layout = DocLayout.from_cu_seqlens(case.cu_seqlens, cp, sample_len=case.sample_len, ulysses_size=u)
    groups = cp_groups(u)
    idx = layout.local_indices(rank)
    q, k, v, dout = global_tensors(case)
    q, k, v = (x[idx].clone().requires_grad_() for x in (q, k, v))
    attn = ringattn.RingEoDAttention(group=groups, comm=case.comm)
    assert f"ulysses_size={u}" in repr(attn)
    attn(q, k, v, layout)  # agreement done outside the count
    dist.all_to_all_single, dist.batch_isend_irecv = a2a, p2p
    try:
        out = attn(q, k, v, layout)
        fwd = dict(moved)
        out.backward(dout[idx])
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real_a2a, real_p2p
    return fwd, moved


@pytest.mark.parametrize("u, hkv", [(4, 1), (2, 2)])
def test_hybrid_bytes_match_the_accounting(u, hkv, rank_pools):
    """CPStats counts exactly the bytes the all-to-alls and the ring move (fp32, forward and backward)."""
    s = 64
    case = Case("traffic", (0, 5, 30, 31, 50, 64, 70, 128), s, hq=4, hkv=hkv, d=16, comm="direct")
    cp = 4
    results = unwrap(rank_pools(cp).run(_traffic_worker, (case, u)))
    layout = DocLayout.from_cu_seqlens(case.cu_seqlens, cp, sample_len=s, ulysses_size=u)
    st = layout.cp_stats(case.hq, case.hkv, case.d, itemsize=4, comm="direct")
    for c, (fwd, total) in enumerate(results):
        assert fwd["a2a"] == 2 and total["a2a"] == 4, "one all-to-all each way for q/k/v and for the output"
        assert fwd["a2a_bytes"] == st.a2a_fwd_bytes[c]
        assert total["a2a_bytes"] - fwd["a2a_bytes"] == st.a2a_bwd_bytes[c]
        assert fwd["p2p_bytes"] == st.ring_fwd_bytes[c]
        assert total["p2p_bytes"] - fwd["p2p_bytes"] == st.ring_bwd_bytes[c]
    if u == cp:
        assert all(total["p2p"] == 0 for _, total in results), "pure Ulysses: no P2P at all"
    else:
        assert sum(total["p2p"] for _, total in results) > 0


def _staged_hybrid_worker(rank, cp, cases):
    """Force host staging (what a gloo group over GPU/NPU tensors takes) for the all-to-alls and P2P."""
    import ringattn.comm.p2p as p2p

    real = p2p.host_staging
    p2p.host_staging = lambda group, device: True
    try:
        return run_cases(rank, cp, cases)
    finally:
        p2p.host_staging = real


def test_hybrid_host_staging_path_is_exact(rank_pools):
    cases = [c for c in hybrid_cases(2, 2) if c.backend is None][:2]
    per_rank = unwrap(rank_pools(4).run(_staged_hybrid_worker, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([res[i] for res in per_rank], case.cu_seqlens[-1]))


def test_hybrid_layout_shards_every_cp_rank():
    """local_indices / position_ids per CP rank: the ring rank's tokens in U contiguous parts."""
    cu = (0, 3, 17, 40, 41, 48, 96)
    for strategy in ("zigzag", "balanced"):
        ring = DocLayout.from_cu_seqlens(cu, 3, sample_len=48, strategy=strategy, chunks_per_rank=2)
        hybrid = DocLayout.from_cu_seqlens(cu, 6, sample_len=48, strategy=strategy, chunks_per_rank=2, ulysses_size=2)
        assert hybrid.ring_layout == ring and hybrid.ring_size == 3 and hybrid.pieces == ring.pieces
        assert hybrid.fingerprint != ring.fingerprint
        assert "ulysses_size=2, ring_size=3" in repr(hybrid)
        for rr in range(3):
            parts = [hybrid.local_indices(rr * 2 + uu) for uu in range(2)]
            assert torch.equal(torch.cat(parts), ring.local_indices(rr))
            assert parts[0].numel() == parts[1].numel() == hybrid.local_tokens(rr * 2)
            for uu in range(2):
                assert torch.equal(
                    hybrid.position_ids(rr * 2 + uu), ring.position_ids(rr)[parts[0].numel() * uu :][: parts[0].numel()]
                )
        assert hybrid.stats() == ring.stats()
    pure = DocLayout.from_cu_seqlens(cu, 4, sample_len=48, ulysses_size=4)
    assert pure.ring_size == 1 and pure.ring_layout.cp_size == 1 and pure.stats().num_steps == 0


def _hybrid_bad_inputs_worker(rank, cp, _):
    """Every rank gets the same bad input (or ranks disagree); each must raise ValueError, posting nothing."""
    import torch.distributed as dist

    posted = []
    real_a2a, real_p2p = dist.all_to_all_single, dist.batch_isend_irecv
    dist.all_to_all_single = lambda *a, **kw: posted.append("a2a") or real_a2a(*a, **kw)
    dist.batch_isend_irecv = lambda ops: posted.extend(ops) or real_p2p(ops)
    g2, g4 = cp_groups(2), cp_groups(4)
    cu = (0, 5, 20, 32)
    plain = DocLayout.from_cu_seqlens(cu, cp)
    hyb = DocLayout.from_cu_seqlens(cu, cp, ulysses_size=2)

    def qkv(layout, hq=4, hkv=2):
        n = layout.local_tokens(rank)
        return torch.randn(n, hq, 8), torch.randn(n, hkv, 8), torch.randn(n, hkv, 8)

    swapped = {}

    def swapped_groups():  # Ulysses and ring roles exchanged: refused, not silently mis-sharded
        rows = [dist.new_group(r) for r in ([0, 1], [2, 3])]
        cols = [dist.new_group(c) for c in ([0, 2], [1, 3])]
        swapped["g"] = ringattn.CPGroups.from_groups(dist.group.WORLD, cols[rank % 2], rows[rank // 2])

    calls = {
        "groups: size not divisible": lambda: ringattn.new_cp_groups(3),
        "groups: sizes differ between ranks": lambda: ringattn.new_cp_groups(2 if rank else 4),
        "groups: bad size": lambda: ringattn.new_cp_groups(0),
        "groups: wrong order": swapped_groups,
        "layout: ulysses not dividing cp": lambda: DocLayout.from_cu_seqlens(cu, cp, ulysses_size=3),
        "layout: ring tokens not divisible": lambda: DocLayout.from_cu_seqlens((0, 6), cp, ulysses_size=4),
        "layout: sample_len vs ring": lambda: DocLayout.from_cu_seqlens((0, 6), cp, ulysses_size=2),
        "attn: hybrid layout, plain group": lambda: ringattn.ring_eod_attention(*qkv(hyb), hyb),
        "attn: groups vs layout": lambda: ringattn.ring_eod_attention(*qkv(plain), plain, g2),
        "attn: layout ulysses 2, groups 4": lambda: ringattn.ring_eod_attention(*qkv(hyb), hyb, g4),
        "attn: q heads % U": lambda: ringattn.ring_eod_attention(*qkv(hyb, 3, 1), hyb, g2),
        "attn: kv heads vs U": lambda: ringattn.ring_eod_attention(*qkv(hyb, 6, 3), hyb, g2),
        "attn: ranks disagree on the split": lambda: (
            ringattn.ring_eod_attention(*qkv(plain), plain)
            if rank == 0
            else ringattn.ring_eod_attention(*qkv(hyb), hyb, g2)
        ),
    }
    messages = {}
    try:
        for name, call in calls.items():
            try:
                call()
                messages[name] = None
            except ValueError as exc:
                messages[name] = str(exc)
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real_a2a, real_p2p
    return messages, len(posted)


HYBRID_BAD_INPUTS = {
    "groups: size not divisible": "new_cp_groups: ulysses_size=3 does not divide the CP group size 4",
    "groups: sizes differ between ranks": "new_cp_groups: ranks passed different ulysses_size values [2, 4]",
    "groups: bad size": "new_cp_groups: ulysses_size: expected a positive int, got 0",
    "groups: wrong order": "groups: CP rank 0 (global rank 0) has Ulysses group [0, 2] and ring group [0, 1]; "
    "expected [0, 1] and [0, 2]",
    "layout: ulysses not dividing cp": "ulysses_size: expected a divisor of cp_size=4, got 3",
    "layout: ring tokens not divisible": "ulysses_size: each ring rank's 6 tokens (total 6 / ring_size 1) must split "
    "into ulysses_size=4 equal parts",
    "layout: sample_len vs ring": "sample_len: expected a multiple of 2*ring_size=4, got 6",
    "attn: hybrid layout, plain group": "group: layout.ulysses_size=2 needs the Ulysses and ring groups",
    "attn: groups vs layout": "group: the groups split CP as ulysses_size=2 x ring_size=2, but the layout has "
    "ulysses_size=1",
    "attn: layout ulysses 2, groups 4": "group: the groups split CP as ulysses_size=4 x ring_size=1, but the layout "
    "has ulysses_size=2",
    "attn: q heads % U": "heads: q heads (3) must be a multiple of ulysses_size=2",
    "attn: kv heads vs U": "heads: k/v heads (3) must be a multiple or a divisor of ulysses_size=2",
    "attn: ranks disagree on the split": "ranks disagree",
}


def test_hybrid_bad_inputs_raise_the_same_error_on_every_rank(rank_pools):
    results = unwrap(rank_pools(4).run(_hybrid_bad_inputs_worker))
    for rank, (messages, posted) in enumerate(results):
        assert posted == 0, f"rank {rank} communicated before rejecting"
        for name, expect in HYBRID_BAD_INPUTS.items():
            assert messages[name] is not None and expect in messages[name], (rank, name, messages[name])
    for name in HYBRID_BAD_INPUTS:
        assert len({messages[name] for messages, _ in results}) == 1, f"{name}: ranks raised different errors"


def _a2a_fault_worker(rank, cp, u):
    """The last rank dies while posting its second all-to-all (the forward output's); the others must not hang."""
    import os
    import time

    import torch.distributed as dist

    layout = DocLayout.from_cu_seqlens((0, 3, 20, 45, 64), cp, ulysses_size=u)
    groups = ringattn.new_cp_groups(u)
    n = layout.local_tokens(rank)
    q, k, v = (torch.randn(n, 4, 16, requires_grad=True) for _ in range(3))
    ringattn.ring_eod_attention(q, k, v, layout, groups)  # connections up, agreement done
    if rank == cp - 1:
        real, count = dist.all_to_all_single, [0]

        def dying(*args, **kw):
            count[0] += 1
            if count[0] == 2:
                os._exit(3)
            return real(*args, **kw)

        dist.all_to_all_single = dying
    t0 = time.perf_counter()
    try:
        for _ in range(3):
            ringattn.ring_eod_attention(q, k, v, layout, groups).sum().backward()
    except RuntimeError as exc:
        return "raised", str(exc), time.perf_counter() - t0
    return "returned", "", time.perf_counter() - t0


def test_hybrid_peer_dying_in_an_all_to_all_raises_naming_the_phase():
    """Pure Ulysses on 2 ranks (the cheapest group with an all-to-all): the survivor names the phase."""
    from .dist import run_ranks

    u, cp = 2, 2
    timeout = 5
    results = run_ranks(cp, _a2a_fault_worker, u, timeout_s=timeout, tolerate_exit=True, kill_after_s=60)
    assert results[cp - 1] == ("dead", 3)
    for r in range(cp - 1):
        status, res = results[r]
        assert status == "ok", res
        outcome, msg, took = res
        assert outcome == "raised", f"rank {r} returned although rank {cp - 1} died"
        assert took < timeout + 10
        assert "forward all-to-all of the output with Ulysses peer rank(s) [0, 1] failed" in msg, msg


def test_hybrid_accounting_invariants():
    """Ring-only CPStats agree with PlanStats; inter-node bytes are 0 on one node and everything on 1-rank nodes."""
    from ringattn.plan import PlanStats

    cu = (0, 100, 700, 1500, 2048, 2300, 4096)
    ring = DocLayout.from_cu_seqlens(cu, 8, sample_len=2048)
    st = ring.cp_stats(32, 8, 128, 2, node_size=8)
    ps = ring.stats()
    for c in range(8):
        assert st.ring_fwd_bytes[c] == ps.kv_recv_tokens[c] * PlanStats.kv_bytes_per_token(8, 128, 2)
        assert st.a2a_fwd_bytes[c] == st.a2a_bwd_bytes[c] == st.inter_fwd_bytes[c] == 0
    for u in (1, 2, 4, 8):
        lay = DocLayout.from_cu_seqlens(cu, 8, sample_len=2048, ulysses_size=u)
        one_node, lonely = (lay.cp_stats(32, 2, 64, 2, node_size=n) for n in (8, 1))
        assert one_node.inter_total_bytes == (0,) * 8
        assert lonely.inter_total_bytes == lonely.total_bytes
        assert one_node.imbalance == lay.stats().imbalance and one_node.num_steps == lay.stats().num_steps
        hq, hkv = 32 // u, 1 if u > 2 else 2 // u  # 2 KV heads: split for U <= 2, replicated beyond
        n = 4096 // 8
        assert one_node.a2a_fwd_bytes[0] == (u - 1) * n * (2 * hq + 2 * hkv) * 64 * 2
        assert one_node.a2a_bwd_bytes[0] == (u - 1) * n * (2 * hq * 2 + 2 * hkv * (4 if u > 2 else 2)) * 64


def test_hybrid_inspector_prints_every_factorisation(capsys):
    from ringattn.inspect import main

    main(["--workload", "one_64k_plus_short_128k", "--cp", "8", "--ulysses", "2", "--heads", "8", "--kv-heads", "2"])
    text = capsys.readouterr().out
    assert "CP=8 = 2 Ulysses x 4 ring" in text
    for row in ("1x8", "2x4", "4x2", "8x1"):  # 8x1: each of the 2 KV heads replicated 4 times
        assert f"\n{row:>7} " in text
    assert "not valid" not in text
    assert text.count("\n      7    3   1 ") == 1, "per-CP-rank byte table lists CP rank 7 = ring 3, Ulysses 1"


def test_hybrid_rank_plan_is_the_ring_plan_of_the_ring_rank():
    from ringattn import rank_plan

    hybrid = DocLayout.from_cu_seqlens((0, 9, 30, 48), 6, ulysses_size=3)
    for c in range(6):
        assert rank_plan(hybrid, c) is rank_plan(hybrid.ring_layout, c // 3)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < cp_size=6"):
        rank_plan(hybrid, 6)


def _dp_cp_worker(rank, world, _):
    """DP 2 x CP 2: every process builds its own CP group's Ulysses/ring subgroups; each CP group runs a case."""
    import math

    import torch.distributed as dist

    from .reference import dense_with_grads

    cps = [dist.new_group(r) for r in ([0, 1], [2, 3])]
    mine = cps[rank // 2]
    out = {}
    try:
        ringattn.new_cp_groups(2, mine if rank else dist.group.WORLD)
    except ValueError as exc:
        out["overlap"] = str(exc)
    case = Case("dp x cp", (0, 3, 11, 16, 21, 32), 16, hq=4, hkv=1, d=16, seed=5 + rank // 2)
    for u in (2, 1):
        groups = ringattn.new_cp_groups(u, mine)
        out[u] = (
            dist.get_process_group_ranks(groups.ulysses) if groups.ulysses is not None else None,
            dist.get_process_group_ranks(groups.ring) if groups.ring is not None else None,
            groups.ranks(),
        )
        layout = DocLayout.from_cu_seqlens(case.cu_seqlens, 2, sample_len=16, ulysses_size=u)
        idx = layout.local_indices(dist.get_rank(mine))
        q, k, v, dout = global_tensors(case)
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        res = ringattn.ring_eod_attention(ql, kl, vl, layout, groups)
        res.backward(dout[idx])
        ref = dense_with_grads(q, k, v, dout, case.cu_seqlens, 1 / math.sqrt(case.d))
        out[f"err{u}"] = max(
            (x.double() - r[idx]).abs().max().item() for x, r in zip((res, ql.grad, kl.grad, vl.grad), ref)
        )
    return out


def test_hybrid_groups_per_cp_group_of_a_dp_x_cp_job(rank_pools):
    results = unwrap(rank_pools(4).run(_dp_cp_worker))
    for rank, res in enumerate(results):
        assert res["overlap"].startswith(
            "new_cp_groups: CP groups [0, 1] and [0, 1, 2, 3] overlap at rank 0; every "
            "process calls new_cp_groups with the same ulysses_size"
        )
        cp_ranks = [0, 1] if rank < 2 else [2, 3]
        assert res[2] == (cp_ranks, None, (rank % 2, 0, rank % 2))  # pure Ulysses inside each CP group
        assert res[1] == (None, cp_ranks, (rank % 2, rank % 2, 0))  # pure ring inside each CP group
        assert res["err2"] < 1e-5 and res["err1"] < 1e-5


def test_required_multiple_is_exactly_the_hybrid_layout_rule():
    """DocLayout.required_multiple(...) = m  <=>  from_cu_seqlens accepts a sample length iff it is a multiple of m,
    for ring, Ulysses and hybrid splits, both strategies and 1-3 samples (brute force over sample lengths)."""
    for cp in range(1, 7):
        for u in (d for d in range(1, cp + 1) if cp % d == 0):
            for strategy, per_rank in (("zigzag", None), ("balanced", None), ("balanced", 3)):
                for n in (1, 2, 3):
                    kw = dict(strategy=strategy, chunks_per_rank=per_rank, ulysses_size=u)
                    m = DocLayout.required_multiple(cp, num_samples=n, **kw)
                    assert DocLayout.required_multiple(cp, **kw) % m == 0, "the 1-sample value suits any count"
                    for s in range(1, 2 * m + 1):
                        cu = list(range(0, n * s + 1, s))
                        try:
                            DocLayout.from_cu_seqlens(cu, cp, sample_len=s, **kw)
                            ok = True
                        except ValueError:
                            ok = False
                        assert ok == (s % m == 0), (cp, u, strategy, per_rank, n, s, m)
    assert DocLayout.required_multiple(4, ulysses_size=4) == 4  # pure Ulysses: 2*1 and 1*4
    assert DocLayout.required_multiple(4, ulysses_size=2, num_samples=2) == 4  # 2*2; each ring rank holds 2*s/2
    assert DocLayout.required_multiple(8, strategy="balanced", ulysses_size=2) == 16  # 4*4
    with pytest.raises(ValueError, match="ulysses_size: expected a divisor of cp_size=4, got 3"):
        DocLayout.required_multiple(4, ulysses_size=3)
    with pytest.raises(ValueError, match="num_samples: expected a positive int"):
        DocLayout.required_multiple(4, num_samples=0)

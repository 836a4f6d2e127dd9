"""Planner: exact work, no empty pairs, coverage of the mask, consistent exchanges."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn import DocLayout, build_plan, rank_plan
from ringattn.layout import STRATEGIES
from ringattn.plan import COMM_SHAPES
from ringattn.workloads import WORKLOAD_DIR

from .cases import random_cu_seqlens
from .plan_reference import reference_plan
from .plan_sim import simulate
from .reference import doc_causal_mask


def doc_work(cu):
    return sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))


@st.composite
def layouts(draw, max_cp=8, max_chunk=6, max_samples=3):
    cp = draw(st.integers(1, max_cp))
    chunk = draw(st.integers(1, max_chunk))
    samples = draw(st.integers(1, max_samples))
    s = 2 * cp * chunk
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    cu = random_cu_seqlens(
        rng, s, samples, p_single=draw(st.sampled_from([0.0, 0.3, 0.9])), max_doc=draw(st.sampled_from([1, chunk, s]))
    )
    strategy = draw(st.sampled_from(STRATEGIES))
    per_rank = None
    if strategy == "balanced":
        per_rank = draw(st.sampled_from([k for k in (1, 2, 3, 4) if s % (k * cp) == 0]))
    return DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy=strategy, chunks_per_rank=per_rank)


@settings(max_examples=150, deadline=None)
@given(layouts(max_cp=16, max_chunk=40), st.sampled_from(COMM_SHAPES))
def test_work_is_exactly_the_document_causal_entries(layout, comm):
    plan = build_plan(layout, comm)
    assert plan.stats.total_work == doc_work(layout.cu_seqlens)
    for rp in plan.ranks:
        for step in rp.steps:
            for seg in step.segments:
                assert seg.work > 0
                if seg.causal:
                    assert seg.q == seg.kv


@settings(max_examples=80, deadline=None)
@given(layouts(), st.sampled_from(COMM_SHAPES))
def test_simulated_plan_covers_the_mask_exactly_once(layout, comm):
    plan = build_plan(layout, comm)
    pairs, received, grads = simulate(layout, plan)
    mask = doc_causal_mask(layout.cu_seqlens)
    want = {(i, j) for i, j in mask.nonzero().tolist()}
    got = {}
    for x in range(layout.cp_size):
        for key, n in pairs[x].items():
            got[key] = got.get(key, 0) + n
        mine = set(layout.local_indices(x).tolist())
        assert all(qg in mine for qg, _ in pairs[x]), "rank computes only its own queries"
    assert set(got) == want
    assert all(n == 1 for n in got.values()), "every unmasked entry computed once"


def remote_reads(layout):
    """From the dense mask and local_indices only: remote KV ids each rank's queries attend to."""
    mask = doc_causal_mask(layout.cu_seqlens)
    owner = {}
    for r in range(layout.cp_size):
        for t in layout.local_indices(r).tolist():
            owner[t] = r
    reads = []
    for r in range(layout.cp_size):
        idx = layout.local_indices(r)
        keys = mask[idx].any(dim=0).nonzero().flatten().tolist()
        reads.append({k for k in keys if owner[k] != r})
    return reads


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_direct_receives_exactly_the_remote_kv_read(layout):
    reads = remote_reads(layout)
    _, received, grads = simulate(layout, build_plan(layout, "direct"))
    for r in range(layout.cp_size):
        got = [t for step in received[r] for t in step]
        assert len(got) == len(set(got)), "no KV token received twice"
        assert set(got) == reads[r]
    for r in range(layout.cp_size):  # dK/dV partials come back for exactly what was read
        back = [t for owner, reader, ids in grads if reader == r for t in ids]
        assert sorted(back) == sorted(reads[r])


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_ring_forwards_exactly_what_downstream_ranks_read(layout):
    cp = layout.cp_size
    reads = remote_reads(layout)
    plan = build_plan(layout, "ring")
    _, received, _ = simulate(layout, plan)
    owner_of = {t: r for r in range(cp) for t in layout.local_indices(r).tolist()}
    dists = plan.stats.step_distances
    for x in range(cp):
        for i, t in enumerate(dists):
            if t == 0:
                continue
            o = (x - t) % cp
            want = {k for u in range(t, cp) for k in reads[(o + u) % cp] if owner_of[k] == o}
            assert sorted(received[x][i]) == sorted(want)
    # stops when nothing is left: the last step carries something
    if plan.stats.num_steps:
        assert any(received[x][-1] for x in range(cp))


@pytest.mark.parametrize("comm", ["ring", "direct"])
def test_documents_inside_chunks_need_no_exchange(comm):
    cp, chunk = 4, 16
    cu = sorted({0} | {c * chunk + off for c in range(2 * cp) for off in (0, 5, 9)} | {2 * cp * chunk})
    layout = DocLayout.from_cu_seqlens(cu, cp)
    st_ = build_plan(layout, comm).stats
    assert st_.num_steps == 0 and sum(st_.kv_recv_tokens) == 0
    assert build_plan(layout, "plain").stats.num_steps == cp - 1


def test_plain_ring_sends_whole_chunks():
    layout = DocLayout.from_cu_seqlens([0, 64], 4)
    st_ = build_plan(layout, "plain").stats
    assert st_.kv_recv_tokens == (3 * 16,) * 4


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKLOAD_DIR.glob("*.json")))
def test_standard_workloads_plan_exactly(name):
    data = json.loads((WORKLOAD_DIR / f"{name}.json").read_text())
    layout = DocLayout.from_cu_seqlens(data["cu_seqlens"], 8, sample_len=data["sample_len"])
    for comm in COMM_SHAPES:
        assert build_plan(layout, comm).stats.total_work == doc_work(data["cu_seqlens"])


@settings(max_examples=40, deadline=None)
@given(layouts(), st.sampled_from(COMM_SHAPES))
def test_stats_account_for_every_token_sent_and_received(layout, comm):
    stats = layout.stats(comm)
    _, received, _ = simulate(layout, build_plan(layout, comm))
    for r in range(layout.cp_size):
        assert stats.kv_recv_per_step[r] == tuple(len(x) for x in received[r])
        assert stats.kv_recv_tokens[r] == sum(stats.kv_recv_per_step[r])
        assert stats.kv_send_tokens[r] == sum(stats.kv_send_per_step[r])
        assert stats.tokens[r] == layout.local_tokens(r)
    assert sum(stats.kv_send_tokens) == sum(stats.kv_recv_tokens)
    per_step_sent = [sum(col) for col in zip(*stats.kv_send_per_step)]
    assert per_step_sent == [sum(col) for col in zip(*stats.kv_recv_per_step)]
    assert stats.num_steps == sum(1 for d in stats.step_distances if d)


@settings(max_examples=60, deadline=None)
@given(layouts(max_cp=8, max_chunk=12))
def test_every_rank_holds_equal_tokens_of_every_sample(layout):
    for r in range(layout.cp_size):
        per_sample = [0] * layout.num_samples
        for s, e in layout.pieces[r]:
            assert s // layout.sample_len == (e - 1) // layout.sample_len, "a piece crosses a sample"
            per_sample[s // layout.sample_len] += e - s
        assert per_sample == [layout.sample_len // layout.cp_size] * layout.num_samples
    owned = sorted(t for r in range(layout.cp_size) for t in layout.local_indices(r).tolist())
    assert owned == list(range(layout.total_tokens)), "pieces partition the tokens"


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKLOAD_DIR.glob("*.json")))
def test_balanced_strategy_balances_the_standard_workloads(name):
    """Document-aware balancing lowers the busiest rank's work below zigzag's on packed layouts."""
    data = json.loads((WORKLOAD_DIR / f"{name}.json").read_text())
    stats = {
        s: DocLayout.from_cu_seqlens(data["cu_seqlens"], 8, sample_len=data["sample_len"], strategy=s).stats()
        for s in STRATEGIES
    }
    assert stats["balanced"].imbalance <= stats["zigzag"].imbalance
    assert stats["balanced"].imbalance < 1.1


@settings(max_examples=120, deadline=None)
@given(layouts(max_cp=12, max_chunk=8), st.sampled_from(COMM_SHAPES))
def test_per_rank_planner_equals_the_all_pairs_reference(layout, comm):
    """Each rank's plan, built from what that rank needs, equals the O(CP^2) all-pairs construction."""
    ref = reference_plan(layout, comm)
    plan = build_plan(layout, comm)
    assert plan.ranks == ref.ranks
    for name in (
        "tokens",
        "work",
        "pairs_computed",
        "pairs_skipped",
        "kv_recv_tokens",
        "kv_send_tokens",
        "step_distances",
        "kv_recv_per_step",
        "kv_send_per_step",
    ):
        assert getattr(plan.stats, name) == getattr(ref.stats, name), name
    # dK/dV accounting: every row returned is a row read, and arrives where it is expected
    assert sum(plan.stats.grad_send_tokens) == sum(plan.stats.grad_recv_tokens)
    if comm == "direct":
        assert plan.stats.grad_send_tokens == plan.stats.kv_recv_tokens
        assert plan.stats.grad_recv_tokens == plan.stats.kv_send_tokens


def test_rank_plans_are_stable_objects_cached_on_the_layout():
    layout = DocLayout.from_cu_seqlens([0, 5, 40, 64], 4)
    for comm in COMM_SHAPES:
        first = [rank_plan(layout, r, comm) for r in range(4)]
        assert all(rank_plan(layout, r, comm) is first[r] for r in range(4))
        plan = build_plan(layout, comm)
        assert all(plan.ranks[r] is first[r] for r in range(4)) and build_plan(layout, comm) is plan
    # an equal layout built separately has its own cache (the key is the object, never its hash)
    other = DocLayout.from_cu_seqlens([0, 5, 40, 64], 4)
    assert (
        other == layout
        and rank_plan(other, 0) is not rank_plan(layout, 0)
        and rank_plan(other, 0) == rank_plan(layout, 0)
    )
    with pytest.raises(ValueError, match="comm: expected one of"):
        rank_plan(layout, 0, "nope")
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < cp_size=4"):
        rank_plan(layout, 4)

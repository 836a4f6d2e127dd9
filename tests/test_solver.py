"""strategy="auto": the solver's invariants, determinism across processes, and optimality over its candidates."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn import DocLayout, build_plan
from ringattn.cost import CostModel, HardwareProfile
from ringattn.layout import STRATEGIES
from ringattn.plan import direct_accounting, pieces_accounting
from ringattn.sharding.auto import candidates, merged_pieces

from .cases import random_cu_seqlens
from .dist import unwrap
from .plan_sim import simulate
from .reference import doc_causal_mask

MODELS = [
    CostModel(HardwareProfile(400e12, 450e9)),
    CostModel(HardwareProfile(400e12, 50e9)),
    CostModel(HardwareProfile(1e12, 1e8, latency=1e-4, segment_overhead=1e-5), 4, 2, 16, "float32"),
]


@st.composite
def problems(draw, max_cp=12, max_chunk=40):
    cp = draw(st.integers(1, max_cp))
    samples = draw(st.integers(1, 3))
    s = 2 * cp * draw(st.integers(1, max_chunk))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    cu = random_cu_seqlens(
        rng,
        s,
        samples,
        p_single=draw(st.sampled_from([0.0, 0.3, 0.9])),
        max_doc=draw(st.sampled_from([1, s // (2 * cp), s // cp * 3, s])),
    )
    return cu, cp, s, draw(st.sampled_from(MODELS))


def check_pieces(pieces, cp: int, sample_len: int, total: int) -> None:
    """Equal tokens per rank per sample; sorted, non-empty pieces inside one sample; every token once."""
    samples = total // sample_len
    owned = []
    for r in range(cp):
        per = [0] * samples
        for (s, e), nxt in zip(pieces[r], list(pieces[r][1:]) + [None]):
            assert s < e and s // sample_len == (e - 1) // sample_len, "a piece crosses a sample"
            assert nxt is None or e < nxt[0] or nxt[0] % sample_len == 0, "pieces sorted, adjacent ones merged"
            per[s // sample_len] += e - s
            owned.extend(range(s, e))
        assert per == [sample_len // cp] * samples
    assert sorted(owned) == list(range(total)), "every token on exactly one rank"


@settings(max_examples=150, deadline=None)
@given(problems())
def test_auto_layout_invariants_and_optimality(problem):
    cu, cp, s, model = problem
    layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="auto", cost=model)
    assert layout.strategy == "auto" and layout.auto_choice is not None
    check_pieces(layout.pieces, cp, s, cu[-1])
    # the cheapest candidate under the model: never worse than zigzag or the balanced default
    step = model.predict(layout, "direct").step_s
    assert step <= model.predict(DocLayout.from_cu_seqlens(cu, cp, sample_len=s), "direct").step_s * (1 + 1e-12)
    if s % (4 * cp) == 0:
        bal = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="balanced")
        assert step <= model.predict(bal, "direct").step_s * (1 + 1e-12)
    # deterministic within a process
    assert DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="auto", cost=model).pieces == layout.pieces


@settings(max_examples=40, deadline=None)
@given(problems(max_cp=6, max_chunk=6))
def test_every_candidate_plans_exactly(problem):
    """Each construction of the portfolio keeps the invariants and its plan covers the mask once."""
    cu, cp, s, model = problem
    mask = doc_causal_mask(cu)
    want = {(i, j) for i, j in mask.nonzero().tolist()}
    for name, raw, work in candidates(list(cu), cp, s, model):
        pieces = merged_pieces(raw, s)
        check_pieces(pieces, cp, s, cu[-1])
        assert pieces_accounting(cu, cp, raw, s) == direct_accounting(DocLayout(tuple(cu), cp, s, "auto", pieces))
        layout = DocLayout(tuple(cu), cp, s, "auto", pieces)
        assert tuple(work) == direct_accounting(layout).work, f"{name}: the work the solver bounds with"
        pairs, _, _ = simulate(layout, build_plan(layout, "direct"))
        got = {}
        for x in range(cp):
            for key, n in pairs[x].items():
                got[key] = got.get(key, 0) + n
        assert set(got) == want and all(n == 1 for n in got.values()), name


def _auto_pieces(rank, cp, problems_):
    out = []
    for cu, cp_, s, model, *u in problems_:
        layout = DocLayout.from_cu_seqlens(
            cu, cp_, sample_len=s, strategy="auto", cost=model, ulysses_size=u[0] if u else 1
        )
        out.append((layout.pieces, layout.auto_choice, layout.fingerprint))
    return out


def test_auto_is_identical_across_processes(rank_pools):
    """Separately spawned processes (own hash seeds) derive the same layouts and fingerprints."""
    rng = random.Random(12)
    batch = []
    for i in range(24):
        cp = rng.choice([2, 3, 4, 8, 16])
        s = 2 * cp * rng.randint(4, 64)
        batch.append(
            (
                random_cu_seqlens(rng, s, rng.randint(1, 3), max_doc=rng.choice([s // 8 or 1, s])),
                cp,
                s,
                MODELS[i % len(MODELS)],
            )
        )
    for i in range(8):  # hybrid splits, on one- and two-level profiles
        u, r = rng.choice([(2, 2), (4, 2), (8, 4), (2, 8)])
        s = 2 * r * u * rng.randint(4, 32)
        batch.append(
            (
                random_cu_seqlens(rng, s, rng.randint(1, 2), max_doc=rng.choice([s // 8, s])),
                u * r,
                s,
                CostModel(HYBRID_PROFILES[i % 3], 32, 8),
                u,
            )
        )
    mine = _auto_pieces(0, 1, batch)
    for theirs in unwrap(rank_pools(2).run(_auto_pieces, batch)):
        assert theirs == mine


def test_auto_targets_the_model_it_is_given():
    """Slow links make auto keep documents whole where fast links let it balance finer."""
    from ringattn.workloads import load_workload

    wl = load_workload("short_docs_128k")
    fast = DocLayout.from_cu_seqlens(wl["cu_seqlens"], 16, sample_len=wl["sample_len"], strategy="auto", cost=MODELS[0])
    slow = DocLayout.from_cu_seqlens(wl["cu_seqlens"], 16, sample_len=wl["sample_len"], strategy="auto", cost=MODELS[1])
    assert sum(direct_accounting(slow).kv_recv) < sum(direct_accounting(fast).kv_recv)
    assert MODELS[1].predict(slow).step_s < MODELS[1].predict(fast).step_s
    assert MODELS[0].predict(fast).step_s <= MODELS[0].predict(slow).step_s


def test_auto_validation():
    assert "auto" in STRATEGIES
    with pytest.raises(ValueError, match="cost: expected a ringattn.cost.CostModel"):
        DocLayout.from_cu_seqlens([0, 32], 2, strategy="auto", cost="h100-nvlink")
    with pytest.raises(ValueError, match="multiple of 2\\*cp_size=8"):
        DocLayout.from_cu_seqlens([0, 30], 4, strategy="auto")
    # cost is ignored by the other strategies, like chunks_per_rank by zigzag
    assert DocLayout.from_cu_seqlens([0, 32], 2, cost=MODELS[0]).pieces == DocLayout.from_cu_seqlens([0, 32], 2).pieces


def test_auto_for_a_hybrid_layout_solves_its_ring():
    """With ulysses_size > 1, auto lays out the R ring ranks as a ring of R (its pieces and plans are the ring's),
    priced with the head-split model of that ring."""
    rng = random.Random(5)
    cu = random_cu_seqlens(rng, 64, 2, max_doc=40)
    model = MODELS[1]
    hybrid = DocLayout.from_cu_seqlens(cu, 4, sample_len=64, strategy="auto", cost=model, ulysses_size=2)
    ring = DocLayout.from_cu_seqlens(cu, 2, sample_len=64, strategy="auto", cost=model.ring_model(2, 4))
    assert (hybrid.cp_size, hybrid.ring_size, hybrid.strategy) == (4, 2, "auto")
    assert hybrid.pieces == ring.pieces and hybrid.auto_choice == ring.auto_choice
    assert hybrid.ring_layout == ring
    from ringattn import rank_plan

    for cp_rank in range(4):
        assert rank_plan(hybrid, cp_rank) is rank_plan(hybrid, cp_rank)
        assert rank_plan(hybrid, cp_rank) == rank_plan(ring, cp_rank // 2)
    assert DocLayout.required_multiple(4, strategy="auto", ulysses_size=2) == DocLayout.required_multiple(
        4, strategy="zigzag", ulysses_size=2
    )


HYBRID_PROFILES = [
    HardwareProfile(400e12, 50e9),
    HardwareProfile(400e12, 50e9, 450e9, node_size=4),
    HardwareProfile(1e12, 1e8, 1e9, latency=1e-4, segment_overhead=1e-5, node_size=2),
]


@st.composite
def hybrid_problems(draw, max_ring=6, max_chunk=12):
    """``(cu, cp, sample_len, U, model)`` with heads the ``U`` split can scatter (split or replicated KV)."""
    u = draw(st.sampled_from([2, 3, 4, 8]))
    r = draw(st.integers(1, max_ring))
    s = 2 * r * u * draw(st.integers(1, max_chunk))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    cu = random_cu_seqlens(
        rng,
        s,
        draw(st.integers(1, 2)),
        p_single=draw(st.sampled_from([0.0, 0.3])),
        max_doc=draw(st.sampled_from([s // (2 * r), s])),
    )
    heads = [
        (hkv * g, hkv)
        for hkv in (1, 2, 3, 4, 8, 16)
        for g in (1, 4, u)
        if (hkv * g) % u == 0 and (hkv % u == 0 or u % hkv == 0)
    ]  # ulysses_heads' rule
    hq, hkv = draw(st.sampled_from(heads))
    return cu, u * r, s, u, CostModel(draw(st.sampled_from(HYBRID_PROFILES)), hq, hkv, 16)


@settings(max_examples=40, deadline=None)
@given(hybrid_problems())
def test_auto_for_hybrid_is_never_worse_than_zigzag_or_balanced(problem):
    """Hybrid auto: the ring of its head-split model (deterministic), equal tokens per ring rank per sample, and
    by the full model (all-to-alls included) never slower than zigzag or balanced on the same split."""
    cu, cp, s, u, model = problem
    layout = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="auto", cost=model, ulysses_size=u)
    check_pieces(layout.pieces, cp // u, s, cu[-1])
    ring = DocLayout.from_cu_seqlens(cu, cp // u, sample_len=s, strategy="auto", cost=model.ring_model(u, cp))
    assert (layout.pieces, layout.auto_choice) == (ring.pieces, ring.auto_choice)
    step = model.predict(layout, "direct").step_s
    zz = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, ulysses_size=u)
    assert step <= model.predict(zz, "direct").step_s * (1 + 1e-12)
    if s % (4 * cp // u) == 0:
        bal = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="balanced", ulysses_size=u)
        assert step <= model.predict(bal, "direct").step_s * (1 + 1e-12)
    again = DocLayout.from_cu_seqlens(cu, cp, sample_len=s, strategy="auto", cost=model, ulysses_size=u)
    assert again.pieces == layout.pieces and again.fingerprint == layout.fingerprint


def test_auto_for_hybrid_prices_the_head_split():
    """U = 8 with 2 KV heads replicates them (1 KV head and 4 query heads per Ulysses rank: KV weighs 4x more than
    in the unsplit 32/2 model); the head-split model picks another ring layout, faster by the full model."""
    rng = random.Random(1)
    r = rng.choice([2, 3, 4])
    s = 2 * r * 8 * rng.randint(8, 64)
    cu = random_cu_seqlens(rng, s, rng.randint(1, 2), max_doc=rng.choice([s // 4, s]))
    model = CostModel(HardwareProfile(400e12, 50e9), 32, 2, 128)
    hybrid = DocLayout.from_cu_seqlens(cu, 8 * r, sample_len=s, strategy="auto", cost=model, ulysses_size=8)
    unsplit = DocLayout.from_cu_seqlens(cu, r, sample_len=s, strategy="auto", cost=model)
    assert hybrid.pieces != unsplit.pieces
    other = DocLayout(hybrid.cu_seqlens, 8 * r, s, "auto", unsplit.pieces, 8)
    assert model.predict(hybrid).step_s < model.predict(other).step_s


def test_auto_hybrid_heads_and_default_model():
    """A model whose heads the split cannot scatter is refused naming them; without a model any U works."""
    with pytest.raises(
        ValueError, match="cost: the model's heads \\(num_heads=32, num_kv_heads=8\\) cannot run ulysses_size=3"
    ):
        DocLayout.from_cu_seqlens([0, 10, 48], 6, strategy="auto", cost=MODELS[0], ulysses_size=3)
    from ringattn.cost import default_cost_model

    layout = DocLayout.from_cu_seqlens([0, 10, 48], 6, strategy="auto", ulysses_size=3)
    ring = DocLayout.from_cu_seqlens([0, 10, 48], 2, strategy="auto", cost=default_cost_model(3).ring_model(3, 6))
    assert layout.pieces == ring.pieces


def test_auto_on_a_two_level_profile_prices_the_ring_link():
    """Pure ring on NVLink-in-node / IB-between: inside one node auto solves as on NVLink, across nodes as on IB."""
    from ringattn.workloads import load_workload

    wl = load_workload("short_docs_128k")
    two = CostModel("h100-nvlink-ib400")
    for cp, flat in ((8, "h100-nvlink"), (16, "h100-ib400")):
        a, b = (
            DocLayout.from_cu_seqlens(wl["cu_seqlens"], cp, sample_len=wl["sample_len"], strategy="auto", cost=m)
            for m in (two, CostModel(flat))
        )
        assert (a.pieces, a.auto_choice) == (b.pieces, b.auto_choice)

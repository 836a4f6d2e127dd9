"""Cost model: profiles, validation, and the model's accounting against the plan's exact counts."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn import DocLayout, build_plan
from ringattn.cost import DEFAULT_PROFILE, PRESETS, CostModel, HardwareProfile, default_cost_model
from ringattn.layout import STRATEGIES
from ringattn.plan import COMM_SHAPES, direct_accounting, ulysses_heads

from .cases import random_cu_seqlens, splittable_heads
from .test_plan import layouts


def test_presets_are_valid_and_cite_their_sources():
    assert DEFAULT_PROFILE is PRESETS["h100-nvlink"]
    assert (DEFAULT_PROFILE.flops, DEFAULT_PROFILE.p2p_bandwidth) == (400e12, 450e9)
    for name, prof in PRESETS.items():
        assert prof.name == name and "http" in prof.source, name
        assert CostModel(name).profile is prof
    m = default_cost_model()
    assert (m.profile, m.num_heads, m.num_kv_heads, m.head_dim, m.dtype) == (
        DEFAULT_PROFILE,
        32,
        8,
        128,
        torch.bfloat16,
    )
    assert default_cost_model(16) == m and default_cost_model(32) == m  # 32/8 split over 16, 32 (KV replicated)
    assert (default_cost_model(3).num_heads, default_cost_model(3).num_kv_heads) == (12, 3)
    # the pure-ring presets keep one level; the two-level ones put NVLink/HCCS inside 8-rank nodes, IB/RoCE between
    for name in ("h100-nvlink", "h100-ib400", "h200-nvlink", "h200-ib400", "ascend910b-hccs", "ascend910b-roce"):
        assert PRESETS[name].node_size == 0 and PRESETS[name].a2a_bandwidth == PRESETS[name].p2p_bandwidth
    for name, fast, slow in (
        ("h100-nvlink-ib400", "h100-nvlink", "h100-ib400"),
        ("h200-nvlink-ib400", "h200-nvlink", "h200-ib400"),
        ("ascend910b-hccs-roce", "ascend910b-hccs", "ascend910b-roce"),
    ):
        prof = PRESETS[name]
        assert prof.node_size == 8 and prof.flops == PRESETS[fast].flops
        assert (prof.a2a_bandwidth, prof.p2p_bandwidth) == (PRESETS[fast].p2p_bandwidth, PRESETS[slow].p2p_bandwidth)


def test_profile_save_load_roundtrip(tmp_path):
    prof = HardwareProfile(1.5e12, 2e9, None, 3e-6, "mine", "measured", segment_overhead=1e-5)
    path = tmp_path / "p.json"
    prof.save(path)
    assert HardwareProfile.load(path) == prof
    assert prof.all_to_all_bandwidth == 2e9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flops=0, p2p_bandwidth=1e9), "flops: expected a positive finite number"),
        (dict(flops=1e12, p2p_bandwidth=float("inf")), "p2p_bandwidth: expected a positive finite number"),
        (dict(flops=1e12, p2p_bandwidth=1e9, a2a_bandwidth=-1), "a2a_bandwidth: expected a positive finite number"),
        (dict(flops=1e12, p2p_bandwidth=1e9, latency=-1e-6), "latency: expected a finite number >= 0"),
        (dict(flops=1e12, p2p_bandwidth=1e9, segment_overhead=float("nan")), "segment_overhead: expected a finite"),
        (dict(flops=1e12, p2p_bandwidth=1e9, node_size=-8), "node_size: expected an int >= 0"),
        (dict(flops=1e12, p2p_bandwidth=1e9, node_size=True), "node_size: expected an int >= 0"),
        (dict(flops="fast", p2p_bandwidth=1e9), "flops: expected a positive finite number"),
    ],
)
def test_bad_profile(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardwareProfile(**kwargs)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ('["flops"]', "expected a JSON object"),
        ('{"flops": 1e12}', "missing keys \\['p2p_bandwidth'\\]"),
        ('{"flops": 1e12, "p2p_bandwidth": 1e9, "bandwith": 1}', "unknown keys \\['bandwith'\\]"),
        ('{"flops": -1, "p2p_bandwidth": 1e9}', "flops: expected a positive finite number"),
    ],
)
def test_bad_profile_file(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        HardwareProfile.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        HardwareProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "args, match",
    [
        (("nope",), "profile: expected one of"),
        ((DEFAULT_PROFILE, 0), "num_heads: expected a positive int"),
        ((DEFAULT_PROFILE, 6, 4), "must be a multiple of num_kv_heads"),
        ((DEFAULT_PROFILE, 8, 2, 64, "int8"), "dtype: expected a floating torch dtype"),
        ((DEFAULT_PROFILE, 8, 2, 64, "bfloat17"), "dtype: expected a floating torch dtype"),
    ],
)
def test_bad_cost_model(args, match):
    with pytest.raises(ValueError, match=match):
        CostModel(*args)
    with pytest.raises(ValueError, match="layout: expected a DocLayout"):
        CostModel().predict("not a layout")
    hybrid = DocLayout.from_cu_seqlens([0, 5, 96], 6, ulysses_size=3)
    with pytest.raises(
        ValueError,
        match="cost: the model's heads \\(num_heads=32, num_kv_heads=8\\) cannot run "
        "ulysses_size=3: heads: q heads \\(32\\) must be a multiple",
    ):
        CostModel().predict(hybrid)
    assert CostModel(DEFAULT_PROFILE, 6, 3).predict(hybrid).ulysses_size == 3


def test_prediction_by_hand():
    """One 64-token document, CP 2 zigzag, direct: rank 1 holds chunks 1-2 and reads chunk 0 (16 tokens)."""
    layout = DocLayout.from_cu_seqlens([0, 64], 2)
    prof = HardwareProfile(flops=1e12, p2p_bandwidth=1e9, latency=1e-3)
    m = CostModel(prof, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    pred = m.predict(layout, "direct")
    # rank 0: chunks 0 and 3 (tokens 0-15, 48-63); rank 1: chunks 1-2 (16-47)
    w0 = 16 * 17 // 2 + sum(range(49, 65))
    w1 = sum(range(17, 49))
    assert build_plan(layout, "direct").stats.work == (w0, w1)
    spe = 3.5 * 4 * 8 * 4 / 1e12
    assert pred.compute_s == pytest.approx((w0 * spe, w1 * spe))
    kvb, gb = 2 * 2 * 8 * 2, 2 * 2 * 8 * 4
    # rank 0 reads 32 tokens of rank 1 (chunks 1-2) for chunk 3; rank 1 reads chunk 0 (16 tokens)
    in0, out0 = 2 * 32 * kvb + 16 * gb, 2 * 16 * kvb + 32 * gb
    in1, out1 = 2 * 16 * kvb + 32 * gb, 2 * 32 * kvb + 16 * gb
    assert pred.bytes_in == (in0, in1) and pred.bytes_out == (out0, out1)
    assert pred.comm_s == pytest.approx((max(in0, out0) / 1e9, max(in1, out1) / 1e9))
    assert pred.steps == 1
    times = [max(c, x) + 1e-3 for c, x in zip(pred.compute_s, pred.comm_s)]
    assert pred.time_s == pytest.approx(times) and pred.step_s == pytest.approx(max(times))
    assert pred.efficiency == pytest.approx((w0 + w1) * spe / 2 / max(times))
    assert pred.busiest == max(range(2), key=lambda r: times[r])


@settings(max_examples=60, deadline=None)
@given(
    layouts(max_cp=8, max_chunk=10),
    st.sampled_from(COMM_SHAPES),
    st.sampled_from([1e-6, 0.0]),
    st.sampled_from(["float32", "bfloat16"]),
)
def test_model_prices_the_plans_exact_counts(layout, comm, overhead, dtype):
    prof = HardwareProfile(flops=3e12, p2p_bandwidth=7e9, latency=2e-6, segment_overhead=overhead)
    m = CostModel(prof, 4, 2, 16, dtype)
    plan = build_plan(layout, comm)
    pred = m.predict(layout, comm)
    item = 4 if dtype == "float32" else 2
    kvb, gb = 2 * 2 * 16 * item, 2 * 2 * 16 * 4
    spe = 3.5 * 4 * 16 * 4 / 3e12
    for r, rp in enumerate(plan.ranks):
        segs = sum(len(s.segments) for s in rp.steps)
        assert pred.compute_s[r] == pytest.approx(rp.work * spe + segs * overhead)
        kv_in = sum(s.recv.tokens for s in rp.steps if s.recv)
        kv_out = sum(s.send.tokens for s in rp.steps if s.send)
        g_in = sum(s.grad_recv.tokens for s in rp.steps if s.grad_recv)
        g_out = sum(s.grad_send.tokens for s in rp.steps if s.grad_send)
        assert pred.bytes_in[r] == 2 * kv_in * kvb + g_in * gb
        assert pred.bytes_out[r] == 2 * kv_out * kvb + g_out * gb
        assert pred.time_s[r] == pytest.approx(max(pred.compute_s[r], pred.comm_s[r]) + plan.stats.num_steps * 2e-6)
    assert math.isclose(pred.step_s, max(pred.time_s))


@settings(max_examples=80, deadline=None)
@given(layouts(max_cp=10, max_chunk=12))
def test_fast_accounting_equals_the_plans_counts(layout):
    """What the solver prices (direct_accounting) is the direct plan's exact accounting."""
    acc = direct_accounting(layout)
    stats = build_plan(layout, "direct").stats
    assert acc.work == stats.work
    assert acc.kv_recv == stats.kv_recv_tokens == stats.grad_send_tokens
    assert acc.kv_send == stats.kv_send_tokens == stats.grad_recv_tokens
    assert acc.steps == stats.num_steps
    assert acc.segments == stats.segments == build_plan(layout, "ring").stats.segments


def test_predictions_on_a_standard_workload_use_every_field():
    from ringattn.workloads import load_workload

    wl = load_workload("pretrain_mix_128k")
    layout = DocLayout.from_cu_seqlens(wl["cu_seqlens"], 8, sample_len=wl["sample_len"], strategy="balanced")
    fast, slow = CostModel("h100-nvlink"), CostModel("h100-ib400")
    pf, ps = fast.predict(layout), slow.predict(layout)
    assert pf.compute_s == ps.compute_s and pf.ideal_s == ps.ideal_s
    assert all(s == pytest.approx(9 * f) for f, s in zip(pf.comm_s, ps.comm_s))
    assert ps.step_s >= pf.step_s and 0 < ps.efficiency <= pf.efficiency <= 1
    assert "efficiency" in repr(pf)


def test_profile_json_from_calibration_is_loadable(tmp_path):
    """The keys --calibrate writes are the dataclass fields (checked without running torchrun)."""
    data = {
        "flops": 1e10,
        "p2p_bandwidth": 1e8,
        "a2a_bandwidth": None,
        "latency": 1e-3,
        "name": "calibrated-cpu-cpu",
        "source": "x",
        "segment_overhead": 1e-4,
        "node_size": 0,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert HardwareProfile.load(path).to_dict() == data
    del data["node_size"]  # a profile written before node_size existed: one level
    path.write_text(json.dumps(data))
    assert HardwareProfile.load(path).node_size == 0


def test_random_layouts_price_without_error():
    rng = random.Random(0)
    for _ in range(20):
        cp = rng.randint(1, 6)
        s = 2 * cp * rng.randint(1, 8)
        layout = DocLayout.from_cu_seqlens(random_cu_seqlens(rng, s, 2), cp, sample_len=s)
        pred = CostModel().predict(layout)
        assert 0 < pred.efficiency <= 1 + 1e-12


def test_calibration_writes_a_loadable_profile(tmp_path, monkeypatch):
    """``python -m ringattn.cost --calibrate`` in one process: the kernel rate and segment overhead are
    measured with the CPU backend; without a group the P2P bandwidth must be given (or it refuses)."""
    from ringattn.cost import calibrate as cost

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "cpu.json"
    args = [
        "--calibrate",
        "--device",
        "cpu",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--seq",
        "256",
        "--short",
        "64",
        "--repeat",
        "1",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit, match="needs a group of 2\\+ ranks"):
        cost.main(args)
    with pytest.raises(SystemExit, match="--node-size: expected 0 or a divisor"):
        cost.main(args + ["--p2p-bandwidth", "2e9", "--node-size", "-1"])
    cost.main(args + ["--p2p-bandwidth", "2e9", "--node-size", "8"])
    prof = HardwareProfile.load(out)
    assert prof.flops > 0 and prof.segment_overhead >= 0 and prof.p2p_bandwidth == 2e9 and prof.node_size == 8
    assert prof.name == "calibrated-cpu-cpu" and "Hq=2 Hkv=1 D=16" in prof.source


def _measure_links(rank, cp, node_size):
    import torch.distributed as dist

    from ringattn.cost.calibrate import measure_links

    return measure_links(dist.group.WORLD, torch.device("cpu"), 1 << 16, 2, lambda: None, node_size)


@pytest.mark.parametrize("node_size", [0, 1, 2])
def test_calibration_measures_p2p_and_all_to_all_over_the_group(rank_pools, node_size):
    """One level: P2P ring and all-to-all over the group; two levels: the all-to-all inside each node (none in
    nodes of one rank), the same figures on every rank."""
    results = [res for status, res in rank_pools(2).run(_measure_links, node_size) if status == "ok"]
    assert len(results) == 2
    for bw, small, a2a in results:
        assert bw > 0 and small > 0 and (a2a is None or a2a > 0)
        assert (a2a is None) == (node_size == 1)
    assert results[0][0] == results[1][0], "every rank reports the slowest rank's bandwidth"
    assert results[0][2] == results[1][2]


# ---------------------------------------------------------------------------- hybrid Ulysses x ring


@st.composite
def hybrid_layouts(draw, max_cp=8, max_chunk=4):
    """``(layout, Hq, Hkv)``: any ``U x R`` split of ``cp``, heads the split can scatter (split or replicated)."""
    cp = draw(st.integers(1, max_cp))
    u = draw(st.sampled_from([d for d in range(1, cp + 1) if cp % d == 0]))
    r = cp // u
    chunk = u * draw(st.integers(1, max_chunk))
    s = 2 * r * chunk
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    cu = random_cu_seqlens(
        rng,
        s,
        draw(st.integers(1, 2)),
        p_single=draw(st.sampled_from([0.0, 0.3])),
        max_doc=draw(st.sampled_from([chunk, s])),
    )
    hq, hkv = draw(st.sampled_from(splittable_heads(u, (1, 2, 3, 4, 8), sorted({1, 2, 4, u}))))
    strategy = draw(st.sampled_from(STRATEGIES))
    per_rank = draw(st.sampled_from([k for k in (1, 2, 4) if s % (k * r) == 0])) if strategy == "balanced" else None
    layout = DocLayout.from_cu_seqlens(
        cu, cp, sample_len=s, strategy=strategy, chunks_per_rank=per_rank, ulysses_size=u
    )
    return layout, hq, hkv


@settings(max_examples=60, deadline=None)
@given(
    hybrid_layouts(),
    st.sampled_from(COMM_SHAPES),
    st.sampled_from([0, 1, 2, 4]),
    st.sampled_from(["float32", "bfloat16"]),
)
def test_hybrid_model_prices_the_exact_counts(case, comm, node_size, dtype):
    """Per CP rank: the ring rank's plan on Hq/U heads, the ring's KV on the per-rank KV heads at the ring's
    link, the implementation's all-to-all bytes (CPStats and the closed form) at the all-to-all link, added."""
    layout, hq, hkv = case
    u, r, cp = layout.ulysses_size, layout.ring_size, layout.cp_size
    flops, p2p, a2a, lat, seg = 3e12, 7e9, 30e9, 3e-6, 1e-6
    m = CostModel(HardwareProfile(flops, p2p, a2a, lat, segment_overhead=seg, node_size=node_size), hq, hkv, 16, dtype)
    pred = m.predict(layout, comm)
    st_ = layout.cp_stats(hq, hkv, 16, m.dtype.itemsize, comm)
    plan = build_plan(layout.ring_layout, comm)
    hq_u, hkv_u, rep = ulysses_heads(hq, hkv, u)
    item = m.dtype.itemsize
    kvb, gb = 2 * hkv_u * 16 * item, 2 * hkv_u * 16 * 4
    # the ring's link: inside a node where every ring group lies on one node (consecutive CP ranks per node)
    spans = node_size and any(j // node_size != (u * (r - 1) + j) // node_size for j in range(u))
    ring_bw = a2a if node_size and not spans else p2p
    assert pred.ulysses_size == u and pred.ring_size == r and pred.steps == plan.stats.num_steps
    times = []
    for c in range(cp):
        rr, j = divmod(c, u)
        rp = plan.ranks[rr]
        segs = sum(len(s.segments) for s in rp.steps)
        assert pred.compute_s[c] == pytest.approx(rp.work * 3.5 * 4 * 16 * hq_u / flops + segs * seg)
        kv_in = sum(s.recv.tokens for s in rp.steps if s.recv)
        kv_out = sum(s.send.tokens for s in rp.steps if s.send)
        g_in = sum(s.grad_recv.tokens for s in rp.steps if s.grad_recv)
        g_out = sum(s.grad_send.tokens for s in rp.steps if s.grad_send)
        assert pred.bytes_in[c] == 2 * kv_in * kvb + g_in * gb == st_.ring_fwd_bytes[c] + st_.ring_bwd_bytes[c]
        assert pred.bytes_out[c] == 2 * kv_out * kvb + g_out * gb
        assert pred.comm_s[c] == pytest.approx(max(pred.bytes_in[c], pred.bytes_out[c]) / ring_bw)
        n = layout.local_tokens(c)
        fwd = (2 * hq_u + 2 * hkv_u) * 16 * item  # q, k, v in and the output back
        bwd = 2 * hq_u * 16 * item + 2 * hkv_u * 16 * (4 if rep > 1 else item)  # d(out) in, dq and dk/dv back
        per_peer = n * (fwd + bwd)
        assert pred.a2a_bytes[c] == (u - 1) * per_peer == st_.a2a_fwd_bytes[c] + st_.a2a_bwd_bytes[c]
        far = sum(1 for k in range(u) if k != j and node_size and (rr * u + k) // node_size != c // node_size)
        want = max((u - 1 - far) * per_peer / a2a, far * per_peer / p2p) + (4 * lat / 3 if u > 1 else 0.0)
        assert pred.a2a_s[c] == pytest.approx(want, abs=1e-18)
        times.append(max(pred.compute_s[c], pred.comm_s[c]) + plan.stats.num_steps * lat + want)
        assert pred.time_s[c] == pytest.approx(times[-1])
    assert pred.step_s == max(pred.time_s) == pytest.approx(max(times))
    assert pred.ideal_s == pytest.approx(sum(pred.compute_s) / cp)
    assert pred.efficiency == pytest.approx(pred.ideal_s / pred.step_s)
    if r == 1:  # pure Ulysses: no ring exchange at all
        assert pred.steps == 0 and set(pred.comm_s) == {0.0} and set(pred.bytes_in) == set(pred.bytes_out) == {0}


def test_hybrid_prediction_by_hand():
    """One 64-token document, CP 4 as 2 Ulysses x 2 ring (zigzag, direct), Hq=4, Hkv=2 (split: 2 and 1 per rank)."""
    layout = DocLayout.from_cu_seqlens([0, 64], 4, ulysses_size=2)
    prof = HardwareProfile(flops=1e12, p2p_bandwidth=1e9, a2a_bandwidth=4e9, latency=3e-3)
    pred = CostModel(prof, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16).predict(layout, "direct")
    w0, w1 = 16 * 17 // 2 + sum(range(49, 65)), sum(range(17, 49))  # ring ranks as in test_prediction_by_hand
    spe = 3.5 * 4 * 8 * 2 / 1e12  # 2 query heads per Ulysses rank
    assert pred.compute_s == pytest.approx((w0 * spe, w0 * spe, w1 * spe, w1 * spe))
    kvb, gb = 2 * 1 * 8 * 2, 2 * 1 * 8 * 4  # 1 KV head per rank
    in0, out0 = 2 * 32 * kvb + 16 * gb, 2 * 16 * kvb + 32 * gb
    in1, out1 = 2 * 16 * kvb + 32 * gb, 2 * 32 * kvb + 16 * gb
    assert pred.bytes_in == (in0, in0, in1, in1) and pred.bytes_out == (out0, out0, out1, out1)
    # 16 tokens per CP rank to its one peer: q, k, v (2 + 1 + 1 heads) in and 2 output heads back; backward
    # d(output) in (2 heads) and dq, dk, dv (2 + 1 + 1) back; 8 bf16 elements per head row
    a2a = 16 * (4 + 2) * 16 + 16 * (2 + 4) * 16
    assert pred.a2a_bytes == (a2a,) * 4 == (3072,) * 4
    assert pred.a2a_s == pytest.approx((a2a / 4e9 + 4e-3,) * 4)  # 4 all-to-alls, a third of the latency each
    times = [
        max(pred.compute_s[c], max((in0, out0) if c < 2 else (in1, out1)) / 1e9) + 3e-3 + a2a / 4e9 + 4e-3
        for c in range(4)
    ]
    assert pred.time_s == pytest.approx(times) and pred.step_s == pytest.approx(max(times))
    assert pred.efficiency == pytest.approx(2 * (w0 + w1) * spe / 4 / max(times))
    assert "2x2" in repr(pred) and "all-to-all" in repr(pred)


@settings(max_examples=40, deadline=None)
@given(layouts(max_cp=8, max_chunk=10), st.sampled_from(COMM_SHAPES))
def test_pure_ring_prediction_is_unchanged_by_the_hybrid_path(layout, comm):
    """U = 1 through the per-CP-rank path is exactly the ring prediction (no all-to-all, nothing added)."""
    m = CostModel(HardwareProfile(3e12, 7e9, 1e9, latency=2e-6, segment_overhead=1e-6), 4, 2, 16)
    ring = m.predict_stats(build_plan(layout, comm).stats)
    assert m.predict(layout, comm) == ring
    assert m.predict_cp_stats(layout.cp_stats(4, 2, 16, 2, comm)) == ring
    assert set(ring.a2a_s) == {0.0} and set(ring.a2a_bytes) == {0}
    assert m.ring_model(1) is m and m.ring_model(1, layout.cp_size) is m


def test_two_level_profile_prices_each_link():
    """NVLink inside 8-rank nodes, IB between: a pure ring inside a node is the NVLink preset's prediction, across
    nodes the IB preset's; an all-to-all over 16 ranks sends 8 of its 15 parts over IB."""
    from ringattn.workloads import load_workload

    two = CostModel("h100-nvlink-ib400")
    assert two.ring_bandwidth(1, 8) == two.ring_bandwidth(2, 8) == 450e9
    assert two.ring_bandwidth(1, 16) == two.ring_bandwidth(8, 16) == two.ring_bandwidth(4, 64) == 50e9
    with pytest.raises(ValueError, match="cp_size: needed to price a split on the two-level profile"):
        two.ring_model(2)
    with pytest.raises(ValueError, match="cp_size: expected a positive multiple of ulysses_size=3"):
        two.ring_model(3, 16)
    wl = load_workload("long_mix_128k")
    for cp, flat in ((8, "h100-nvlink"), (16, "h100-ib400")):
        layout = DocLayout.from_cu_seqlens(wl["cu_seqlens"], cp, sample_len=wl["sample_len"])
        a, b = two.predict(layout), CostModel(flat).predict(layout)
        assert (a.compute_s, a.comm_s, a.time_s, a.efficiency) == (b.compute_s, b.comm_s, b.time_s, b.efficiency)
    uly = DocLayout.from_cu_seqlens(wl["cu_seqlens"], 16, sample_len=wl["sample_len"], ulysses_size=16)
    pred = two.predict(uly)
    b = pred.a2a_bytes[0]
    assert pred.a2a_s[0] == pytest.approx(max(7 / 15 * b / 450e9, 8 / 15 * b / 50e9))
    assert pred.efficiency < CostModel("h100-nvlink").predict(uly).efficiency


def test_inspector_compare_lists_every_split_with_the_model_figures(capsys):
    from ringattn.inspect import main

    args = [
        "--workload",
        "one_64k_plus_short_128k",
        "--cp",
        "8",
        "--heads",
        "12",
        "--kv-heads",
        "4",
        "--profile",
        "h100-nvlink-ib400",
    ]
    main(args + ["--compare"])
    text = capsys.readouterr().out
    assert "profile h100-nvlink-ib400" in text and "450 GB/s all-to-all" in text and "8 CP ranks per node" in text
    assert "every Ulysses x ring split of CP=8" in text
    wl = load_workload_for_test("one_64k_plus_short_128k")
    model = CostModel("h100-nvlink-ib400", 12, 4)
    best = None
    for u in (1, 2, 4):  # 12 query heads: U = 8 cannot split them
        for strategy in ("zigzag", "balanced", "auto"):
            layout = DocLayout.from_cu_seqlens(
                wl["cu_seqlens"],
                8,
                sample_len=wl["sample_len"],
                strategy=strategy,
                ulysses_size=u,
                cost=model if strategy == "auto" else None,
            )
            pred = model.predict(layout)
            label = f"auto: {layout.auto_choice}" if strategy == "auto" else strategy
            row = [
                line
                for line in text.splitlines()
                if line[:7].strip() == f"{u}x{8 // u}" and line[8:30].strip() == label
            ]
            assert len(row) == 1, (u, strategy)
            cells = row[0].split()
            assert cells[-1] == f"{pred.efficiency:.3f}" and cells[-2] == f"{pred.step_s * 1e3:.3f}"
            assert cells[-3] == f"{pred.a2a_s[pred.busiest] * 1e3:.3f}"
            if best is None or pred.step_s < best[0]:
                best = (pred.step_s, u, pred.efficiency)
    assert "\n    8x1 all                    not valid: cost: the model's heads (num_heads=12" in text
    assert f"best split: {best[1]}x{8 // best[1]} " in text and f"efficiency {best[2]:.3f}; best pure ring: 1x8" in text


def load_workload_for_test(name):
    from ringattn.workloads import load_workload

    return load_workload(name)

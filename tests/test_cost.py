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
from ringattn.plan import COMM_SHAPES, direct_accounting

from .cases import random_cu_seqlens
from .test_plan import layouts


def test_presets_are_valid_and_cite_their_sources():
    assert DEFAULT_PROFILE is PRESETS["h100-nvlink"]
    assert (DEFAULT_PROFILE.flops, DEFAULT_PROFILE.p2p_bandwidth) == (400e12, 450e9)
    for name, prof in PRESETS.items():
        assert prof.name == name and "http" in prof.source, name
        assert CostModel(name).profile is prof
    m = default_cost_model()
    assert (m.profile, m.num_heads, m.num_kv_heads, m.head_dim, m.dtype) == (DEFAULT_PROFILE, 32, 8, 128, torch.bfloat16)


def test_profile_save_load_roundtrip(tmp_path):
    prof = HardwareProfile(1.5e12, 2e9, None, 3e-6, "mine", "measured", segment_overhead=1e-5)
    path = tmp_path / "p.json"
    prof.save(path)
    assert HardwareProfile.load(path) == prof
    assert prof.all_to_all_bandwidth == 2e9


@pytest.mark.parametrize("kwargs, match", [
    (dict(flops=0, p2p_bandwidth=1e9), "flops: expected a positive finite number"),
    (dict(flops=1e12, p2p_bandwidth=float("inf")), "p2p_bandwidth: expected a positive finite number"),
    (dict(flops=1e12, p2p_bandwidth=1e9, a2a_bandwidth=-1), "a2a_bandwidth: expected a positive finite number"),
    (dict(flops=1e12, p2p_bandwidth=1e9, latency=-1e-6), "latency: expected a finite number >= 0"),
    (dict(flops=1e12, p2p_bandwidth=1e9, segment_overhead=float("nan")), "segment_overhead: expected a finite"),
    (dict(flops="fast", p2p_bandwidth=1e9), "flops: expected a positive finite number"),
])
def test_bad_profile(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardwareProfile(**kwargs)


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not valid JSON"),
    ('["flops"]', "expected a JSON object"),
    ('{"flops": 1e12}', "missing keys \\['p2p_bandwidth'\\]"),
    ('{"flops": 1e12, "p2p_bandwidth": 1e9, "bandwith": 1}', "unknown keys \\['bandwith'\\]"),
    ('{"flops": -1, "p2p_bandwidth": 1e9}', "flops: expected a positive finite number"),
])
def test_bad_profile_file(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        HardwareProfile.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        HardwareProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize("args, match", [
    (("nope",), "profile: expected one of"),
    ((DEFAULT_PROFILE, 0), "num_heads: expected a positive int"),
    ((DEFAULT_PROFILE, 6, 4), "must be a multiple of num_kv_heads"),
    ((DEFAULT_PROFILE, 8, 2, 64, "int8"), "dtype: expected a floating torch dtype"),
    ((DEFAULT_PROFILE, 8, 2, 64, "bfloat17"), "dtype: expected a floating torch dtype"),
])
def test_bad_cost_model(args, match):
    with pytest.raises(ValueError, match=match):
        CostModel(*args)
    with pytest.raises(ValueError, match="layout: expected a DocLayout"):
        CostModel().predict("not a layout")
    hybrid = DocLayout.from_cu_seqlens([0, 5, 64], 4, ulysses_size=2)
    with pytest.raises(ValueError, match="prices pure ring layouts \\(ulysses_size=1\\); got ulysses_size=2"):
        CostModel().predict(hybrid)
    assert CostModel().predict(hybrid.ring_layout).steps >= 0


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
@given(layouts(max_cp=8, max_chunk=10), st.sampled_from(COMM_SHAPES),
       st.sampled_from([1e-6, 0.0]), st.sampled_from(["float32", "bfloat16"]))
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
    data = {"flops": 1e10, "p2p_bandwidth": 1e8, "a2a_bandwidth": None, "latency": 1e-3, "name": "calibrated-cpu-cpu",
            "source": "x", "segment_overhead": 1e-4}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert HardwareProfile.load(path).to_dict() == data


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
    from ringattn import cost

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "cpu.json"
    args = ["--calibrate", "--device", "cpu", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--seq", "256",
            "--short", "64", "--repeat", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match="needs a group of 2\\+ ranks"):
        cost.main(args)
    cost.main(args + ["--p2p-bandwidth", "2e9"])
    prof = HardwareProfile.load(out)
    assert prof.flops > 0 and prof.segment_overhead >= 0 and prof.p2p_bandwidth == 2e9
    assert prof.name == "calibrated-cpu-cpu" and "Hq=2 Hkv=1 D=16" in prof.source


def _measure_links(rank, cp, _):
    import torch.distributed as dist

    from ringattn.cost import measure_a2a, measure_p2p

    bw, small = measure_p2p(dist.group.WORLD, torch.device("cpu"), 1 << 16, 2, lambda: None)
    return bw, small, measure_a2a(dist.group.WORLD, torch.device("cpu"), 1 << 16, 2, lambda: None)


def test_calibration_measures_p2p_and_all_to_all_over_the_group(rank_pools):
    results = [res for status, res in rank_pools(2).run(_measure_links) if status == "ok"]
    assert len(results) == 2
    for bw, small, a2a in results:
        assert bw > 0 and small > 0 and (a2a is None or a2a > 0)
    assert results[0][0] == results[1][0], "every rank reports the slowest rank's bandwidth"

"""megatron-core GPT with ringattn: CP=2 equals CP=1, CP off equals dense document-masked attention."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'ringattn[megatron]')")

from .dist import run_ranks, unwrap  # noqa: E402
from .megatron_cases import hybrid_runs, loss_and_grads_cases  # noqa: E402


def compare(a, b, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= rtol * abs(loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        ga, gb = grads_a[name], grads_b[name]
        err = (ga - gb).abs().max().item()
        assert err <= atol + rtol * gb.abs().max().item(), f"{name}: max abs difference {err:.3e}"


SOFTMAX_TYPES = ("learnable", "off-by-one")
#: a causal window of 5 keys on every layer (TransformerConfig.window_size) with megatron's softmax_type sinks
WINDOWED = {st: {"window": 5, "softmax_type": st} for st in SOFTMAX_TYPES}
CP1_CASES = {
    "sbhd": {"format": "sbhd"},
    "sbhd 1 sample": {"format": "sbhd", "samples": 1},
    **{f"window {st}": args for st, args in WINDOWED.items()},
    # megatron-core's own attention last: the CPU patches it needs stay in the process
    "dense": {"spec": "dense"},
    **{f"dense window {st}": {**args, "spec": "dense"} for st, args in WINDOWED.items()},
}
CP2_CASES = {
    **{f"sbhd {s}": {"format": "sbhd", "strategy": s} for s in ("zigzag", "balanced", "auto")},
    "thd 1 sample": {"format": "thd", "samples": 1},
    **{f"window {st} {s}": {**args, "strategy": s} for st, args in WINDOWED.items() for s in ("zigzag", "balanced")},
}


def _ok(runs, name):
    status, value = runs[name]
    assert status == "ok", f"{name}: {value}"
    return value


@pytest.fixture(scope="module")
def cp1():
    """Every CP=1 run in one process (megatron-core takes seconds to import): name -> (loss, grads)."""
    return unwrap(run_ranks(1, loss_and_grads_cases, CP1_CASES))[0]


@pytest.fixture(scope="module")
def cp2():
    """Every CP=2 run in one pair of processes: per rank, name -> (loss, grads) (CP-summed, so equal on both)."""
    return unwrap(run_ranks(2, loss_and_grads_cases, CP2_CASES))


def test_cp2_equals_cp1_sbhd(cp1, cp2):
    """get_batch with the zigzag, balanced and auto layouts: same loss and gradients as CP=1."""
    for runs in cp2:  # every CP rank holds the same global loss and summed gradients
        for strategy in ("zigzag", "balanced", "auto"):
            compare(_ok(runs, f"sbhd {strategy}"), _ok(cp1, "sbhd"))


def test_cp2_thd_equals_cp1_sbhd(cp1, cp2):
    for runs in cp2:
        compare(_ok(runs, "thd 1 sample"), _ok(cp1, "sbhd 1 sample"))


def test_cp_off_equals_dense_document_masked_attention(cp1):
    compare(_ok(cp1, "sbhd"), _ok(cp1, "dense"))


@pytest.mark.parametrize("softmax_type", SOFTMAX_TYPES)
def test_window_and_sinks_equal_dense_document_masked_attention(softmax_type, cp1, cp2):
    """TransformerConfig.window_size (a causal window of 5 keys on every layer) and softmax_type sinks: CP=2
    (zigzag, balanced) and CP off equal megatron-core's own attention with the documents and the window in its mask
    and its own softmax_offset (the learnable sinks' gradient included)."""
    dense = _ok(cp1, f"dense window {softmax_type}")
    compare(_ok(cp1, f"window {softmax_type}"), dense)
    if softmax_type == "learnable":
        assert any(name.endswith("core_attention.softmax_offset") for name in dense[1])
    plain = _ok(cp1, "dense")
    assert abs(plain[0] - dense[0]) > 1e-4, "not vacuous: the window and the sinks change the reference's loss"
    for runs in cp2:
        for strategy in ("zigzag", "balanced"):
            compare(_ok(runs, f"window {softmax_type} {strategy}"), dense)


def test_layer_window_follows_megatron_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn.adapters.megatron import layer_window

    cfg = dict(num_layers=4, hidden_size=64, num_attention_heads=4)
    assert layer_window(TransformerConfig(**cfg), 1) is None
    assert layer_window(TransformerConfig(**cfg, window_size=(127, 0)), 3) == 128
    assert layer_window(TransformerConfig(**cfg, window_size=(-1, 0)), 1) is None
    skip = TransformerConfig(**cfg, window_size=(7, 0), window_attn_skip_freq=2)  # every second layer is full
    assert [layer_window(skip, n) for n in (1, 2, 3, 4)] == [8, None, 8, None]
    with pytest.raises(ValueError, match=r"window_size: ringattn runs causal sliding windows, \(left, 0\)"):
        layer_window(TransformerConfig(**cfg, window_size=(7, 3)), 1)


def test_get_batch_slices_for_cp_before_the_pipeline_early_return(monkeypatch):
    """A middle pipeline stage still receives the layout and its shard of the reset position ids."""
    import torch

    import ringattn.adapters.megatron as adapter
    from ringattn import DocLayout, eod_metadata

    from .megatron_cases import EOD, batch_tokens

    ps = adapter.parallel_state
    for name, value in [
        ("model_parallel_is_initialized", True),
        ("get_context_parallel_world_size", 2),
        ("get_context_parallel_rank", 1),
        ("is_pipeline_first_stage", False),
        ("is_pipeline_last_stage", False),
        ("get_tensor_model_parallel_rank", 0),
    ]:
        monkeypatch.setattr(ps, name, lambda *a, _v=value, **kw: _v)
    raw = batch_tokens()
    out = adapter.get_batch(iter([raw]), EOD)
    assert set(out) == {"packed_seq_params", "position_ids"}
    layout = out["packed_seq_params"].layout
    assert layout == DocLayout.from_tokens(raw["tokens"], EOD, 2)
    want = eod_metadata(raw["tokens"], EOD).position_ids.reshape(-1)[layout.local_indices(1)]
    assert torch.equal(out["position_ids"].reshape(-1), want)
    assert adapter.is_dataset_built_on_rank()
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 1)
    assert not adapter.is_dataset_built_on_rank()
    monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **kw: True)
    full = adapter.get_batch(iter([raw]), EOD)
    assert full["tokens"].shape == (2, 16) and "attention_mask" not in full


def test_core_attention_rejects_dropout():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn.adapters.megatron import RingEoDCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout"):
        RingEoDCoreAttention(cfg, 1, AttnMaskType.causal, "self")


def test_example_trains_with_decreasing_loss():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(root / "examples/megatron/pretrain_gpt_eod.py"),
        "--context-parallel-size",
        "2",
        "--reset-attention-mask",
        "--reset-position-ids",
        "--attention-mask-type",
        "general",
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", res.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0], res.stdout


def test_layer_spec_passes_the_comm_shape():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn.adapters.megatron import RingEoDCoreAttention, ringattn_layer_spec

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, attention_dropout=0.0)
    for comm in (None, "ring"):
        build = ringattn_layer_spec(comm=comm).submodules.self_attention.submodules.core_attention
        module = build(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        assert isinstance(module, RingEoDCoreAttention) and module.comm == comm


def test_megatron_hybrid_ulysses_cp_equals_cp1(rank_pools):
    """megatron-core's own hierarchical CP config: CP=4 as 2x2 ("a2a+p2p") and 4x1 ("a2a"), a 1x4 hierarchy
    (degrades to the ring) and TP=2 x CP=2 ("a2a", KV heads replicated per TP rank) equal CP=1 in loss and
    CP-summed gradients, EoD reset; refused configurations raise the same ValueError on every rank."""
    from .megatron_cases import HYBRID_RUNS

    results = unwrap(rank_pools(4).run(hybrid_runs, list(HYBRID_RUNS)))
    for rank, (runs, refused) in enumerate(results):
        ref = runs["tp1 cp1"][:2]
        for name in ("cp4 a2a+p2p 2x2", "cp4 a2a 4x1", "cp4 a2a+p2p 1x4 (ring)"):
            compare(runs[name][:2], ref)
        assert runs["tp2 cp2 a2a"][2] == runs["tp2 cp1"][2], "same TP rank, same weight shards"
        compare(runs["tp2 cp2 a2a"][:2], runs["tp2 cp1"][:2])
        expect = {
            "all_gather": "cp_comm_type='all_gather' is not supported",
            "per-layer list": "cp_comm_type: per-layer lists are not supported",
            "unknown": "cp_comm_type: expected one of",
            "sizes disagree": "hierarchical_context_parallel_sizes: the config says [4, 1], megatron's hierarchical CP "
            "groups have sizes [2, 2]",
            "swapped groups": "groups: CP rank 0 (global rank 0) has Ulysses group [0, 2] and ring group [0, 1]",
            "sizes not multiplying to CP": "groups: the Ulysses group size (4) times the ring group size (2) must "
            "equal the CP size (4)",
            "no hierarchical groups": "cp_comm_type='a2a+p2p' needs megatron's two hierarchical CP groups",
            "cp_ulysses_size without sizes": "hierarchical_context_parallel_sizes: cp_comm_type='a2a+p2p' needs [U, R]",
            "batch sharded for the ring": "packed_seq_params.layout: ulysses_size 1, but cp_comm_type='a2a+p2p' runs "
            "ulysses_size 2",
        }
        for name, text in expect.items():
            assert refused[name] is not None and text in refused[name], (rank, name, refused[name])
    for name in results[0][1]:
        assert len({refused[name] for _, refused in results}) == 1, f"{name}: ranks disagree"


def test_plain_packed_seq_params_layout_is_derived_once_per_batch():
    """From a plain thd PackedSeqParams the core attention derives the zigzag layout once per batch (reading
    cu_seqlens_q back to the host), and every later layer gets the same object (so its plan and agreement too)."""
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    from ringattn import DocLayout
    from ringattn.adapters.megatron import RingEoDCoreAttention

    core = SimpleNamespace(cp_group=None, ulysses_size=1, cp_comm_type=None)  # what _layout reads (CP off)
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    with mock.patch.object(DocLayout, "from_cu_seqlens", side_effect=DocLayout.from_cu_seqlens) as built:
        layouts = [RingEoDCoreAttention._layout(core, params, 16) for _ in range(3)]  # three layers, one batch
        assert built.call_count == 1
        assert all(layout is layouts[0] for layout in layouts)
        assert layouts[0].cu_seqlens == (0, 5, 9, 16) and layouts[0].strategy == "zigzag"
        other = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu.clone(), cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
        )
        RingEoDCoreAttention._layout(core, other, 16)  # a new batch derives its own
        assert built.call_count == 2

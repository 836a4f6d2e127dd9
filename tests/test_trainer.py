"""ringattn.adapters.trainer: transformers' Trainer and TRL's SFTTrainer with context parallelism (CPU, gloo).

Exactness: ``RingAttnTrainer`` / ``RingAttnSFTTrainer`` (TRL packing, padding-free) at CP 2 and 4, 2 DP x 2 CP
and Ulysses 2 x ring 2, with gradient accumulation 1 and 2, train tiny random-init Llama and Qwen3 models for 3
AdamW steps; the reference is the plain ``Trainer`` / ``SFTTrainer`` in one process on the same global batches
(transformers' ``sdpa`` attention, no ringattn). The logged losses, the first step's synchronised gradients, the
final weights and the eval loss agree to float32 rounding (1e-5). Refusals raise the same ValueError on every rank.
The two examples run on the pools.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install 'ringattn[transformers]')")
pytest.importorskip("accelerate", reason="accelerate not installed (pip install 'ringattn[trainer]')")
pytest.importorskip("trl", reason="trl not installed (pip install 'ringattn[trainer]')")

import torch  # noqa: E402

from . import trainer_cases as T  # noqa: E402
from . import transformers_cases as tc  # noqa: E402
from .dist import unwrap  # noqa: E402

TOL = 1e-5
#: bf16 mixed precision: measured 1e-4 between ringattn and sdpa under autocast (the weights, after AdamW's sign-like
#: first updates on bf16-rounded gradients, differ by up to ~lr per step and are not compared)
BF16_LOSS_TOL = 2e-3
STEPS = 3

# (label, world, case): trainer "trainer" (RingAttnTrainer + DataCollatorWithFlattening) or "sft" (RingAttnSFTTrainer,
# packing=True); cp, ulysses (U x ring), ga: gradient accumulation steps; eval: an eval set, evaluate() after training
CASES = [
    ("Trainer llama CP2 ga1 +eval", 2, dict(trainer="trainer", model="llama", cp=2, ga=1, eval=True)),
    (
        "Trainer qwen3 CP2 ga2 checkpointing cu_seq_lens",
        2,
        dict(trainer="trainer", model="qwen3", cp=2, ga=2, flash_kwargs=True, args={"activation_checkpointing": True}),
    ),
    ("SFT llama CP2 ga1 packing +eval", 2, dict(trainer="sft", model="llama", cp=2, ga=1, eval=True)),
    (
        "SFT qwen3 CP2 ga2 packing padding_free ringattn_trainer(SFTTrainer)",
        2,
        dict(trainer="sft", model="qwen3", cp=2, ga=2, padding_free=True, factory=True),
    ),
    # each CP group's own label count (with one DP group: still the single-device gradient)
    (
        "Trainer llama CP2 ga2 average_tokens_across_devices=False",
        2,
        dict(trainer="trainer", model="llama", cp=2, ga=2, args={"average_tokens_across_devices": False}),
    ),
    # SFTConfig's default bf16=True (autocast on float32 weights), against the plain SFTTrainer under the same autocast
    (
        "SFT llama CP2 ga1 bf16 mixed precision",
        2,
        dict(trainer="sft", model="llama", cp=2, ga=1, bf16=True, sft_args={"bf16": True}),
    ),
    ("Trainer qwen3 CP4 ga1", 4, dict(trainer="trainer", model="qwen3", cp=4, ga=1)),
    ("Trainer llama CP4 ga2", 4, dict(trainer="trainer", model="llama", cp=4, ga=2)),
    ("Trainer llama 2DPx2CP ga1 +eval", 4, dict(trainer="trainer", model="llama", cp=2, ga=1, eval=True)),
    ("Trainer qwen3 2DPx2CP ga2", 4, dict(trainer="trainer", model="qwen3", cp=2, ga=2)),
    ("Trainer llama hybrid U2xR2 ga1", 4, dict(trainer="trainer", model="llama", cp=4, ulysses=2, ga=1)),
    ("Trainer qwen3 hybrid U2xR2 ga2", 4, dict(trainer="trainer", model="qwen3", cp=4, ulysses=2, ga=2)),
    ("SFT llama CP4 ga1", 4, dict(trainer="sft", model="llama", cp=4, ga=1)),
    ("SFT qwen3 CP4 ga2", 4, dict(trainer="sft", model="qwen3", cp=4, ga=2)),
    ("SFT qwen3 2DPx2CP ga1", 4, dict(trainer="sft", model="qwen3", cp=2, ga=1)),
    ("SFT llama 2DPx2CP ga2 +eval", 4, dict(trainer="sft", model="llama", cp=2, ga=2, eval=True)),
    ("SFT qwen3 hybrid U2xR2 ga1", 4, dict(trainer="sft", model="qwen3", cp=4, ulysses=2, ga=1)),
    ("SFT llama hybrid U2xR2 ga2", 4, dict(trainer="sft", model="llama", cp=4, ulysses=2, ga=2)),
]

# (what, world, message every rank must raise); 'rank-specific' ones put the bad input on some ranks only
REFUSALS = [
    ("compute_metrics", 2, "compute_metrics: under context parallelism each rank holds a shard of the logits"),
    ("compute_loss_func", 2, "compute_loss_func: a custom loss gets this rank's shard of the outputs"),
    ("label_smoothing", 2, "label_smoothing_factor: the label smoother shifts this rank's shard of the labels"),
    ("label_smoothing_rank1", 2, "rank 1: label_smoothing_factor: the label smoother shifts"),
    ("predict_with_generate", 2, "predict_with_generate: generation runs the model without a packed batch"),
    ("batch_rebalance", 2, "train_sampling_strategy: 'batch_rebalance' balances batches over every rank"),
    ("cp_size_3", 2, "cp_size: 3 does not divide the 2 processes"),
    (
        "cp_size_differs",
        2,
        "cp_size/ulysses_size/strategy: the ranks passed different values [(1, 1, 'zigzag'), (2, 1, 'zigzag')]",
    ),
    ("ulysses_3", 2, "ulysses_size: 3 does not divide cp_size=2"),
    ("predict", 2, "predict: under context parallelism each rank holds a shard of the logits"),
    ("padding", 2, "attention_mask: ringattn takes documents, not padding masks"),
    ("padding_sft", 2, "attention_mask: ringattn takes documents, not padding masks"),
    ("extra_key", 2, "batch: ringattn shards packed token batches"),
    ("iterable", 2, "dataloader: accelerate prepared a DataLoaderDispatcher"),
    ("fsdp", 2, "deepspeed/fsdp: ringattn's Trainer supports DistributedDataParallel only"),
    ("moe", 2, "output_router_logits: a mixture-of-experts load-balancing loss is a per-rank mean"),
    ("not_pretrained", 2, "model: expected a transformers PreTrainedModel"),
    ("loss_without_shift_labels", 2, "loss_function: <lambda> takes no shift_labels"),
    ("no_loss_kwargs", 2, "model: its forward takes no loss kwargs (num_items_in_batch)"),
    ("eval_logits", 2, "prediction_loss_only: under context parallelism each rank holds a shard of the logits"),
    ("padding_one_dp_group", 4, "rank 2 (and ranks [3]): attention_mask: ringattn takes documents, not padding masks"),
    ("strided_groups", 4, "cp_groups: rank 0's CP group has ranks [0, 2], expected [0, 1]"),
]

# world: (example, argv). At --lr 1e-3: AdamW's first update lr * g / (|g| + eps) magnifies a rounding difference in a
# gradient element near eps; at the examples' default 3e-3 one element of sft_trl's up_proj ends 1.6e-5 apart at CP 2
# after a single step (bitwise equal at CP 1), at 1e-3 5e-6
EXAMPLES = {
    2: [
        ("train_trainer", ["--steps", "3", "--ga", "2", "--lr", "1e-3"]),
        ("sft_trl", ["--steps", "3", "--lr", "1e-3"]),
    ],
    4: [
        ("sft_trl", ["--steps", "3", "--cp", "2", "--ga", "2", "--lr", "1e-3"]),
        ("train_trainer", ["--steps", "3", "--ulysses", "2", "--lr", "1e-3"]),
    ],
}


def _case(spec: dict, world: int, setups: dict) -> dict:
    state, train, evaluation = setups[spec["model"]]
    return {
        **spec,
        "world": world,
        "state": state,
        "train": train,
        "per_device": 2,
        "steps": STEPS,
        "eval": evaluation if spec.get("eval") else None,
    }


@pytest.fixture(scope="module")
def setups():
    """Per model: initial weights, training documents, eval documents (the same for every case and rank)."""
    return {
        kind: (tc.build(kind, seed=7).state_dict(), T.documents(96, seed=3), T.documents(16, seed=4))
        for kind in ("llama", "qwen3")
    }


@pytest.fixture(scope="module")
def results(setups, rank_pools):
    """Every case's reference (this process) and ringattn run (one job per pool), refusals and examples."""
    out = {}
    for world in (2, 4):
        rows = [
            (label, _case(spec, world, setups))
            for label, spec, w in ((label, spec, w) for label, w, spec in CASES)
            if w == world
        ]
        payload = {
            "cases": [c for _, c in rows],
            "refusals": [w for w, n, _ in REFUSALS if n == world],
            "examples": EXAMPLES[world],
            "base": _case(dict(trainer="trainer", model="llama", cp=world, ga=1), world, setups),
        }
        per_rank = unwrap(rank_pools(world).run(T.job, payload, timeout_s=600))
        for i, (label, case) in enumerate(rows):
            out[label] = (T.reference(case), [r["cases"][i] for r in per_rank])
        out[("refusals", world)] = [r["refusals"] for r in per_rank]
        out[("examples", world)] = [r["examples"] for r in per_rank]
    return out


def max_diffs(ref: dict, ranks: list) -> tuple[float, float, float | None, float]:
    """(max |loss diff| over steps, max |weight diff|, |eval loss diff| or None, max |first-step gradient diff|)
    of rank 0 against the reference."""
    got = ranks[0]
    loss = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    weights = max((got["state"][k] - v).abs().max().item() for k, v in ref["state"].items())
    ev = abs(got["eval_loss"] - ref["eval_loss"]) if "eval_loss" in ref else None
    grads = max((got["grads"][k] - v).abs().max().item() for k, v in ref["grads"].items())
    return loss, weights, ev, grads


@pytest.mark.parametrize("label", [label for label, _, _ in CASES])
def test_trainer_equals_single_process_training(label, results):
    ref, ranks = results[label]
    assert len(ref["losses"]) == STEPS and all(len(r["losses"]) == STEPS for r in ranks), (ref["losses"], ranks)
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks), "every rank logs the same (true) loss"
    assert ranks[0]["state"].keys() == ref["state"].keys()
    loss, weights, ev, grads = max_diffs(ref, ranks)
    if dict((c[0], c[2]) for c in CASES)[label].get("bf16"):
        assert loss <= BF16_LOSS_TOL, f"{label}: logged losses {ranks[0]['losses']} vs single process {ref['losses']}"
        return
    assert loss <= TOL, f"{label}: logged losses {ranks[0]['losses']} vs single process {ref['losses']}"
    assert weights <= TOL, f"{label}: final weights off by {weights:.2e}"
    assert grads <= TOL, f"{label}: the first step's synchronised gradients off by {grads:.2e}"
    if ev is not None:
        assert ev <= TOL and all(r["eval_loss"] == ranks[0]["eval_loss"] for r in ranks), (label, ranks, ref)


@pytest.mark.parametrize("label", [label for label, _, _ in CASES[:1]])
def test_the_weights_moved(label, results, setups):
    """Not vacuous: three AdamW steps move the weights far beyond the tolerance."""
    ref, ranks = results[label]
    init = setups["llama"][0]
    assert max((ranks[0]["state"][k] - v).abs().max().item() for k, v in init.items()) > 1e-3


@pytest.mark.parametrize("what, world, message", REFUSALS)
def test_refusals_raise_on_every_rank(what, world, message, results):
    names = [w for w, n, _ in REFUSALS if n == world]
    per_rank = [r[names.index(what)] for r in results[("refusals", world)]]
    messages = [m for m, _ in per_rank]
    assert all(m is not None for m in messages), f"{what}: some rank did not refuse: {messages}"
    assert len(set(messages)) == 1, f"{what}: ranks raised different errors: {messages}"
    assert message in messages[0], messages[0]
    assert all(steps <= 0 for _, steps in per_rank), f"{what}: refused after an optimizer step"


@pytest.mark.parametrize("world, index", [(2, 0), (2, 1), (4, 0), (4, 1)])
def test_examples_match_the_single_process_reference(world, index, results):
    """examples/transformers/train_trainer.py and sft_trl.py on the pools: every step's loss and the final weights
    equal the single-process loop's (what they print side by side)."""
    per_rank = [r[index] for r in results[("examples", world)]]
    pairs, diff = per_rank[0]
    assert all(p == per_rank[0] for p in per_rank), "every rank logs the same losses"
    assert len(pairs) == STEPS and all(abs(a - b) <= TOL for a, b in pairs), pairs
    assert diff <= TOL, f"{EXAMPLES[world][index]}: final weights off by {diff:.2e}"
    assert pairs[-1][0] < pairs[0][0], pairs


def test_single_process_trainer_is_the_plain_trainer(setups):
    """World size 1 (no process group): RingAttnTrainer at CP 1 trains like the plain Trainer."""
    case = _case(dict(trainer="trainer", model="qwen3", cp=1, ga=2, eval=True), 1, setups)
    ref = T.reference(case)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        store: dict = {}
        trainer = T.trainer_for(case, out, 2, ringattn=True, callbacks=[T.grad_capture(store)])
        trainer.train()
        got = T._summary(trainer, True, store)
    assert trainer.model.config._attn_implementation == "ringattn"
    loss, weights, ev, grads = max_diffs(ref, [got])
    assert loss <= TOL and weights <= TOL and ev <= TOL and grads <= TOL, (loss, weights, ev, grads)


def test_mixed_precision_runs_the_attention_in_the_autocast_dtype(setups):
    """bf16 autocast on float32 weights (SFTConfig's default bf16=True): RoPE leaves q and k in float32 while v is
    bf16; the attention runs all three in bf16, as transformers' own kernels do, close to sdpa under autocast."""
    from ringattn.adapters.transformers import prepare_model, shard_batch

    state = setups["llama"][0]
    model, ref = prepare_model(tc.build("llama", state)), tc.build("llama", state)
    batch = tc.collator_batch(tc.documents())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**shard_batch(batch)).loss
        want = ref(**batch, use_cache=False).loss
    got.backward()
    assert abs(got.item() - want.item()) <= 2e-2, (got.item(), want.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_ringattn_trainer_takes_trainer_classes_only():
    from ringattn.adapters.trainer import ringattn_trainer

    with pytest.raises(ValueError, match="trainer_cls: expected a transformers.Trainer subclass"):
        ringattn_trainer(dict)

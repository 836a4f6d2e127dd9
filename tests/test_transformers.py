"""transformers adapter against real transformers models (tiny Llama and Qwen3 from config, CPU, gloo).

Exactness: a packed batch at CP 1, 2, 4 (zigzag and balanced layouts, with and without gradient
checkpointing), and at CP=4 as Ulysses x ring 2x2 and pure Ulysses 4x1 (CPGroups), gives the loss and
CP-summed gradients of the same weights run in float64 with transformers' own attention on every
document as its own unpacked sequence.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install 'ringattn[transformers]')")

import torch  # noqa: E402

from . import transformers_cases as tc  # noqa: E402
from .dist import unwrap  # noqa: E402

TOL = 1e-5
EOD_SAMPLES = ((5, 11, 8), (9, 3, 1, 11))  # two samples of 24 tokens, EoD-terminated documents
ODD_LENS = (5, 11, 1, 9, 3, 8)  # 37 tokens: pure Ulysses at CP=4 pads them to 40 (each ring rank's tokens in 4 parts)


def assert_close(got, want, what):
    loss, grads, logits = got[:3]
    ref_loss, ref_grads, ref_logits = want
    assert abs(loss - ref_loss) <= TOL, f"{what}: loss {loss!r} vs unpacked reference {ref_loss!r}"
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        err = (g.double() - ref_grads[name]).abs().max().item()
        assert err <= TOL, f"{what}: {name} gradient off by {err:.2e}"
    if logits is not None:
        err = (logits.double().reshape(ref_logits.shape) - ref_logits).abs().max().item()
        assert err <= TOL, f"{what}: gathered logits off by {err:.2e}"


@pytest.fixture(scope="module")
def setups():
    """Per model kind: weights, the collator batch and EoD batch, and their float64 unpacked references."""
    out = {}
    docs = tc.documents()
    eod_samples = [tc.documents(lens, seed=2 + i, eod=True) for i, lens in enumerate(EOD_SAMPLES)]
    eod_docs = [d for sample in eod_samples for d in sample]
    for kind in ("llama", "qwen3"):
        state = tc.build(kind, seed=7).state_dict()
        out[kind] = {
            "state": state,
            "collator": (tc.collator_batch(docs), tc.reference(kind, state, docs, sum(len(d) - 1 for d in docs))),
            "eod": (tc.eod_batch(eod_samples), tc.reference(kind, state, eod_docs, sum(len(d) - 1 for d in eod_docs))),
        }
    odd = tc.documents(ODD_LENS, seed=3)
    out["llama"]["odd"] = (
        tc.collator_batch(odd),
        tc.reference("llama", out["llama"]["state"], odd, sum(len(d) - 1 for d in odd)),
    )
    return out


def cases_for(cp, setups):
    """(label, case, reference) for one CP size: both models x both strategies, EoD input, checkpointing."""
    rows = []
    for kind in ("llama", "qwen3"):
        for strategy in ("zigzag", "balanced"):
            rows.append((f"{kind} {strategy}", dict(kind=kind, strategy=strategy), "collator"))
    rows.append(("qwen3 balanced EoD [2, 24]", dict(kind="qwen3", strategy="balanced", eod_id=tc.EOD), "eod"))
    rows.append(("llama zigzag checkpointing", dict(kind="llama", strategy="zigzag", checkpointing=True), "collator"))
    rows.append(
        (
            "qwen3 balanced EoD checkpointing (reentrant)",
            dict(
                kind="qwen3",
                strategy="balanced",
                eod_id=tc.EOD,
                checkpointing=True,
                checkpointing_kwargs={"use_reentrant": True},
            ),
            "eod",
        )
    )
    out = []
    for label, case, batch_kind in rows:
        batch, ref = setups[case["kind"]][batch_kind]
        out.append((label, {**case, "state": setups[case["kind"]]["state"], "batch": batch}, ref))
    return out


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_packed_cp_equals_unpacked_documents(cp, setups, rank_pools):
    cases = cases_for(cp, setups)
    payload = [case for _, case, _ in cases]
    results = tc.run_cases(0, 1, payload) if cp == 1 else unwrap(rank_pools(cp).run(tc.run_cases, payload))[0]
    for (label, _, ref), got in zip(cases, results):
        assert_close(got, ref, f"CP={cp} {label}")


def test_no_mask_is_built(setups, monkeypatch):
    """With ringattn selected, transformers' mask builders never run (masking_utils returns early)."""
    from transformers import masking_utils

    from ringattn.adapters.transformers import prepare_model, shard_batch

    def forbidden(*args, **kwargs):
        raise AssertionError("a mask builder ran")

    for name in list(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, forbidden)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", forbidden)
    for kind in ("llama", "qwen3"):
        model = prepare_model(tc.build(kind, setups[kind]["state"]))
        out = model(**shard_batch(setups[kind]["collator"][0]))
        assert abs(out.loss.item() - setups[kind]["collator"][1][0]) <= TOL


def test_shared_config_is_not_switched():
    from transformers import LlamaForCausalLM

    from ringattn.adapters.transformers import prepare_model

    cfg = tc.config("llama")
    a, b = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    before = b.config._attn_implementation
    prepare_model(a)
    assert a.config._attn_implementation == "ringattn"
    assert b.config is cfg and cfg._attn_implementation == before != "ringattn"
    assert all(m.config is a.config for m in a.modules() if "config" in m.__dict__)  # no submodule kept the old one
    assert prepare_model(a) is a and a.config._attn_implementation == "ringattn"  # idempotent


def test_position_ids_filled_and_cache_off(setups):
    """A hand-built call without position_ids gets the context's reset ids, never the model's arange."""
    from ringattn.adapters.transformers import prepare_model, shard_batch

    model = prepare_model(tc.build("llama", setups["llama"]["state"]))
    inputs = shard_batch(setups["llama"]["collator"][0])
    full = model(**inputs)
    bare = {k: v for k, v in inputs.items() if k not in ("position_ids", "use_cache")}
    out = model(**bare)
    assert torch.equal(out.logits, full.logits) and out.loss.item() == full.loss.item()
    assert out.cache is None and full.cache is None
    with pytest.raises(ValueError, match="position_ids: expected this CP rank's"):
        model(**{**inputs, "position_ids": inputs["position_ids"][:, :-1]})


def test_a_sliding_window_no_shorter_than_every_document_is_exact(setups):
    """Qwen3 with sliding-window layers: a window of 11 tokens (the longest document) masks nothing."""
    from ringattn.adapters.transformers import prepare_model, shard_batch

    model = prepare_model(
        tc.build("qwen3", setups["qwen3"]["state"], use_sliding_window=True, sliding_window=11, max_window_layers=0)
    )
    assert set(model.config.layer_types) == {"sliding_attention"}
    out = model(**shard_batch(setups["qwen3"]["collator"][0]))
    assert abs(out.loss.item() - setups["qwen3"]["collator"][1][0]) <= TOL


def _refused_call(what, setups):
    from ringattn.adapters.transformers import attention_forward, prepare_model, shard_batch

    overrides = {"dropout": dict(attention_dropout=0.1)}.get(what, {})
    kind = "llama"
    model = prepare_model(tc.build(kind, **overrides)).train()
    inputs = shard_batch(setups[kind]["collator"][0])
    n = inputs["input_ids"].shape[1]
    if what == "dropout":
        return lambda: model(**inputs)
    if what == "mask4d":
        return lambda: model(**inputs, attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool))
    if what == "mask2d":
        return lambda: model(**inputs | {"attention_mask": torch.ones(1, n, dtype=torch.long)})
    if what == "output_attentions":
        return lambda: model(**inputs, output_attentions=True)
    if what == "use_cache":
        return lambda: model(**inputs | {"use_cache": True})
    if what == "no_context":
        return lambda: model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, n, 8)
    kv = torch.randn(1, 2, n, 8)
    extra = {
        "softcap": dict(softcap=30.0),
        "two sinks": dict(s_aux=torch.zeros(4), sinks=torch.zeros(4)),
        "sinks shape": dict(s_aux=torch.zeros(3)),
        "window": dict(sliding_window=0),
        "is_causal": dict(is_causal=False),
        "position_bias": dict(position_bias=torch.zeros(1, 4, n, n)),
        "cross": dict(),
    }[what]
    k = torch.randn(1, 2, n + 3, 8) if what == "cross" else kv
    return lambda: attention_forward(
        attn, q, k, k, None, scaling=8**-0.5, ringattn_context=inputs["ringattn_context"], **extra
    )


@pytest.mark.parametrize(
    "what, message",
    [
        ("dropout", "dropout: ringattn implements no attention dropout; expected 0, got 0.1"),
        ("softcap", "softcap: ringattn implements no logit soft-capping"),
        ("two sinks", "sinks: got both s_aux and sinks"),
        ("sinks shape", "sinks: expected shape [4] (one logit per query head)"),
        ("window", "window: expected a positive int"),
        ("position_bias", "position_bias: ringattn implements no additive attention bias"),
        ("is_causal", "is_causal: ringattn implements causal (decoder) attention only"),
        ("mask4d", "attention_mask: ringattn takes the documents from the context and builds no mask; got a 4-D mask"),
        ("mask2d", "attention_mask: ringattn takes the documents from the context and builds no mask; got a 2-D mask"),
        ("output_attentions", "output_attentions: ringattn never materialises attention weights"),
        ("use_cache", "use_cache: a KV cache of one CP shard is meaningless"),
        ("no_context", "ringattn_context: the ringattn attention needs the context of the batch"),
        ("cross", "key: expected as many tokens as the query"),
    ],
)
def test_refused_inputs(what, message, setups):
    call = _refused_call(what, setups)
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    "what, message",
    [
        ("mask", "rank 1: attention_mask: ringattn takes the documents from the context"),
        ("batch", "ranks disagree"),
    ],
)
def test_a_refusal_on_one_rank_raises_on_every_rank(what, message, rank_pools):
    results = unwrap(rank_pools(2).run(tc.refusal_on_one_rank, what, timeout_s=120))
    assert all(r is not None for r in results), results
    assert len(set(results)) == 1, "every rank raises the same ValueError"
    assert message in results[0]


def test_shard_batch_shifts_pads_and_counts():
    from ringattn.adapters.transformers import shard_batch

    docs = tc.documents((3, 4))
    batch = tc.collator_batch(docs)
    inputs = shard_batch(batch, pad_to_multiple_of=5)  # 7 tokens + a filler document of 3
    ids, pos = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
    assert ids == docs[0] + docs[1] + [0, 0, 0]
    assert pos == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    shift = inputs["shift_labels"][0].tolist()
    assert shift == docs[0][1:] + [-100] + docs[1][1:] + [-100] * 4  # no prediction crosses a document
    assert inputs["labels"][0].tolist() == [-100] + docs[0][1:] + [-100] + docs[1][1:] + [-100] * 3
    assert int(inputs["num_items_in_batch"]) == 5 and inputs["use_cache"] is False
    ctx = inputs["ringattn_context"]
    assert ctx.layout.cu_seqlens == (0, 3, 7, 10) and ctx.batch_shape == (1, 7)
    # the same documents from an EoD batch, and from position ids alone
    eod = shard_batch(
        {"input_ids": torch.tensor([docs[0][:-1] + [tc.EOD] + docs[1][:-1] + [tc.EOD]])},
        eod_id=tc.EOD,
        pad_to_multiple_of=5,
    )
    assert eod["ringattn_context"].layout.cu_seqlens == (0, 3, 7, 10)
    assert eod["shift_labels"][0].tolist()[:3] == docs[0][1:-1] + [tc.EOD, -100]  # predicts its EoD, not the next doc
    no_cu = {k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_len"))}
    assert shard_batch(no_cu, pad_to_multiple_of=5)["ringattn_context"].layout.cu_seqlens == (0, 3, 7, 10)


@pytest.mark.parametrize(
    "batch, kwargs, message",
    [
        (
            {"input_ids": torch.ones(1, 6, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])},
            {},
            "attention_mask: ringattn takes documents, not padding masks",
        ),
        (
            {"input_ids": torch.ones(1, 6, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 2, 5])},
            {},
            "cu_seq_lens_q: expected boundaries from 0 to 6",
        ),
        (
            {"input_ids": torch.ones(2, 4, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 2, 5, 8])},
            {},
            "cu_seq_lens_q: every sample boundary must be a document boundary; missing [4]",
        ),
        (
            {"input_ids": torch.ones(1, 6, dtype=torch.long), "labels": torch.ones(1, 5, dtype=torch.long)},
            {},
            "labels: expected shape (1, 6) (as input_ids), got (1, 5)",
        ),
        ({"input_ids": torch.ones(1, 6)}, {}, "input_ids: expected an integer tensor"),
        ({"labels": torch.ones(1, 6, dtype=torch.long)}, {}, "batch: expected input_ids"),
        ({"input_ids": torch.ones(1, 6, dtype=torch.long)}, {"group": "cp"}, "group: expected a torch.distributed"),
        ({"input_ids": torch.ones(1, 6, dtype=torch.long)}, {"pad_to_multiple_of": 0}, "pad_to_multiple_of: expected"),
        ({"input_ids": torch.ones(1, 6, dtype=torch.long)}, {"strategy": "nope"}, "strategy: expected one of"),
    ],
)
def test_shard_batch_refuses(batch, kwargs, message):
    from ringattn.adapters.transformers import shard_batch

    with pytest.raises(ValueError, match=re.escape(message)):
        shard_batch(batch, **kwargs)


def test_prepare_model_refuses_a_loss_without_shift_labels():
    from ringattn.adapters.transformers import prepare_model

    model = tc.build("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="loss_function: .* takes no shift_labels"):
        prepare_model(model)


def test_example_trains_at_cp2_with_the_losses_of_cp1(rank_pools):
    """examples/transformers/train_packed.py's training on the 2 gloo ranks of the pool (what torchrun
    --nproc-per-node 2 runs, minus the rendezvous): 4 AdamW steps, every loss equal to the CP=1 run's."""
    results = unwrap(rank_pools(2).run(tc.run_example, ["--steps", "4"]))
    assert results[0] == results[1], "every rank sees the same reduced loss"
    for cp_loss, ref_loss in results[0]:
        assert abs(cp_loss - ref_loss) <= TOL, results[0]
    assert results[0][-1][0] < results[0][0][0], results[0]


# ---------------------------------------------------------------------------------------------- Ulysses x ring
HYBRID_ROWS = [  # (label, case, batch kind, padded sample length): all at CP=4 on the 4-rank pool, one job
    ("hybrid 2x2 qwen3 zigzag", dict(kind="qwen3", strategy="zigzag", ulysses=2), "collator", 36),
    (
        "hybrid 2x2 qwen3 balanced EoD [2, 24]",
        dict(kind="qwen3", strategy="balanced", eod_id=tc.EOD, ulysses=2),
        "eod",
        24,
    ),
    (
        "hybrid 2x2 llama zigzag checkpointing",
        dict(kind="llama", strategy="zigzag", ulysses=2, checkpointing=True),
        "collator",
        36,
    ),
    # pure Ulysses: 4 query heads, 2 KV heads, each KV head replicated on 2 of the 4 Ulysses ranks
    (
        "ulysses 4x1 llama zigzag (KV heads replicated)",
        dict(kind="llama", strategy="zigzag", ulysses=4),
        "collator",
        36,
    ),
    (
        "ulysses 4x1 qwen3 zigzag (KV heads replicated)",
        dict(kind="qwen3", strategy="zigzag", ulysses=4),
        "collator",
        36,
    ),
    ("ulysses 4x1 llama zigzag, 37 tokens", dict(kind="llama", strategy="zigzag", ulysses=4), "odd", 40),
    (
        "ulysses 1x4 llama zigzag (CPGroups of the plain ring)",
        dict(kind="llama", strategy="zigzag", ulysses=1),
        "collator",
        40,
    ),
]

HYBRID_REFUSALS = [  # (label, ulysses, llama config overrides, ranks that get them), expected message
    (
        ("q heads % U, every rank", 4, dict(num_attention_heads=6, hidden_size=48), (0, 1, 2, 3)),
        "heads: q heads (6) must be a multiple of ulysses_size=4; use a Ulysses size that divides the query heads (the "
        "all-to-all scatters heads); this layer has 6 query and 2 KV heads (config num_attention_heads=6, "
        "num_key_value_heads=2) and the CP groups have ulysses_size=4",
    ),
    (
        (
            "kv heads vs U, every rank",
            2,
            dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48),
            (0, 1, 2, 3),
        ),
        "heads: k/v heads (3) must be a multiple or a divisor of ulysses_size=2 (split or replicated over the Ulysses "
        "ranks); use a Ulysses size that divides, or is a multiple of, the KV heads; this layer has 6 query and 3 KV "
        "heads (config num_attention_heads=6, num_key_value_heads=3)",
    ),
    (
        ("q heads % U, rank 2 only", 4, dict(num_attention_heads=6, hidden_size=48), (2,)),
        "rank 2: heads: q heads (6) must be a multiple of ulysses_size=4",
    ),
]


@pytest.fixture(scope="module")
def hybrid_job(setups, rank_pools):
    """The Ulysses x ring cases, the head refusals and the example at 2x2, in one job on the 4-rank pool."""
    cases = []
    for label, case, batch_kind, padded in HYBRID_ROWS:
        batch, ref = setups[case["kind"]][batch_kind]
        cases.append((label, {**case, "state": setups[case["kind"]]["state"], "batch": batch}, ref, padded))
    payload = ([case for _, case, _, _ in cases], [r for r, _ in HYBRID_REFUSALS], ["--steps", "3", "--ulysses", "2"])
    return cases, unwrap(rank_pools(4).run(tc.run_hybrid_job, payload))


def test_hybrid_and_ulysses_packed_cp4_equals_unpacked_documents(hybrid_job):
    """CP=4 as 2x2 (Ulysses x ring) and 4x1 (pure Ulysses, KV heads replicated): the loss, CP-summed gradients and
    gathered logits of the float64 per-document reference; each sample padded to what the split's layout needs."""
    cases, per_rank = hybrid_job
    results = per_rank[0][0]
    for (label, _, ref, padded), got in zip(cases, results):
        assert_close(got, ref, f"CP=4 {label}")
        assert got[3] == padded, f"{label}: padded to {got[3]}, expected {padded}"


def test_hybrid_ulysses_head_refusals_raise_on_every_rank_before_communication(hybrid_job):
    _, per_rank = hybrid_job
    for rank, (_, (messages, posted), _) in enumerate(per_rank):
        assert posted == 0, f"rank {rank} posted an all-to-all or P2P before refusing"
        for (case, expect), got in zip(HYBRID_REFUSALS, messages):
            assert got is not None and expect in got, (rank, case[0], got)
    for i, (case, _) in enumerate(HYBRID_REFUSALS):
        assert len({r[1][0][i] for r in per_rank}) == 1, f"{case[0]}: ranks raised different errors"


def test_example_trains_hybrid_2x2_with_the_losses_of_cp1(hybrid_job):
    """examples/transformers/train_packed.py --ulysses 2 on the 4-rank pool: CP=4 as 2x2, losses equal CP=1's."""
    _, per_rank = hybrid_job
    losses = [r[2] for r in per_rank]
    assert all(x == losses[0] for x in losses), "every rank sees the same reduced loss"
    for cp_loss, ref_loss in losses[0]:
        assert abs(cp_loss - ref_loss) <= TOL, losses[0]
    assert losses[0][-1][0] < losses[0][0][0], losses[0]


def test_shard_batch_hybrid_split_comes_from_the_groups():
    """Without a process group (CP size 1) an explicit ulysses_size that is not the groups' is refused."""
    from ringattn.adapters.transformers import shard_batch

    with pytest.raises(
        ValueError,
        match=re.escape(
            "ulysses_size: shard_batch takes the Ulysses split from the group (here 1), got ulysses_size=2"
        ),
    ):
        shard_batch({"input_ids": torch.ones(1, 8, dtype=torch.long)}, ulysses_size=2)


def _silent_path(what, setups):
    """A training step on shard_batch's output through attention that is not ringattn's (or without its positions)."""
    from ringattn.adapters.transformers import gather_logits, prepare_model, register, shard_batch

    inputs = shard_batch(setups["llama"]["collator"][0])
    if what.startswith("unprepared"):
        model = tc.build("llama", setups["llama"]["state"])  # still on sdpa
    elif what in ("sdpa", "eager"):
        model = prepare_model(tc.build("llama", setups["llama"]["state"]))
        model.set_attn_implementation(what)  # e.g. switched for generation, not switched back
    else:  # register() alone: attn_implementation set by hand, no pre-hook
        model = tc.build("llama", setups["llama"]["state"], attn_implementation=register())
        if what == "register without position_ids":
            inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    out = model(**inputs)
    if what == "unprepared, logits only":
        return lambda: gather_logits(out.logits, inputs["ringattn_context"])
    return out.loss.backward


@pytest.mark.parametrize(
    "what, when, message",
    [
        (
            "unprepared",
            "backward",
            "ringattn_context: this step's shard_batch output went through an attention that is not ringattn's",
        ),
        ("sdpa", "forward", "attn_implementation: the model runs 'sdpa' attention, not ringattn's 'ringattn'"),
        ("eager", "forward", "attn_implementation: the model runs 'eager' attention, not ringattn's 'ringattn'"),
        (
            "register without position_ids",
            "forward",
            "position_ids: the model did not get shard_batch's reset position",
        ),
    ],
)
def test_no_silent_wrong_training(what, when, message, setups):
    """Each way shard_batch's output could train through the wrong attention raises, naming the cause and the fix:
    in the forward where the model has ringattn's hook or attention, else in the backward of that step's loss."""
    if when == "forward":
        with pytest.raises(ValueError, match=re.escape(message)):
            _silent_path(what, setups)
        return
    step = _silent_path(what, setups)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        step()
    assert "prepare_model(model)" in str(err.value) and "set_attn_implementation('ringattn')" in str(err.value)


def test_register_alone_with_shard_batch_positions_is_exact(setups):
    """register() and attn_implementation by hand work when the model gets shard_batch's position_ids."""
    from ringattn.adapters.transformers import register, shard_batch

    model = tc.build("llama", setups["llama"]["state"], attn_implementation=register())
    out = model(**shard_batch(setups["llama"]["collator"][0]))
    out.loss.backward()  # the attended check passes
    assert abs(out.loss.item() - setups["llama"]["collator"][1][0]) <= TOL


def test_outputs_of_an_unprepared_model_are_refused_by_gather_logits(setups):
    import torch

    with torch.no_grad():
        gather = _silent_path("unprepared, logits only", setups)
    with pytest.raises(ValueError, match="no ringattn attention ran on this batch"):
        gather()

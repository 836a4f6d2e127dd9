"""Tiny transformers models and packed batches for test_transformers (also run inside gloo rank pools).

The reference is independent of ringattn: the same weights in float64 with transformers' own
``sdpa`` attention, every document run as its own unpacked sequence (positions from 0, plain
causal attention), the loss summed over documents with the packed batch's ``num_items_in_batch``.
"""

from __future__ import annotations

import torch

VOCAB = 64
EOD = 1
DOC_LENS = (5, 11, 1, 9, 3, 7)  # uneven, a single-token document, 36 tokens: padded for every CP size tested


def config(kind: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    common.update(overrides)
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    # sliding-window models, a window of 4 keys (shorter than most documents), sliding and full layers mixed
    if kind == "mistral":  # one config-wide window on every layer
        from transformers import MistralConfig

        return MistralConfig(**{"sliding_window": 4, **common})
    if kind == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            **{"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"], **common}
        )
    if kind == "gpt_oss":  # learned sinks on every layer; a tiny mixture of experts
        from transformers import GptOssConfig

        return GptOssConfig(
            **{
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
                "num_local_experts": 2,
                "num_experts_per_tok": 1,
                "experts_implementation": "eager",
                **common,
            }
        )
    raise ValueError(kind)


def build(kind: str, state=None, seed: int = 0, **overrides):
    """An fp32 causal LM from config; ``state``: a state dict to load (the same weights on every rank)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind, **overrides))
    if state is not None:
        model.load_state_dict(state)
    return model


def documents(lens=DOC_LENS, seed: int = 1, eod: bool = False):
    """Token lists of the given lengths (tokens >= 2; with ``eod`` each ends with the EoD token)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lens]
    if eod:
        docs = [d[:-1] + [EOD] for d in docs]
    return docs


def collator_batch(docs):
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])


def eod_batch(samples):
    """``[b, s]`` input_ids from lists of EoD-terminated documents per sample (equal total length per sample)."""
    rows = [sum(sample, []) for sample in samples]
    return {"input_ids": torch.tensor(rows)}


def reference(kind: str, state, docs, num_items: int):
    """float64 loss and gradients of every document run alone (transformers' sdpa attention)."""
    model = build(kind, state).double()
    total = 0.0
    logits = []
    for doc in docs:
        ids = torch.tensor([doc])
        out = model(input_ids=ids, labels=ids, num_items_in_batch=num_items, use_cache=False)
        out.loss.backward()
        total += out.loss.item()
        logits.append(out.logits.detach()[0])
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return total, grads, torch.cat(logits)


def cp_group(cp: int, ulysses=None):
    """The CP group of a case: None at CP=1, the world group (ring), or the world's CPGroups for ``ulysses``
    (tests.cases.cp_groups: created once per process, so every rank creates the subgroups in one order)."""
    import torch.distributed as dist

    if cp == 1:
        return None
    if ulysses is None:
        return dist.group.WORLD
    from .cases import cp_groups

    return cp_groups(ulysses)


def cp_loss_and_grads(rank: int, cp: int, case: dict):
    """One case on this rank: (CP-summed loss, CP-summed gradients, gathered logits, padded sample length), rank 0
    only. ``case["ulysses"]``: shard and attend over the world's CPGroups of that Ulysses size (hybrid/Ulysses)."""
    import torch.distributed as dist

    from ringattn.adapters.transformers import gather_logits, prepare_model, reduce_loss, shard_batch

    model = prepare_model(build(case["kind"], case["state"]))
    if case.get("checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=case.get("checkpointing_kwargs"))
    model.train()
    groups = cp_group(cp, case.get("ulysses"))
    inputs = shard_batch(case["batch"], groups, strategy=case["strategy"], eod_id=case.get("eod_id"))
    ctx = inputs["ringattn_context"]
    assert ctx.ulysses_size == (case.get("ulysses") or 1) and ctx.attention_group is (groups if cp > 1 else None)
    out = model(**inputs)
    out.loss.backward()
    loss = reduce_loss(out.loss, groups if case.get("ulysses") else ctx)  # a CPGroups sums over its cp group
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        for g in grads.values():
            dist.all_reduce(g)
    logits = gather_logits(out.logits.detach(), ctx)
    return (loss.item(), grads, logits, ctx.padded_len) if rank == 0 else None


def run_cases(rank: int, cp: int, cases):
    return [cp_loss_and_grads(rank, cp, c) for c in cases]


def refusal_on_one_rank(rank: int, cp: int, what: str):
    """A bad input on rank 1 only: every rank must raise the same ValueError (or None if nothing raised)."""
    import torch.distributed as dist

    from ringattn.adapters.transformers import prepare_model, shard_batch

    model = prepare_model(build("llama"))
    docs = documents()
    if what == "batch" and rank == 1:
        docs[0][0] = (docs[0][0] + 1) % VOCAB or 2  # a different token: ranks were fed different batches
    inputs = shard_batch(collator_batch(docs), dist.group.WORLD)
    if what == "mask" and rank == 1:
        n = inputs["input_ids"].shape[1]
        inputs["attention_mask"] = torch.ones(1, 1, n, n, dtype=torch.bool)
    try:
        model(**inputs)
    except ValueError as exc:
        return str(exc)
    return None


def run_example(rank: int, cp: int, argv):
    """examples/transformers/train_packed.py's train() on this pool's ranks: [(CP loss, CP=1 loss)] per step."""
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "transformers" / "train_packed.py"
    example = runpy.run_path(str(path), run_name="train_packed_example")
    return example["train"](example["parse_args"](argv), log=None)


def hybrid_refusals(rank: int, cp: int, cases):
    """Head counts the Ulysses split cannot scatter, through the adapter: per case (label, ulysses, config overrides,
    ranks that get them) the ValueError this rank raised (None if none), and the all-to-all/P2P posts before it."""
    import torch.distributed as dist

    from ringattn.adapters.transformers import prepare_model, shard_batch

    posted = []
    real_a2a, real_p2p = dist.all_to_all_single, dist.batch_isend_irecv
    dist.all_to_all_single = lambda *a, **k: (posted.append("a2a"), real_a2a(*a, **k))[1]
    dist.batch_isend_irecv = lambda ops: (posted.append("p2p"), real_p2p(ops))[1]
    out = []
    try:
        for _, ulysses, overrides, bad_ranks in cases:
            model = prepare_model(build("llama", **(overrides if rank in bad_ranks else {})))
            inputs = shard_batch(collator_batch(documents()), cp_group(cp, ulysses))
            try:
                model(**inputs)
                out.append(None)
            except ValueError as exc:
                out.append(str(exc))
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real_a2a, real_p2p
    return out, len(posted)


def run_hybrid_job(rank: int, cp: int, payload):
    """One pool job for the hybrid/Ulysses transformers tests: exactness cases, head refusals, the example."""
    cases, refusals, example_argv = payload
    return run_cases(rank, cp, cases), hybrid_refusals(rank, cp, refusals), run_example(rank, cp, example_argv)

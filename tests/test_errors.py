"""docs/errors.md, walked: every row's error is provoked and its message holds both the excerpt and the remedy.

Each row of the table has an ``id``; :data:`LOCAL` provokes it in this process, :func:`_multi_rank` (CP 4 on gloo)
the ones that need a process group. Every row must have a trigger and every trigger a row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ringattn
import ringattn.adapters
import ringattn.sharding
import ringattn.workloads
from ringattn import DocLayout

from .dist import run_ranks, unwrap

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def table() -> dict[str, tuple[str, str]]:
    """``id -> (message excerpt, remedy excerpt)`` from docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("id", "---"):
            continue
        message, remedy = (re.search(r"`(.+)`", c).group(1) for c in cells[2:])
        rows[cells[0]] = (message, remedy)
    return rows


def _qkv(n=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return torch.randn(n, hq, d).to(dtype), torch.randn(n, hkv, d).to(dtype), torch.randn(n, hkv, d).to(dtype)


ONE = DocLayout.from_cu_seqlens([0, 5, 8], 1)


def _attn(*, qkv=None, layout=ONE, **kw):
    return lambda: ringattn.ring_eod_attention(*(qkv or _qkv()), layout, **kw)


def _without_window_support(run):
    """``run()`` with a backend registered that does not declare ``SUPPORTS_WINDOW`` (every built-in one does)."""
    from ringattn.kernels import BACKENDS

    BACKENDS["no-window"] = "tests.no_window_backend"
    try:
        return run()
    finally:
        del BACKENDS["no-window"]


def _hf(what):
    """transformers triggers on a tiny Llama at CP 1."""

    def run():
        from ringattn.adapters.transformers import attention_forward, prepare_model, register, shard_batch

        from . import transformers_cases as tc

        batch = tc.collator_batch(tc.documents())
        if what == "hf-pad-mask":
            return shard_batch({**batch, "attention_mask": torch.zeros_like(batch["input_ids"])})
        if what == "hf-labels":
            return shard_batch({**batch, "labels": batch["input_ids"][:, :-1]})
        if what == "hf-input-ids":
            return shard_batch({})
        if what == "hf-cu":
            return shard_batch({"input_ids": torch.arange(2, 18).reshape(2, 8), "cu_seq_lens_q": [0, 5, 16]})
        if what == "hf-ulysses":
            return shard_batch(batch, ulysses_size=2)
        if what == "hf-loss":
            model = tc.build("llama")
            model.loss_function = lambda logits, labels, **kwargs: logits.sum()
            return prepare_model(model)
        if what == "hf-unprepared":
            out = tc.build("llama")(**shard_batch(batch))
            return out.loss.backward()
        if what == "hf-positions":
            model = tc.build("llama", attn_implementation=register())
            return model(**{k: v for k, v in shard_batch(batch).items() if k != "position_ids"})
        model = prepare_model(tc.build("llama", attention_dropout=0.1 if what == "hf-dropout" else 0.0)).train()
        inputs = shard_batch(batch)
        n = inputs["input_ids"].shape[1]
        if what == "hf-switched":
            model.set_attn_implementation("sdpa")
            return model(**inputs)
        if what == "hf-mask":
            return model(**inputs, attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool))
        if what in ("hf-dropout", "hf-cache", "hf-output-attn"):
            extra = {"hf-cache": {"use_cache": True}, "hf-output-attn": {"output_attentions": True}}.get(what, {})
            return model(**{**inputs, **extra})
        q, kv = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
        kwargs = {
            "hf-softcap": dict(softcap=30.0),
            "hf-bias": dict(position_bias=torch.zeros(1, 4, n, n)),
            "hf-causal": dict(is_causal=False),
            "hf-no-context": {},
        }[what]
        if what != "hf-no-context":
            kwargs["ringattn_context"] = inputs["ringattn_context"]
        return attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, scaling=8**-0.5, **kwargs)

    return run


def _megatron(what):
    def run():
        pytest.importorskip("megatron.core")
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.transformer_config import TransformerConfig

        from ringattn.adapters.megatron import RingEoDCoreAttention, layer_window

        cfg = dict(num_layers=1, hidden_size=64, num_attention_heads=4, attention_dropout=0.0)
        if what == "mg-window":
            return layer_window(TransformerConfig(**cfg, window_size=(7, 3)), 1)
        if what == "mg-split":
            core = RingEoDCoreAttention(TransformerConfig(**cfg), 1, AttnMaskType.causal, "self")
            core.ulysses_size, core.cp_comm_type = 2, "a2a+p2p"
            return core._layout(ringattn.adapters.megatron.RingEoDPackedSeqParams(layout=ONE), 8)
        cfg["attention_dropout"] = 0.1 if what == "mg-dropout" else 0.0
        return RingEoDCoreAttention(
            TransformerConfig(**cfg),
            1,
            AttnMaskType.causal,
            "self",
            cp_comm_type="all_gather" if what == "mg-allgather" else None,
        )

    return run


def _cost(**kw):
    from ringattn.cost import CostModel

    return lambda: CostModel(**kw)


LOCAL = {
    "cu-short": lambda: DocLayout.from_cu_seqlens([0], 1),
    "cu-start": lambda: DocLayout.from_cu_seqlens([1, 4], 1),
    "cu-order": lambda: DocLayout.from_cu_seqlens([0, 4, 4, 8], 1),
    "cu-total": lambda: DocLayout.from_cu_seqlens([0, 5, 12], 1, sample_len=8),
    "cu-cross": lambda: DocLayout.from_cu_seqlens([0, 5, 13, 16], 2, sample_len=8),
    "pad": lambda: DocLayout.from_cu_seqlens([0, 5, 18], 2),
    "pad-arg": lambda: __import__("ringattn.adapters.transformers", fromlist=["shard_batch"]).shard_batch(
        {"input_ids": torch.arange(2, 20).reshape(1, 18)}, pad_to_multiple_of=5, strategy="balanced", chunks_per_rank=3
    ),
    "cp-size": lambda: DocLayout.from_cu_seqlens([0, 8], 0),
    "ulysses-div": lambda: DocLayout.from_cu_seqlens([0, 8], 4, ulysses_size=3),
    "strategy": lambda: DocLayout.from_cu_seqlens([0, 8], 2, strategy="bogus"),
    "strategy-args": lambda: DocLayout.from_cu_seqlens(
        [0, 8], 2, strategy=ringattn.sharding.Zigzag(), chunks_per_rank=2
    ),
    "auto-cost": lambda: DocLayout.from_cu_seqlens([0, 8], 2, strategy="auto", cost="h100"),
    "tokens": lambda: DocLayout.from_tokens(torch.arange(8), 0, 1),
    "tokens-int": lambda: DocLayout.from_tokens(torch.zeros(1, 8), 0, 1),
    "q-tokens": _attn(qkv=_qkv(n=7)),
    "q-shape": _attn(qkv=tuple(x[None] for x in _qkv())),
    "q-float": _attn(qkv=tuple(x.long() for x in _qkv())),
    "heads": _attn(qkv=_qkv(hq=3)),
    "kv-shape": _attn(qkv=(torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 1, 16))),
    "head-dim": _attn(qkv=(torch.randn(8, 4, 16), torch.randn(8, 2, 8), torch.randn(8, 2, 8))),
    "dtype": _attn(qkv=(torch.randn(8, 4, 16), torch.randn(8, 2, 16).double(), torch.randn(8, 2, 16))),
    "no-group": _attn(layout=DocLayout.from_cu_seqlens([0, 5, 8], 2), qkv=_qkv(n=4)),
    "group-type": _attn(layout=DocLayout.from_cu_seqlens([0, 5, 8], 2), qkv=_qkv(n=4), group="world"),
    "scale": _attn(softmax_scale=-1.0),
    "comm": _attn(comm="bogus"),
    "backend": _attn(backend="bogus"),
    "window": _attn(window=0),
    "window-backend": lambda: _without_window_support(_attn(window=2, backend="no-window")),
    "sinks-shape": _attn(sinks=torch.zeros(3)),
    "sinks-dtype": _attn(sinks=torch.zeros(4, dtype=torch.int64)),
    "sinks-device": _attn(sinks=torch.zeros(4, device="meta")),
    "rank": lambda: ringattn.rank_plan(DocLayout.from_cu_seqlens([0, 8], 4), 4),
    "uly-heads": lambda: ringattn.plan.ulysses_heads(3, 1, 2),
    "uly-kv": lambda: ringattn.plan.ulysses_heads(6, 3, 2),
    "uly-split": lambda: DocLayout.from_cu_seqlens([0, 6], 4, ulysses_size=4),
    "profile": _cost(profile="bogus"),
    "cost-heads": _cost(num_heads=6, num_kv_heads=4),
    "cost-dtype": _cost(dtype="int64"),
    "cost-split": lambda: _cost()().ring_model(3),
    "cost-cp": lambda: _cost(profile="h100-nvlink-ib400")().ring_model(2),
    "workload": lambda: ringattn.workloads.load_workload("no_such_workload"),
    **{
        k: _hf(k)
        for k in (
            "hf-mask",
            "hf-pad-mask",
            "hf-dropout",
            "hf-softcap",
            "hf-bias",
            "hf-causal",
            "hf-cache",
            "hf-output-attn",
            "hf-no-context",
            "hf-switched",
            "hf-unprepared",
            "hf-positions",
            "hf-labels",
            "hf-input-ids",
            "hf-cu",
            "hf-ulysses",
            "hf-loss",
        )
    },
    **{k: _megatron(k) for k in ("mg-allgather", "mg-window", "mg-dropout", "mg-split")},
}


def _multi_rank(rank, cp, _):
    """The rows that need a process group, at CP 4: every rank's message per row."""
    import torch.distributed as dist

    from . import transformers_cases as tc

    out = {}

    def catch(key, fn):
        try:
            fn()
            out[key] = None
        except ValueError as exc:
            out[key] = str(exc)

    layout = DocLayout.from_cu_seqlens([0, 5, 21, 32], cp)
    n = layout.local_tokens(rank)
    catch("disagree", lambda: ringattn.ring_eod_attention(*_qkv(n=n), layout, comm="ring" if rank == 1 else "direct"))
    hybrid = DocLayout.from_cu_seqlens([0, 5, 21, 32], cp, ulysses_size=2)
    catch("hybrid-group", lambda: ringattn.ring_eod_attention(*_qkv(n=hybrid.local_tokens(rank)), hybrid))
    catch("new-groups", lambda: ringattn.new_cp_groups(3))
    ranks = [[0, 2], [1, 3]]  # Ulysses groups of stride 2: not consecutive CP ranks
    subs = [dist.new_group(r) for r in ranks] + [dist.new_group(r) for r in ([0, 1], [2, 3])]
    mine = [g for g, r in zip(subs, ranks + [[0, 1], [2, 3]]) if rank in r]
    catch("from-groups", lambda: ringattn.CPGroups.from_groups(dist.group.WORLD, mine[0], mine[1]))

    def batch_disagree():
        from ringattn.adapters.transformers import prepare_model, shard_batch

        docs = tc.documents()
        if rank == 1:
            docs[0][0] = (docs[0][0] + 1) % tc.VOCAB or 2
        prepare_model(tc.build("llama"))(**shard_batch(tc.collator_batch(docs), dist.group.WORLD))

    catch("hf-batch", batch_disagree)
    return out


MULTI = ("disagree", "hybrid-group", "new-groups", "from-groups", "hf-batch")


def test_every_row_has_a_trigger():
    assert set(table()) == set(LOCAL) | set(MULTI)


@pytest.mark.parametrize("row", sorted(LOCAL))
def test_local_row_message_and_remedy(row):
    message, remedy = table()[row]
    with pytest.raises(ValueError) as err:
        LOCAL[row]()
    text = str(err.value)
    assert message in text, f"{row}: {text}"
    assert remedy in text, f"{row}: no remedy {remedy!r} in {text}"


def test_multi_rank_rows_message_and_remedy():
    rows = table()
    for rank, got in enumerate(unwrap(run_ranks(4, _multi_rank, timeout_s=120))):
        for row in MULTI:
            message, remedy = rows[row]
            text = got[row]
            assert text is not None and message in text and remedy in text, f"rank {rank}, {row}: {text}"

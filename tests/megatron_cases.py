"""Tiny megatron-core GPT runs used by test_megatron (run inside spawned gloo ranks).

Patched inside these test processes only (megatron-core's CUDA calls on CPU):
* stock attention (the dense reference only): ``parallel_state.get_global_memory_buffer``
  (its scratch buffer) -> host tensors, and its dropout RNG fork
  (``tensor_parallel.get_cuda_rng_tracker().fork()``) -> a no-op (dropout is 0);
* RoPE: the model's rotary embedding is ringattn's ResetRotaryEmbedding (no ``.cuda()``).
"""

from __future__ import annotations

import contextlib

import torch

EOD = 0
VOCAB = 96
SEQ = 32
#: the tiny GPT's TransformerConfig fields every run shares (GQA: 4 query heads, 2 groups; CPU init, no dropout)
TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    use_cpu_initialization=True,
    attention_dropout=0.0,
)


class _HostBuffer:
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(shape, dtype=dtype)


class _NoCudaRngTracker:
    def fork(self, name=None):
        return contextlib.nullcontext()


def batch_tokens(num_samples=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (num_samples, SEQ + 1), generator=g)
    for b, ends in enumerate([(4, 5, 17), (0, 22, 23, 30)][:num_samples]):
        for e in ends:
            tokens[b, e] = EOD
    return {"tokens": tokens[:, :SEQ].contiguous(), "labels": tokens[:, 1:].contiguous()}


def build_model(
    cp: int,
    spec: str = "ringattn",
    seed: int = 1234,
    tp: int = 1,
    cp_comm_type=None,
    hcp=None,
    window_size=None,
    softmax_type: str = "vanilla",
):
    """A tiny GPT; ``window_size`` / ``softmax_type`` go to the config of ringattn's spec only (the dense
    reference gets the window through its mask: megatron-core's local attention replaces a given mask by
    the window's when ``window_size`` is set, dropping the documents)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn.adapters.megatron import ringattn_layer_spec, use_reset_position_rope

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, 1, context_parallel_size=cp, hierarchical_context_parallel_sizes=hcp)
    ps.get_global_memory_buffer = lambda: _HostBuffer()
    if spec != "ringattn":
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker = lambda *a, **kw: _NoCudaRngTracker()
        torch.cuda.current_device = lambda: "cpu"  # DotProductAttention puts softmax_offset there
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        **TINY,
        hidden_dropout=0.0,
        context_parallel_size=cp,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        cp_comm_type=cp_comm_type,
        hierarchical_context_parallel_sizes=hcp,
        window_size=window_size if spec == "ringattn" else None,
        softmax_type=softmax_type,
    )
    layer = ringattn_layer_spec() if spec == "ringattn" else get_gpt_layer_local_spec()
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=layer,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    use_reset_position_rope(model)
    return model


def loss_and_grads(rank, cp, args):
    """Global mean loss over non-masked tokens and CP-summed gradients (name -> tensor)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ringattn.adapters.megatron import RingEoDPackedSeqParams, get_batch

    fmt, spec = args.get("format", "sbhd"), args.get("spec", "ringattn")
    window = args.get("window")  # keys per query on every layer (megatron: window_size = (window - 1, 0))
    model = build_model(
        cp,
        spec,
        window_size=None if window is None else (window - 1, 0),
        softmax_type=args.get("softmax_type", "vanilla"),
    )
    batch = get_batch(
        iter([batch_tokens(args.get("samples", 2))]), EOD, eod_mask_loss=True, strategy=args.get("strategy", "zigzag")
    )
    params = batch["packed_seq_params"]
    mask = None
    if fmt == "thd":
        params = RingEoDPackedSeqParams(
            qkv_format="thd", layout=params.layout, max_seqlen_q=params.max_seqlen_q, max_seqlen_kv=params.max_seqlen_kv
        )
    if spec == "dense":  # stock attention with the document-causal mask (True = masked out), CP off
        from .reference import doc_causal_mask

        b, s = batch["tokens"].shape
        full = doc_causal_mask(params.layout.cu_seqlens)
        if window is not None:
            pos = torch.arange(full.shape[0])
            full &= pos[None, :] > pos[:, None] - window
        mask = torch.stack([~full[i * s : (i + 1) * s, i * s : (i + 1) * s] for i in range(b)]).unsqueeze(1)
        params = None
    losses = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"], packed_seq_params=params)
    lm = batch["loss_mask"]
    num = (losses * lm).sum()
    den = lm.sum()
    if cp > 1:
        den = den.detach().clone()
        dist.all_reduce(den, group=ps.get_context_parallel_group())
    (num / den).backward()
    loss = (num / den).detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        dist.all_reduce(loss, group=ps.get_context_parallel_group())
        for g in grads.values():
            dist.all_reduce(g, group=ps.get_context_parallel_group())
    # reset position ids reached the rotary embedding: they restart at every document start
    layout = batch["packed_seq_params"].layout
    rank_in_cp = ps.get_context_parallel_rank()
    used = model.rotary_pos_emb.position_ids.reshape(-1)
    assert torch.equal(used, layout.position_ids(rank_in_cp)), "RoPE did not get the reset position ids"
    assert layout.strategy == args.get("strategy", "zigzag")
    return loss.item(), grads


# ----------------------------------------------------------------------------- hybrid CP (Ulysses x ring)
HYBRID_RUNS = {  # name -> (tp, cp, cp_comm_type, hierarchical_context_parallel_sizes); all on 4 processes
    "tp1 cp1": (1, 1, None, None),
    "cp4 a2a+p2p 2x2": (1, 4, "a2a+p2p", [2, 2]),
    "cp4 a2a 4x1": (1, 4, "a2a", None),
    "cp4 a2a+p2p 1x4 (ring)": (1, 4, "a2a+p2p", [1, 4]),
    "tp2 cp1": (2, 1, None, None),
    "tp2 cp2 a2a": (2, 2, "a2a", None),
}


def _hybrid_loss_and_grads(tp, cp, cp_comm_type, hcp):
    """Loss and CP-summed gradients of one megatron parallel setup (the world's other ranks are DP replicas)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ringattn.adapters.megatron import cp_ulysses_size, get_batch

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    model = build_model(cp, tp=tp, cp_comm_type=cp_comm_type, hcp=hcp)
    u = cp_ulysses_size(model.config)
    batch = get_batch(iter([batch_tokens()]), EOD, eod_mask_loss=True, ulysses_size=u)
    layout = batch["packed_seq_params"].layout
    assert layout.ulysses_size == u and layout.cp_size == cp
    attn = model.decoder.layers[0].self_attention.core_attention
    assert attn.ulysses_size == u
    losses = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        packed_seq_params=batch["packed_seq_params"],
    )
    lm = batch["loss_mask"]
    num, den = (losses * lm).sum(), lm.sum().detach().clone()
    group = ps.get_context_parallel_group()
    if cp > 1:
        dist.all_reduce(den, group=group)
    (num / den).backward()
    loss = (num / den).detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        dist.all_reduce(loss, group=group)
        for g in grads.values():
            dist.all_reduce(g, group=group)
    used = model.rotary_pos_emb.position_ids.reshape(-1)
    assert torch.equal(used, layout.position_ids(ps.get_context_parallel_rank())), "RoPE did not get reset positions"
    return loss.item(), grads, ps.get_tensor_model_parallel_rank()


def _bad_megatron_configs():
    """ValueError messages of cp_comm_type settings ringattn refuses, on this rank (CP=4 over the world)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn import DocLayout
    from ringattn.adapters.megatron import RingEoDCoreAttention, RingEoDPackedSeqParams, cp_ulysses_size

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2])
    base = dict(TINY, context_parallel_size=4)
    rank = dist.get_rank()
    cols = [dist.new_group(r) for r in ([0, 2], [1, 3])]  # created on every rank, in the same order
    rows = [dist.new_group(r) for r in ([0, 1], [2, 3])]
    swapped = ProcessGroupCollection(
        cp=ps.get_context_parallel_group(),
        tp=ps.get_tensor_model_parallel_group(),
        hcp=[cols[rank % 2], rows[rank // 2]],
    )
    wrong_size = ProcessGroupCollection(
        cp=ps.get_context_parallel_group(),
        tp=ps.get_tensor_model_parallel_group(),
        hcp=[ps.get_context_parallel_group(), rows[rank // 2]],
    )
    no_hcp = ProcessGroupCollection(cp=ps.get_context_parallel_group(), tp=ps.get_tensor_model_parallel_group(), hcp=[])
    ring_layout = RingEoDPackedSeqParams(qkv_format="sbhd", layout=DocLayout.from_cu_seqlens([0, 5, 32], 4))
    trials = {
        "all_gather": (dict(cp_comm_type="all_gather"), "all_gather", None),
        "per-layer list": (dict(cp_comm_type=["a2a+p2p", "p2p"]), "a2a+p2p", None),
        "unknown": (dict(cp_comm_type="ring"), "ring", None),
        "sizes disagree": (dict(cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[4, 1]), "a2a+p2p", None),
        "swapped groups": (
            dict(cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[2, 2]),
            "a2a+p2p",
            swapped,
        ),
        "sizes not multiplying to CP": (dict(cp_comm_type="a2a+p2p"), "a2a+p2p", wrong_size),
    }
    trials["no hierarchical groups"] = (dict(cp_comm_type="a2a+p2p"), "a2a+p2p", no_hcp)
    out = {}
    for name, (extra, comm_type, pgs) in trials.items():
        try:
            cfg = TransformerConfig(**base, **extra)
            RingEoDCoreAttention(cfg, 1, AttnMaskType.causal, "self", cp_comm_type=comm_type, pg_collection=pgs)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    hybrid_cfg = TransformerConfig(**base, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[2, 2])
    more = {
        "cp_ulysses_size without sizes": lambda: cp_ulysses_size(TransformerConfig(**base, cp_comm_type="a2a+p2p")),
        "batch sharded for the ring": lambda: RingEoDCoreAttention(
            hybrid_cfg, 1, AttnMaskType.causal, "self", cp_comm_type="a2a+p2p"
        )._layout(ring_layout, 0),
    }
    for name, call in more.items():
        try:
            call()
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def hybrid_runs(rank, world, names):
    """Every :data:`HYBRID_RUNS` setup in turn on the same 4 processes, then the refused configurations.

    Runs on the long-lived rank pool of 4 (megatron's state is global per process): megatron's
    parallel state is destroyed again at the end, so the pool stays usable.
    """
    from megatron.core import parallel_state as ps

    try:
        results = {name: _hybrid_loss_and_grads(*HYBRID_RUNS[name]) for name in names}
        return results, _bad_megatron_configs()
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


def loss_and_grads_cases(rank, cp, cases):
    """:func:`loss_and_grads` for each of ``cases`` (name -> args) in this process, each model built from the same
    seed: name -> ``("ok", result)`` or ``("error", traceback)``, so a failure names its case (one spawn per CP size
    instead of one per case: megatron-core takes seconds to import)."""
    import traceback

    out = {}
    for name, args in cases.items():
        try:
            out[name] = ("ok", loss_and_grads(rank, cp, args))
        except Exception as exc:
            out[name] = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return out

"""Tiny megatron-core GPT pretraining with EoD reset and ringattn context parallelism (CPU, gloo).

    torchrun --standalone --nproc-per-node 2 examples/megatron/pretrain_gpt_eod.py \\
        --context-parallel-size 2 --reset-attention-mask --reset-position-ids --attention-mask-type general

Flags as in Megatron-LM: with ``--reset-attention-mask`` attention stays inside documents
(EoD-terminated); with ``--reset-position-ids`` RoPE positions restart per document;
``--context-parallel-size N`` splits every sequence over N ranks with ringattn (N = 1 runs
the same document-masked attention on one rank). ``--attention-mask-type general`` is
accepted for compatibility with the Ascend stack (the layout replaces the mask).
``--cp-comm-type a2a`` runs Ulysses, ``--cp-comm-type a2a+p2p
--hierarchical-context-parallel-sizes U R`` the hybrid (e.g. CP=4 as 2 x 2 on 4 processes).
Synthetic EoD-packed data; prints the loss of every step (it should fall).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

EOD = 0


def synthetic_batches(num_samples: int, seq_len: int, vocab: int, seed: int):
    """EoD-packed samples of short 'counting' documents: easy to learn, so the loss falls fast."""
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = []
        for _ in range(num_samples):
            row = []
            while len(row) < seq_len + 1:
                start = int(torch.randint(1, vocab - 16, (1,), generator=g))
                length = int(torch.randint(2, 12, (1,), generator=g))
                row += [start + i for i in range(length)] + [EOD]
            rows.append(row[: seq_len + 1])
        data = torch.tensor(rows)
        yield {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-parallel-size", type=int, default=2)
    p.add_argument("--reset-attention-mask", action="store_true")
    p.add_argument("--reset-position-ids", action="store_true")
    p.add_argument("--eod-mask-loss", action="store_true")
    p.add_argument("--attention-mask-type", default="general", choices=["general", "causal"])
    p.add_argument("--cp-comm-type", default="p2p", help="p2p (ring), a2a (Ulysses) or a2a+p2p (hybrid)")
    p.add_argument(
        "--hierarchical-context-parallel-sizes",
        type=int,
        nargs="+",
        default=None,
        help="[U, R] for --cp-comm-type a2a+p2p (the a2a group size first)",
    )
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=128)
    args = p.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringattn.adapters.megatron import cp_ulysses_size, get_batch, ringattn_layer_spec, use_reset_position_rope

    cp = args.context_parallel_size
    if dist.get_world_size() != cp:
        raise SystemExit(f"this example runs TP=PP=DP=1: start it with --nproc-per-node {cp}")
    hcp = args.hierarchical_context_parallel_sizes
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp, hierarchical_context_parallel_sizes=hcp)
    cp_group = ps.get_context_parallel_group()

    torch.manual_seed(0)  # same initial weights on every CP rank
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        context_parallel_size=cp,
        params_dtype=torch.float32,
        cp_comm_type=args.cp_comm_type,
        hierarchical_context_parallel_sizes=hcp,
    )
    ulysses = cp_ulysses_size(config)  # the batch is sharded for the split attention runs
    model = GPTModel(
        config=config,
        transformer_layer_spec=ringattn_layer_spec(),
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        position_embedding_type="rope",
    )
    use_reset_position_rope(model)  # RoPE rotates by the (reset) position_ids given to forward
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = synthetic_batches(args.micro_batch_size, args.seq_length, args.vocab_size, seed=1)

    losses = []
    for it in range(args.train_iters):
        batch = get_batch(
            data,
            EOD,
            reset_attention_mask=args.reset_attention_mask,
            reset_position_ids=args.reset_position_ids,
            eod_mask_loss=args.eod_mask_loss,
            ulysses_size=ulysses,
        )
        out = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            packed_seq_params=batch["packed_seq_params"],
        )
        num = (out * batch["loss_mask"]).sum()
        den = batch["loss_mask"].sum().detach().clone()
        dist.all_reduce(den, group=cp_group)
        loss = num / den
        opt.zero_grad()
        loss.backward()
        for prm in model.parameters():  # CP ranks hold shards of one sequence: sum their gradients
            dist.all_reduce(prm.grad, group=cp_group)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        losses.append(total.item())
        if dist.get_rank() == 0:
            docs = batch["packed_seq_params"].layout.num_docs
            split = f" = {ulysses} Ulysses x {cp // ulysses} ring" if ulysses > 1 else ""
            print(f"step {it + 1}: loss {total.item():.4f} ({docs} documents, CP={cp}{split})", flush=True)
    ok = losses[-1] < losses[0]
    if dist.get_rank() == 0:
        print("loss decreased" if ok else "loss did NOT decrease")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

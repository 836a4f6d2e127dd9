"""Context-parallel training of a tiny transformers Llama on packed documents with ringattn (CPU, gloo).

    torchrun --standalone --nproc-per-node 2 examples/transformers/train_packed.py [--steps 5] [--strategy balanced]
    torchrun --standalone --nproc-per-node 4 examples/transformers/train_packed.py --ulysses 2   # CP=4 as 2x2

Every rank builds the same model from a ``LlamaConfig`` (random init, no download) and the same
synthetic documents, packed by transformers' ``DataCollatorWithFlattening``; ``shard_batch`` gives
each CP rank its share of the tokens (the world group is the CP group here). ``--ulysses U`` splits
the CP group into Ulysses x ring (``ringattn.new_cp_groups(U)``: an all-to-all over heads inside
groups of U consecutive ranks, a ring of CP/U ranks; ``U`` = the number of ranks is pure Ulysses);
the model's 4 query and 2 KV heads allow U = 2 (KV heads split) or 4 (replicated). DDP over the CP group
synchronises gradients: it *averages*, and the CP ranks' gradients must be *summed*, so each rank
scales its loss by the CP size before ``backward``. AdamW updates the weights.

For comparison every rank also trains a copy of the model the ordinary single-device way (CP=1):
the whole packed batch, transformers' own ``sdpa`` attention, which masks the documents from the
restarting position ids. Both copies are built from one config object: ``prepare_model`` gives the
CP model its own copy, so the reference keeps ``sdpa``. Rank 0 prints both losses of every step:
they agree to float32 rounding. ``--nproc-per-node 1`` runs the same code at CP=1.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

VOCAB = 128


def synthetic_documents(step: int, num_docs: int, seed: int):
    """'Counting' documents of uneven length (easy to learn, so the loss falls), the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    docs = []
    for _ in range(num_docs):
        start = int(torch.randint(1, VOCAB - 40, (1,), generator=g))
        length = int(torch.randint(2, 33, (1,), generator=g))
        docs.append([start + i for i in range(length)])
    return docs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--docs", type=int, default=8, help="documents per packed batch")
    p.add_argument("--strategy", default="zigzag", choices=["zigzag", "balanced"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ulysses",
        type=int,
        default=1,
        help="Ulysses size U: CP = U x ring (hybrid; pure Ulysses when U is the number of ranks)",
    )
    return p.parse_args(argv)


def train(args, log=print) -> list[tuple[float, float]]:
    """Train both copies; returns (CP loss, CP=1 loss) per step. Uses the initialised process group if any."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    import ringattn
    from ringattn.adapters.transformers import prepare_model, reduce_loss, shard_batch

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group, cp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    # the CP group shard_batch and the attention use: a ProcessGroup (ring) or its Ulysses x ring split (collective)
    cp_groups = ringattn.new_cp_groups(args.ulysses, group) if args.ulysses > 1 else group

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)  # the CP=1 run: same weights, same config object
    reference.load_state_dict(model.state_dict())
    prepare_model(model)  # attn_implementation="ringattn" on a private copy of the config
    assert reference.config._attn_implementation == "sdpa", "the shared config was switched"
    trained = DistributedDataParallel(model, process_group=group) if cp > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr)
    collator = DataCollatorWithFlattening()

    losses = []
    for step in range(args.steps):
        docs = synthetic_documents(step, args.docs, args.seed)
        batch = collator([{"input_ids": d} for d in docs])  # input_ids, labels (-100 at doc starts), position_ids

        inputs = shard_batch(batch, cp_groups, strategy=args.strategy)
        loss = trained(**inputs).loss  # this rank's share: sum over the CP group == the batch mean
        (loss * cp).backward()  # DDP averages over the CP group; the CP sum is the gradient of the mean
        opt.step()
        opt.zero_grad()

        ref_loss = reference(**batch, use_cache=False).loss  # one device, the whole batch
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()

        total = reduce_loss(loss, cp_groups).item()
        losses.append((total, ref_loss.item()))
        if rank == 0 and log is not None:
            layout = inputs["ringattn_context"].layout
            split = f", Ulysses {layout.ulysses_size} x ring {layout.ring_size}" if layout.ulysses_size > 1 else ""
            log(
                f"step {step}: loss {total:.6f} | CP=1 loss {ref_loss.item():.6f}  ({len(docs)} documents, "
                f"{batch['input_ids'].shape[1]} tokens padded to {layout.total_tokens}, "
                f"{layout.local_tokens(rank)} per rank"
                f"{split})"
            )
    return losses


def main(argv=None) -> int:
    train(parse_args(argv), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

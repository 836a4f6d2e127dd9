"""Context-parallel training with transformers' ``Trainer`` and ringattn: no training loop (CPU, gloo).

    torchrun --standalone --nproc-per-node 2 examples/transformers/train_trainer.py                 # CP 2
    torchrun --standalone --nproc-per-node 4 examples/transformers/train_trainer.py --cp 2          # 2 DP x 2 CP
    torchrun --standalone --nproc-per-node 4 examples/transformers/train_trainer.py --ulysses 2     # CP 4 = 2x2
    torchrun --standalone --nproc-per-node 2 examples/transformers/train_trainer.py --ga 2          # accumulation

Every rank builds the same tiny Llama from a ``LlamaConfig`` (random init, no download) and the same
synthetic documents (lists of token ids, no tokenizer); transformers' ``DataCollatorWithFlattening`` packs
each batch. ``RingAttnTrainer`` does the rest: CP groups of ``--cp`` consecutive ranks (Ulysses x ring with
``--ulysses``), every rank of a CP group loads the same batch and trains on its share of the tokens, data
parallelism across the CP groups, the loss scaled so that the synchronised gradient is the single-device
gradient of the global batch.

For comparison every rank also trains a copy of the model the ordinary single-device way: a plain loop over
the same global batches (the per-device batches of all data-parallel groups, packed together), transformers'
own ``sdpa`` attention (documents masked from the restarting position ids), and the Trainer's own optimizer,
schedule and clipping (``Trainer.get_optimizer_cls_and_kwargs``, ``get_scheduler``, ``max_grad_norm``).
Rank 0 prints both losses of every step and the largest weight difference at the end: float32 rounding, which
AdamW's first update ``lr * g / (|g| + eps)`` magnifies in gradient elements near ``eps`` (up to ~1e-4 at the
default ``--lr`` with data parallelism, where the global batch is summed in another order; ~1e-6 at CP only).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

VOCAB = 128


def synthetic_documents(num_docs: int, seed: int) -> list[list[int]]:
    """'Counting' documents of uneven length (easy to learn, so the loss falls), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        start = int(torch.randint(1, VOCAB - 40, (1,), generator=g))
        length = int(torch.randint(2, 33, (1,), generator=g))
        docs.append([start + i for i in range(length)])
    return docs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--cp", type=int, default=None, help="CP size (default: every rank; must divide the ranks)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses size U: CP = U x ring")
    p.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--per-device", type=int, default=4, help="documents per batch of each data-parallel group")
    p.add_argument("--strategy", default="zigzag", choices=["zigzag", "balanced"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def reference_losses(args, targs, model, dataset, collator, dp_size) -> list[float]:
    """Single-device training on the global batches, with the Trainer's optimizer, schedule and clipping."""
    from transformers import Trainer, get_scheduler

    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, model)
    opt = opt_cls(model.parameters(), weight_decay=targs.weight_decay, **opt_kwargs)
    sched = get_scheduler(
        targs.lr_scheduler_type,
        opt,
        num_warmup_steps=targs.get_warmup_steps(args.steps),
        num_training_steps=args.steps,
        scheduler_specific_kwargs=targs.lr_scheduler_kwargs,
    )
    # the sequential sampler: micro-batch j of data-parallel group d is dataset batch j * D + d, so the global
    # micro-batch j is the D per-device batches in a row
    size = args.per_device * dp_size
    losses = []
    for step in range(args.steps):
        micro = [
            collator(dataset[(step * args.ga + m) * size : (step * args.ga + m + 1) * size]) for m in range(args.ga)
        ]
        num_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)  # the Trainer's count
        total = 0.0
        for batch in micro:
            loss = model(**batch, num_items_in_batch=num_items, use_cache=False).loss
            loss.backward()
            total += loss.item()
        if targs.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), targs.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def train(args, log=print) -> tuple[list[tuple[float, float]], float]:
    """Train with RingAttnTrainer and the reference; returns ((Trainer loss, reference loss) per step, max |dw|)."""
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, TrainingArguments

    from ringattn.adapters.trainer import RingAttnTrainer

    torch.set_num_threads(1)
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
    reference = LlamaForCausalLM(config)  # the single-device run: same weights, transformers' sdpa attention
    reference.load_state_dict(model.state_dict())
    docs = synthetic_documents(4 * args.steps * args.ga * args.per_device * 8, args.seed)
    dataset = [{"input_ids": d} for d in docs]
    collator = DataCollatorWithFlattening()  # input_ids, labels (-100 at document starts), position_ids

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            per_device_train_batch_size=args.per_device,
            gradient_accumulation_steps=args.ga,
            max_steps=args.steps,
            learning_rate=args.lr,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=args.seed,
            train_sampling_strategy="sequential",  # the reference below replays the same order
            **({"ddp_backend": "gloo"} if "LOCAL_RANK" in os.environ else {}),
        )  # torchrun: gloo on CPU
        trainer = RingAttnTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collator,
            cp_size=args.cp,
            ulysses_size=args.ulysses,
            strategy=args.strategy,
        )
        trainer.train()
    setup = trainer.ringattn
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref = reference_losses(args, targs, reference, dataset, collator, setup.dp_size)
    diff = max((p - q).abs().max().item() for p, q in zip(model.state_dict().values(), reference.state_dict().values()))
    if log is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        ring = setup.cp_size // setup.ulysses_size
        split = f" (Ulysses {setup.ulysses_size} x ring {ring})" if setup.ulysses_size > 1 else ""
        log(
            f"{setup.dp_size} DP x CP {setup.cp_size}{split}, {args.per_device} documents per batch, "
            f"gradient accumulation {args.ga}"
        )
        for step, (a, b) in enumerate(zip(losses, ref)):
            log(f"step {step}: loss {a:.6f} | single process {b:.6f}  (diff {abs(a - b):.1e})")
        log(f"final weights: max |difference| {diff:.2e}")
    return list(zip(losses, ref)), diff


def main(argv=None) -> int:
    train(parse_args(argv), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

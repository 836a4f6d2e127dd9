"""Context-parallel SFT with TRL's ``SFTTrainer`` (``packing=True``, ``padding_free=True``) and ringattn (CPU, gloo).

    torchrun --standalone --nproc-per-node 2 examples/transformers/sft_trl.py                  # CP 2
    torchrun --standalone --nproc-per-node 4 examples/transformers/sft_trl.py --cp 2           # 2 DP x 2 CP
    torchrun --standalone --nproc-per-node 4 examples/transformers/sft_trl.py --ulysses 2      # CP 4 = 2x2

Every rank builds the same tiny Qwen3 from a ``Qwen3Config`` (random init, no download), a word-level
tokenizer in memory (TRL needs one for its pad token; the data is already token ids) and the same synthetic
documents. TRL packs the documents into rows of ``--max-length`` tokens (best-fit decreasing) and its
padding-free collator flattens each batch into one row with restarting position ids; ``RingAttnSFTTrainer``
shards every batch over the CP group (Ulysses x ring with ``--ulysses``), runs data parallelism across CP
groups and scales the loss so that the synchronised gradient is the single-device gradient of the global batch.

For comparison every rank also trains a copy of the model the ordinary single-device way: a plain loop over
the same global batches of TRL's packed dataset, collated by the same collator, with transformers' ``sdpa``
attention, SFTTrainer's loss (TRL's fused LM head) and the Trainer's optimizer, schedule and clipping. Rank 0 prints
both losses of every step and the largest weight difference at the end: float32 rounding, which AdamW's first
update ``lr * g / (|g| + eps)`` magnifies in gradient elements near ``eps`` (about 1e-5 at the default ``--lr``,
a few 1e-6 at ``--lr 1e-3``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

VOCAB = 128


def synthetic_documents(num_docs: int, seed: int) -> list[list[int]]:
    """'Counting' documents of uneven length (token ids >= 2: 0 and 1 are the pad and EoS tokens)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        start = int(torch.randint(2, VOCAB - 40, (1,), generator=g))
        length = int(torch.randint(2, 33, (1,), generator=g))
        docs.append([start + i for i in range(length)])
    return docs


def tokenizer():
    """A word-level tokenizer over the ids ``t0..t127`` (pad t0, EoS t1), built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1", unk_token="t2"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--cp", type=int, default=None, help="CP size (default: every rank; must divide the ranks)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses size U: CP = U x ring")
    p.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--per-device", type=int, default=2, help="packed rows per batch of each data-parallel group")
    p.add_argument("--max-length", type=int, default=64, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def reference_losses(args, targs, model, dataset, collator, dp_size) -> list[float]:
    """Single-device training on the global batches: SFTTrainer's loss (the summed log-probabilities of TRL's fused
    LM head over the label count), the Trainer's optimizer, schedule and clipping."""
    from transformers import Trainer, get_scheduler
    from trl.trainer import add_fused_lm_head

    # SFTTrainer.compute_loss scores the labels with TRL's fused LM head (trl/trainer/utils.py: add_fused_lm_head),
    # not with the model's cross entropy: the same loss in float32, rounded differently, which AdamW's first steps
    # amplify to ~1e-5 in the weights; the reference takes the same loss to compare the attention and the sharding
    add_fused_lm_head(model)

    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, model)
    opt = opt_cls(model.parameters(), weight_decay=targs.weight_decay, **opt_kwargs)
    sched = get_scheduler(
        targs.lr_scheduler_type,
        opt,
        num_warmup_steps=targs.get_warmup_steps(args.steps),
        num_training_steps=args.steps,
        scheduler_specific_kwargs=targs.lr_scheduler_kwargs,
    )
    size = args.per_device * dp_size  # sequential sampler: the D per-device batches of a micro-batch in a row
    losses = []
    for step in range(args.steps):
        micro = []
        for m in range(args.ga):
            start = (step * args.ga + m) * size
            rows = [dataset[i] for i in range(start, start + size)]
            batch = collator(rows)  # TRL's padding-free collator: one row, restarting position ids
            micro.append({k: batch[k] for k in ("input_ids", "labels", "position_ids")})
        num_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)  # the Trainer's count
        total = 0.0
        for batch in micro:
            loss = -model(**batch, fused_lm_head=True).log_probs.sum() / num_items
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
    """Train with RingAttnSFTTrainer and the reference; returns ((SFT loss, reference loss) per step, max |dw|)."""
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig

    from ringattn.adapters.trainer import RingAttnSFTTrainer

    torch.set_num_threads(1)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Qwen3ForCausalLM(config)
    reference = Qwen3ForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    docs = synthetic_documents(8 * args.steps * args.ga * args.per_device * 8, args.seed)

    with tempfile.TemporaryDirectory() as out:
        targs = SFTConfig(
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
            packing=True,
            padding_free=True,
            max_length=args.max_length,  # TRL's packing, one flat row per batch
            bf16=False,  # float32, to compare with the reference to rounding (bf16 mixed precision works too)
            train_sampling_strategy="sequential",  # the reference below replays the same order
            **({"ddp_backend": "gloo"} if "LOCAL_RANK" in os.environ else {}),
        )  # torchrun: gloo on CPU
        trainer = RingAttnSFTTrainer(
            model=model,
            args=targs,
            train_dataset=Dataset.from_dict({"input_ids": docs}),
            processing_class=tokenizer(),
            cp_size=args.cp,
            ulysses_size=args.ulysses,
        )
        trainer.train()
    setup = trainer.ringattn
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref = reference_losses(args, targs, reference, trainer.train_dataset, trainer.data_collator, setup.dp_size)
    diff = max((p - q).abs().max().item() for p, q in zip(model.state_dict().values(), reference.state_dict().values()))
    if log is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        ring = setup.cp_size // setup.ulysses_size
        split = f" (Ulysses {setup.ulysses_size} x ring {ring})" if setup.ulysses_size > 1 else ""
        log(
            f"{setup.dp_size} DP x CP {setup.cp_size}{split}, {args.per_device} packed rows of {args.max_length} "
            f"tokens per batch, gradient accumulation {args.ga}"
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

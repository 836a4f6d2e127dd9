"""Tiny Trainer / SFTTrainer runs for test_trainer (in the test process and inside gloo rank pools).

Every run is tokenizer-free: datasets of token ids, a word-level tokenizer built in memory for TRL,
models from configs (tests.transformers_cases), no hub access. The reference is the *plain*
``transformers.Trainer`` / ``trl.SFTTrainer`` in one process (no ringattn, transformers' ``sdpa``
attention masking the packed documents from their restarting position ids) on the global batches:
``per_device_train_batch_size`` times the number of data-parallel groups.
"""

from __future__ import annotations

import os
import tempfile

import torch

from . import transformers_cases as tc

VOCAB = tc.VOCAB
PAD, EOS = 0, 1


def documents(n: int, seed: int, lo: int = 2, hi: int = 24) -> list[list[int]]:
    """``n`` documents of ``lo..hi-1`` token ids >= 2 (0 and 1 are the tokenizer's pad and EoS)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (k,), generator=g).tolist() for k in lens]


def tokenizer():
    """A word-level tokenizer over the ids (TRL needs one for its pad token; the data is already token ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def set_rank_env(rank: int, world: int) -> None:
    """What torchrun exports, for accelerate's MULTI_CPU detection in a pool rank (its group is initialised)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )


def args_for(case: dict, output_dir: str, per_device: int, distributed: bool):
    """TrainingArguments (or SFTConfig) of a case, fp32 on CPU, a loss logged every step."""
    common = dict(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=case["ga"],
        max_steps=case.get("steps", 3),
        learning_rate=case.get("lr", 1e-3),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=case.get("seed", 11),
        dataloader_drop_last=True,
    )
    if distributed:  # (a backend named without a process group makes accelerate ask for one)
        common["ddp_backend"] = "gloo"
    common.update(case.get("args", {}))
    if case.get("seq2seq"):
        from transformers import Seq2SeqTrainingArguments

        return Seq2SeqTrainingArguments(**common)
    if case["trainer"] == "sft":
        from trl import SFTConfig

        sft = dict(
            packing=True,
            max_length=case.get("max_length", 32),
            padding_free=case.get("padding_free", False),
            dataset_num_proc=None,
            eval_packing=True,
            bf16=False,
        )  # SFTConfig defaults to bf16
        sft.update(case.get("sft_args", {}))
        return SFTConfig(**common, **sft)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def trainer_for(case: dict, output_dir: str, per_device: int, ringattn: bool, **extra):
    """The case's trainer: the plain one (reference) or ringattn's, on a model with the case's weights."""
    model = tc.build(case["model"], case["state"])
    args = args_for(case, output_dir, per_device, distributed=ringattn and case["world"] > 1)
    kwargs = dict(model=model, args=args, train_dataset=case["train"], eval_dataset=case.get("eval"))
    if ringattn:
        kwargs.update(cp_size=case["cp"], ulysses_size=case.get("ulysses", 1))
        kwargs.update(case.get("trainer_kwargs", {}))
    kwargs.update(extra)
    if case["trainer"] == "sft":
        from datasets import Dataset

        kwargs["train_dataset"] = Dataset.from_dict({"input_ids": case["train"]})
        if case.get("eval") is not None:
            kwargs["eval_dataset"] = Dataset.from_dict({"input_ids": case["eval"]})
        kwargs["processing_class"] = tokenizer()
        from trl import SFTTrainer as cls

        if ringattn:
            from ringattn.adapters.trainer import RingAttnSFTTrainer, ringattn_trainer

            cls = ringattn_trainer(cls) if case.get("factory") else RingAttnSFTTrainer
    else:
        from transformers import DataCollatorWithFlattening

        kwargs["train_dataset"] = [{"input_ids": d} for d in case["train"]]
        if case.get("eval") is not None:
            kwargs["eval_dataset"] = [{"input_ids": d} for d in case["eval"]]
        kwargs.setdefault(
            "data_collator", DataCollatorWithFlattening(return_flash_attn_kwargs=case.get("flash_kwargs", False))
        )
        if ringattn:
            from ringattn.adapters.trainer import RingAttnTrainer as cls
        else:
            from transformers import Trainer as cls
    return cls(**kwargs)


def grad_capture(store: dict):
    """A TrainerCallback keeping the first optimizer step's gradients (synchronised, clipped) in ``store``."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if "grads" not in store:
                module = getattr(model, "module", model)  # DDP's module
                store["grads"] = {n: p.grad.detach().clone() for n, p in module.named_parameters()}

    return Capture()


def _summary(trainer, evaluate: bool, store: dict) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "losses": losses,
        "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "grads": store["grads"],
    }
    if evaluate:
        out["eval_loss"] = trainer.evaluate()["eval_loss"]
    return out


def reference(case: dict) -> dict:
    """The plain trainer in this (single) process on the global batches: losses, final weights, eval loss."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    dp = case["world"] // case["cp"]
    store: dict = {}
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(case, out, case["per_device"] * dp, ringattn=False, callbacks=[grad_capture(store)])
        trainer.train()
        return _summary(trainer, bool(case.get("eval")), store)


def run(rank: int, world: int, case: dict) -> dict:
    """ringattn's trainer of the case on this pool rank: losses (every rank), final weights (rank 0), eval loss."""
    set_rank_env(rank, world)
    store: dict = {}
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(case, out, case["per_device"], ringattn=True, callbacks=[grad_capture(store)])
        trainer.train()
        res = _summary(trainer, bool(case.get("eval")), store)
    if rank != 0:
        res.pop("state")
        res.pop("grads")
    return res


def run_many(rank: int, world: int, cases: list) -> list:
    return [run(rank, world, c) for c in cases]


# ---------------------------------------------------------------------------------------------- refusals
def _padding_collator(features):
    """Right-padded rows with a padding mask: a batch that is not packed."""
    ids = [f["input_ids"] for f in features]
    n = max(map(len, ids))
    input_ids = torch.tensor([x + [PAD] * (n - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def _extra_key_collator(features):
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening()(features)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, docs):
        self.docs = docs

    def __iter__(self):
        return iter({"input_ids": d} for d in self.docs)


class _Wrapped(torch.nn.Module):
    """A model behind a plain nn.Module (as PEFT or a user wrapper would put it)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _bad_groups(world: int):
    """CP groups of strided ranks ([0, 2], [1, 3]): every rank creates both (new_group's rule)."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return groups[dist.get_rank() % 2]


def refusal(rank: int, world: int, what: str, base: dict) -> tuple[str | None, int]:
    """Build and run ringattn's trainer with one thing it refuses: (this rank's ValueError or None, optimizer steps
    taken). ``base``: a trainer case (model, weights, documents)."""
    set_rank_env(rank, world)
    case = {**base, "cp": world, "ga": 1, "steps": 1, "args": {}, "trainer_kwargs": {}}
    extra: dict = {}
    action = "train"
    if what == "compute_metrics":
        extra["compute_metrics"] = lambda p: {}
    elif what == "compute_loss_func":
        extra["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: outputs.loss
    elif what == "label_smoothing":
        case["args"] = {"label_smoothing_factor": 0.1}
    elif what == "label_smoothing_rank1":
        case["args"] = {"label_smoothing_factor": 0.1} if rank == 1 else {}
    elif what == "predict_with_generate":
        case.update(seq2seq=True, args={"predict_with_generate": True})
    elif what == "batch_rebalance":
        case["args"] = {"train_sampling_strategy": "batch_rebalance"}
    elif what == "cp_size_3":
        case["cp"] = 3
    elif what == "cp_size_differs":
        case["cp"] = world if rank == 0 else 1
    elif what == "ulysses_3":
        case["ulysses"] = 3
    elif what == "predict":
        action = "predict"
    elif what == "padding_sft":  # TRL without packing: padded rows and a padding mask
        case.update(trainer="sft", sft_args={"packing": False, "padding_free": False})
    elif what == "padding":
        extra["data_collator"] = _padding_collator
    elif what == "padding_one_dp_group":  # only the second data-parallel group's batches are padded
        if rank >= 2:
            extra["data_collator"] = _padding_collator
        case["cp"] = 2
    elif what == "extra_key":
        extra["data_collator"] = _extra_key_collator
    elif what == "iterable":
        case["train"] = _Stream(base["train"])
    elif what == "strided_groups":
        case.update(cp=2, trainer_kwargs={"cp_groups": _bad_groups(world)})
    elif what == "fsdp":
        case["args"] = {"fsdp": "full_shard"}
    elif what == "moe":  # a mixture-of-experts model with its load-balancing loss on
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        torch.manual_seed(0)
        extra["model"] = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                moe_intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                num_experts=2,
                num_experts_per_tok=1,
                output_router_logits=True,
            )
        )
    elif what == "not_pretrained":
        extra["model"] = _Wrapped(tc.build("llama", base["state"]))
    elif what == "loss_without_shift_labels":
        model = tc.build("llama", base["state"])
        model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
        extra["model"] = model
    elif what == "no_loss_kwargs":
        model = tc.build("llama", base["state"])
        model.accepts_loss_kwargs = False  # what Trainer.__init__ reads (model_accepts_loss_kwargs)
        extra["model"] = model
    elif what == "eval_logits":
        action = "eval_logits"
    else:
        raise ValueError(what)
    trainer = None
    try:
        with tempfile.TemporaryDirectory() as out:
            if what == "iterable":
                trainer = _iterable_trainer(case, out)
            else:
                trainer = trainer_for(case, out, case["per_device"], ringattn=True, **extra)
            rows = [{"input_ids": d} for d in base["train"][:4]]
            if action == "train":
                trainer.train()
            elif action == "eval_logits":  # what predict() or evaluate() with metrics would run
                trainer.evaluation_loop(trainer.get_eval_dataloader(rows), "Evaluation", prediction_loss_only=False)
            else:
                trainer.predict(rows)
    except ValueError as exc:
        return str(exc), (trainer.state.global_step if trainer is not None else -1)
    return None, trainer.state.global_step


def _iterable_trainer(case, out):
    from transformers import DataCollatorWithFlattening

    from ringattn.adapters.trainer import RingAttnTrainer

    return RingAttnTrainer(
        model=tc.build(case["model"], case["state"]),
        args=args_for(case, out, 2, True),
        train_dataset=case["train"],
        data_collator=DataCollatorWithFlattening(),
        cp_size=case["cp"],
    )


# ---------------------------------------------------------------------------------------------- pool jobs
def run_example(rank: int, world: int, name: str, argv: list[str]):
    """examples/transformers/<name>.py's train() on this pool's ranks (what torchrun runs, minus the rendezvous)."""
    import runpy
    from pathlib import Path

    set_rank_env(rank, world)
    path = Path(__file__).resolve().parent.parent / "examples" / "transformers" / f"{name}.py"
    example = runpy.run_path(str(path), run_name=f"{name}_example")
    return example["train"](example["parse_args"](argv), log=None)


def job(rank: int, world: int, payload: dict) -> dict:
    """Everything one pool runs, in one job: the exactness cases, the refusals, the examples (and the seconds each
    took on this rank, for sizing the suite)."""
    import time

    seconds = []

    def timed(fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        seconds.append(round(time.perf_counter() - start, 2))
        return result

    out = {"cases": [timed(run, rank, world, c) for c in payload.get("cases", [])]}
    out["refusals"] = [timed(refusal, rank, world, what, payload["base"]) for what in payload.get("refusals", [])]
    out["examples"] = [timed(run_example, rank, world, name, argv) for name, argv in payload.get("examples", [])]
    out["seconds"] = seconds
    return out

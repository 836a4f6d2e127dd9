"""Hugging Face ``Trainer`` and TRL ``SFTTrainer``: context-parallel training of packed batches, no loop to write.

::

    from ringattn.adapters.trainer import RingAttnTrainer        # or RingAttnSFTTrainer (TRL), ringattn_trainer(cls)

    trainer = RingAttnTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                              data_collator=DataCollatorWithFlattening(), cp_size=4, ulysses_size=2)
    trainer.train()                                              # torchrun --nproc-per-node 8: 2 DP x (CP 4 = 2x2)

What the mixin (:class:`RingAttnTrainerMixin`) adds to a ``Trainer`` subclass, after the trainer's own
``__init__``:

* **groups**: CP groups of ``cp_size`` consecutive ranks (``[0..C-1], [C..2C-1], ...``), data parallelism
  across them (``D = world / C``); with ``ulysses_size = U > 1`` each CP group is split into Ulysses x ring
  by :func:`ringattn.new_cp_groups` (pure Ulysses when ``U == C``). ``cp_groups=`` takes existing groups.
* **model**: :func:`~ringattn.adapters.transformers.prepare_model` (``attn_implementation="ringattn"``).
* **data**: every rank of a CP group loads the same batch, different CP groups different batches: the
  dataloader the Trainer prepared through accelerate is re-pointed from ``(world, rank)`` to
  ``(D, rank // C)``, the rule accelerate itself applies to mesh dimensions that share a batch.
* **batches**: each micro-batch is sharded with :func:`~ringattn.adapters.transformers.shard_batch`
  (``DataCollatorWithFlattening`` output, TRL's padding-free / packing collator, or ``[b, s]`` rows).
* **loss**: ``num_items_in_batch`` is counted from the sharded batches' shifted labels, summed over the
  gradient-accumulation micro-batches and the data-parallel groups, each batch once; the Trainer's own
  ``compute_loss`` then multiplies the per-rank loss by the world size, and DDP averages the gradients over
  the world. The synchronised gradient is the single-device gradient of the global batch (see below).
* **refusals**: what it cannot honour raises the same ``ValueError`` on every rank, before any exchange of
  the step: metrics on logits, generation, ``predict``, label smoothing, a custom ``compute_loss_func``,
  DeepSpeed/FSDP/``ParallelismConfig``, ``DataParallel``, batches with padding masks or unknown keys, ...

The loss scaling rule. With ``W = D * C`` ranks, every CP group holding one batch ``b_d`` of the global
batch and rank ``r`` holding the share ``s_r`` of its group's tokens, let ``N = sum_d n(b_d)`` be the number
of label tokens of the global batch (all micro-batches of the optimizer step). Rank ``r``'s loss is
``L_r = W * CE(s_r) / N`` (CE: the summed cross entropy of its tokens). DDP averages gradients over the
world, so the synchronised gradient is ``(1/W) sum_r W * grad CE(s_r) / N = grad (sum_r CE(s_r)) / N``: the
shares of one batch add up to the batch, the batches to the global batch, which is the gradient of the
single-device token mean. The Trainer logs the mean over ranks of ``L_r``, ``sum_r CE(s_r) / N``: the true
loss of the global batch (CP-summed, DP-averaged by token count).

What this relies on, in the installed versions (transformers 5.24.0, accelerate 1.15.0, trl 1.16.0):

* ``transformers/trainer.py``: ``Trainer._get_dataloader`` builds a ``DataLoader`` and passes it to
  ``accelerator.prepare``; ``Trainer._run_epoch`` fetches each optimizer step's micro-batches through
  ``get_batch_samples(epoch_iterator, num_batches, device)`` (whose ``num_items_in_batch`` goes to every
  ``training_step``), skips the gradient sync (``accelerator.no_sync``) on all but the last micro-batch and
  logs the mean over processes of the summed ``training_step`` losses (``_maybe_log_save_evaluate``:
  ``nested_gather(tr_loss).mean()``); ``Trainer.training_step`` does not divide a loss normalised by
  ``num_items_in_batch`` by the accumulation steps (``loss_is_scaled_for_ga``); ``Trainer.compute_loss``
  passes ``num_items_in_batch`` to the model and, with ``average_tokens_across_devices`` (default True),
  multiplies the loss by ``accelerator.num_processes // tp_size``; ``Trainer._get_num_items_in_batch``
  divides the world-gathered count by ``get_tp_size() * get_cp_size() * get_sp_size()`` (ranks that share a
  batch) and ``get_total_train_batch_size`` divides the world by the same sizes: this mixin's
  :meth:`get_cp_size` returns its CP size, so both hold for ringattn's CP too.
* ``accelerate/data_loader.py``: ``prepare_data_loader`` wraps a map-style dataset's batch sampler in
  ``BatchSamplerShard(num_processes, process_index)`` and an ``IterableDataset`` in
  ``IterableDatasetShard(num_processes, process_index)``; both read the two attributes on every
  ``__len__``/``__iter__``. With a device mesh it sets ``process_index //= tp * cp`` and ``num_processes =
  dp sizes`` ("processes with same ranks/ids would receive the same batch ... for CP the same as TP
  applies"): this mixin applies that rule to its own CP groups (``transformers/trainer.py:
  Trainer._get_dataloader`` re-points ``BatchSamplerShard`` the same way for ``BatchRebalanceSampler``).
  ``DataLoaderDispatcher`` (``dispatch_batches``, the default for an ``IterableDataset``) slices a batch by
  ``state.num_processes`` instead: refused. The sequence-parallel path of the ecosystem shares batches the
  other way round: DeepSpeed's ``UlyssesSPDataLoaderAdapter`` (``accelerate/accelerator.py:
  Accelerator.deepspeed_ulysses_dl_adapter``, DeepSpeed ``runtime/sequence_parallel/ulysses_sp.py``) lets
  every SP rank draw its own batch, all-gathers them and runs them one after the other, which is why
  ``Trainer.set_initial_training_values`` multiplies the dataloader length by ``sp_size``; loading the same
  batch on every CP rank needs no exchange and keeps the dataloader length.
* ``accelerate/accelerator.py: Accelerator.prepare_model`` wraps the model in
  ``torch.nn.parallel.DistributedDataParallel`` without a ``process_group``: the world, gradients averaged
  over all ``W`` ranks (the rule above).
* ``trl/trainer/sft_trainer.py``: ``SFTTrainer.compute_loss`` calls the model with ``fused_lm_head=True``,
  divides the summed per-token loss by ``num_items_in_batch`` and multiplies by ``num_processes //
  tp_size`` (the Trainer's rule); ``trl/trainer/utils.py: add_fused_lm_head`` scores ``shift_labels``
  without shifting them ("as passed under context or sequence parallelism"), which
  :func:`~ringattn.adapters.transformers.shard_batch` provides. ``DataCollatorForLanguageModeling``
  (``padding_free=True``, implied by ``packing=True`` with the default ``packing_strategy="bfd"``) emits
  ``input_ids``/``labels``/``position_ids`` as ``[1, T]`` with ``cu_seq_lens_q/k``, ``max_length_q/k`` and
  ``seq_idx``; ``SFTTrainer.__init__`` refuses packing with accelerate's own CP (``cp_enabled``), which
  this mixin does not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .. import CPGroups, new_cp_groups
from .transformers import prepare_model, shard_batch

try:
    from accelerate.data_loader import BatchSamplerShard, IterableDatasetShard
    from transformers import PreTrainedModel, Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the packages
    raise ImportError(
        "ringattn.adapters.trainer needs transformers>=5 and accelerate (pip install 'ringattn[transformers,trainer]')"
    ) from exc

__all__ = ["RingAttnTrainerMixin", "RingAttnTrainer", "ringattn_trainer", "RingAttnSetup", "BATCH_KEYS"]

#: the collator outputs a batch may hold: what shard_batch reads, plus the document boundaries and lengths that
#: DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True) and TRL's padding-free
#: DataCollatorForLanguageModeling add for varlen kernels (replaced by the shards' own context)
BATCH_KEYS = frozenset(
    {
        "input_ids",
        "labels",
        "shift_labels",
        "position_ids",
        "attention_mask",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
)
_SHARD_KEYS = ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask", "cu_seq_lens_q")


@dataclass(frozen=True)
class RingAttnSetup:
    """The layout of one trainer's ranks (built once in ``__init__``).

    group: what :func:`shard_batch` gets: this rank's CP ProcessGroup (ring), its :class:`ringattn.CPGroups`
    (Ulysses x ring) or None (one process). cp_size, ulysses_size: ``C`` and ``U``; dp_size, dp_rank: the
    number of CP groups and this rank's (its data-parallel index); world_size: ``D * C``.
    strategy, comm, backend: passed to :func:`shard_batch`.
    """

    group: dist.ProcessGroup | CPGroups | None
    cp_size: int
    ulysses_size: int
    dp_size: int
    dp_rank: int
    world_size: int
    strategy: str = "zigzag"
    comm: str | None = None
    backend: str | None = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _verdict(every: list) -> str:
    """One message for every rank from the ranks' problems (None: no problem): the first, naming its rank
    unless every rank has the same one."""
    bad = [(r, p) for r, p in enumerate(every) if p is not None]
    if len(bad) == len(every) and len({p for _, p in bad}) == 1:
        return bad[0][1]
    r, p = bad[0]
    others = f" (and ranks {[x for x, _ in bad[1:]]})" if len(bad) > 1 else ""
    return f"rank {r}{others}: {p}"


def _comm_device(device: torch.device | str | None) -> torch.device:
    """Where a small tensor for a world collective lives: the training device unless the backend is gloo."""
    if device is None or str(dist.get_backend()).lower() == "gloo":
        return torch.device("cpu")
    return torch.device(device)


class RingAttnTrainerMixin:
    """Context parallelism with ringattn for a ``transformers.Trainer`` subclass (put it first in the bases).

    Keyword arguments (the rest go to the trainer): ``cp_size`` (default: the world size; must divide it),
    ``ulysses_size`` (``U``, default 1: ring attention; ``U > 1`` splits each CP group into Ulysses x ring,
    ``U == cp_size`` is pure Ulysses), ``cp_groups`` (this rank's CP ProcessGroup or
    :class:`ringattn.CPGroups`, built elsewhere; its ranks must be ``cp_size`` consecutive ranks starting at
    a multiple of it), ``strategy`` (the layout strategy of :func:`shard_batch`), ``comm`` and ``backend``
    (of :func:`ringattn.ring_eod_attention`).

    Collective at construction (every rank constructs the trainer): the ranks agree on the sizes and on any
    refusal, then build the groups. See the module docstring for the loss rule and what it relies on.
    """

    def __init__(
        self,
        *args: Any,
        cp_size: int | None = None,
        ulysses_size: int = 1,
        cp_groups: dist.ProcessGroup | CPGroups | None = None,
        strategy: str = "zigzag",
        comm: str | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        world, rank = _world()
        problem = self._ringattn_refusal(cp_size, ulysses_size, cp_groups, world)
        c = world if cp_size is None else cp_size
        if world > 1:  # one exchange: every rank sees every rank's request, so all decide alike
            given = None
            if problem is None and cp_groups is not None:
                given = tuple(
                    dist.get_process_group_ranks(cp_groups.cp if isinstance(cp_groups, CPGroups) else cp_groups)
                )
            every: list = [None] * world
            dist.all_gather_object(every, (problem, c, ulysses_size, strategy, given))
            if any(r[0] is not None for r in every):
                problem = _verdict([r[0] for r in every])
            else:
                problem = _check_requests([r[1:] for r in every])
        if problem is not None:
            raise ValueError(problem)
        if world > 1 and cp_groups is None:
            cp_groups = _build_groups(c, ulysses_size, world, rank)
        self.ringattn = RingAttnSetup(
            group=cp_groups if world > 1 else None,
            cp_size=c,
            ulysses_size=ulysses_size,
            dp_size=world // c,
            dp_rank=rank // c,
            world_size=world,
            strategy=strategy,
            comm=comm,
            backend=backend,
        )

    # ------------------------------------------------------------------------------------------ refusals
    def _ringattn_refusal(self, cp_size: int | None, ulysses_size: int, cp_groups: Any, world: int) -> str | None:
        """What this trainer's configuration asks for that ringattn cannot honour (local; agreed afterwards)."""
        for name, v in (("cp_size", cp_size), ("ulysses_size", ulysses_size)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                return f"{name}: expected a positive int, got {v!r}"
        c = world if cp_size is None else cp_size
        if world % c:
            return (
                f"cp_size: {c} does not divide the {world} processes; launch a multiple of cp_size processes "
                "(the CP groups are consecutive ranks, data parallelism runs across them)"
            )
        if c % ulysses_size:
            return f"ulysses_size: {ulysses_size} does not divide cp_size={c}; pick a divisor (U x ring = cp_size)"
        if cp_groups is not None:
            size = (
                cp_groups.cp_size
                if isinstance(cp_groups, CPGroups)
                else dist.get_world_size(cp_groups)
                if isinstance(cp_groups, dist.ProcessGroup)
                else None
            )
            if size is None:
                return f"cp_groups: expected a ProcessGroup or a ringattn.CPGroups, got {type(cp_groups).__name__}"
            u = cp_groups.ulysses_size if isinstance(cp_groups, CPGroups) else 1
            if (size, u) != (c, ulysses_size):
                return (
                    f"cp_groups: a group of {size} ranks with ulysses_size={u} does not match cp_size={c}, "
                    f"ulysses_size={ulysses_size}; pass matching sizes or leave cp_groups out"
                )
        args = self.args
        model = self.model
        if not isinstance(model, PreTrainedModel):
            return (
                f"model: expected a transformers PreTrainedModel (ringattn selects its attention through "
                f"attn_implementation), got {type(model).__name__}; PEFT-wrapped models are not supported yet"
            )
        if getattr(self, "compute_metrics", None) is not None:
            return (
                "compute_metrics: under context parallelism each rank holds a shard of the logits; ringattn's "
                "Trainer evaluates the loss only (compute_metrics=None), or gather the logits yourself with "
                "ringattn.adapters.transformers.gather_logits in a custom loop"
            )
        if getattr(args, "predict_with_generate", False):
            return (
                "predict_with_generate: generation runs the model without a packed batch and with a KV cache, "
                "which ringattn's attention refuses; evaluate the loss only (predict_with_generate=False)"
            )
        if getattr(self, "compute_loss_func", None) is not None:
            return (
                "compute_loss_func: a custom loss gets this rank's shard of the outputs and the unshifted labels; "
                "ringattn's Trainer uses the model's loss (shift_labels, num_items_in_batch); "
                "drop compute_loss_func"
            )
        if getattr(self, "label_smoother", None) is not None or getattr(args, "label_smoothing_factor", 0):
            return (
                "label_smoothing_factor: the label smoother shifts this rank's shard of the labels locally, which "
                "pairs tokens across shard boundaries; set label_smoothing_factor=0"
            )
        if getattr(args, "n_gpu", 1) > 1:
            return (
                f"n_gpu: torch.nn.DataParallel over {args.n_gpu} GPUs in one process is not supported; launch one "
                "process per GPU (torchrun)"
            )
        if (
            getattr(self, "is_deepspeed_enabled", False)
            or getattr(self, "is_fsdp_enabled", False)
            or getattr(args, "deepspeed", None)
            or getattr(args, "fsdp", None)
        ):
            return (
                "deepspeed/fsdp: ringattn's Trainer supports DistributedDataParallel only (its loss rule relies on "
                "DDP averaging the gradients over the world); drop the deepspeed/fsdp arguments"
            )
        pc = getattr(getattr(self, "accelerator", None), "parallelism_config", None)
        if (
            pc is not None
            and getattr(pc, "total_size", 1) > 1
            and (pc.tp_enabled or pc.cp_enabled or pc.sp_enabled or pc.dp_shard_enabled)
        ):
            return (
                "parallelism_config: accelerate's tensor/context/sequence parallelism or FSDP cannot be combined "
                "with ringattn's context parallelism; drop parallelism_config (ringattn builds its own groups)"
            )
        if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
            return (
                "train_sampling_strategy: 'batch_rebalance' balances batches over every rank as data parallel; "
                "under context parallelism the CP ranks share a batch; use 'random', 'sequential' or "
                "'group_by_length'"
            )
        if not getattr(self, "model_accepts_loss_kwargs", True):
            return (
                "model: its forward takes no loss kwargs (num_items_in_batch); ringattn's loss rule needs the "
                "global label count passed to the loss"
            )
        if getattr(self, "aux_loss_enabled", False) or getattr(model.config, "output_router_logits", False):
            return (
                "output_router_logits: a mixture-of-experts load-balancing loss is a per-rank mean over this "
                "rank's tokens, not the batch's; disable it (router_aux_loss_coef=0 / output_router_logits=False)"
            )
        try:  # last: it selects the attention (the model is the trainer's; a refusal on any rank stops them all)
            prepare_model(model)
        except ValueError as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------------------------------------ sizes, data
    def get_cp_size(self) -> int:
        """The CP size: ranks that share a batch (``Trainer.get_total_train_batch_size`` divides the world by it)."""
        return self.ringattn.cp_size

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's training dataloader, sharded by CP group (every rank of a CP group loads the same batch)."""
        return self._ringattn_share_batches(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        """The Trainer's evaluation dataloader, sharded by CP group."""
        return self._ringattn_share_batches(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        """The Trainer's test dataloader, sharded by CP group."""
        return self._ringattn_share_batches(super().get_test_dataloader(test_dataset))

    def _ringattn_share_batches(self, loader: DataLoader) -> DataLoader:
        """Re-point accelerate's per-process sharding from ``(world, rank)`` to ``(D, rank // C)``."""
        s = self.ringattn
        if s.world_size == 1 or s.cp_size == 1:
            return loader
        targets = [
            x
            for x in (
                getattr(loader, "batch_sampler", None),
                getattr(loader, "sampler", None),
                getattr(loader, "dataset", None),
            )
            if isinstance(x, (BatchSamplerShard, IterableDatasetShard))
        ]
        if not targets:
            raise ValueError(
                f"dataloader: accelerate prepared a {type(loader).__name__} over a "
                f"{type(getattr(loader, 'dataset', None)).__name__} "
                "that ringattn cannot make the CP ranks share (it shards by process through a BatchSamplerShard or an "
                "IterableDatasetShard); use a map-style dataset, or an IterableDataset with "
                "accelerator_config={'dispatch_batches': False} and fewer dataset shards than processes"
            )
        t = targets[0]
        if (t.num_processes, t.process_index) not in ((s.world_size, dist.get_rank()), (s.dp_size, s.dp_rank)):
            raise ValueError(
                f"dataloader: sharded over {t.num_processes} processes as index {t.process_index}, "
                f"expected the world ({s.world_size}); ringattn re-points accelerate's default sharding "
                "only"
            )
        t.num_processes, t.process_index = s.dp_size, s.dp_rank
        return loader

    # ------------------------------------------------------------------------------------------ batches, loss
    def _ringattn_shard(self, batch: Any, device: torch.device | str) -> dict:
        """This rank's model inputs for one collator batch (local checks only, ``ValueError`` if refused)."""
        if not hasattr(batch, "keys"):
            raise ValueError(f"batch: expected a dict of tensors from the collator, got {type(batch).__name__}")
        extra = sorted(set(batch.keys()) - BATCH_KEYS)
        if extra:
            raise ValueError(
                f"batch: ringattn shards packed token batches ({', '.join(sorted(BATCH_KEYS))}); got "
                f"{extra}, which it would drop or could not shard; remove them from the collator output"
            )
        q, k = batch.get("cu_seq_lens_q"), batch.get("cu_seq_lens_k")
        if k is not None and (q is None or not torch.equal(torch.as_tensor(q).cpu(), torch.as_tensor(k).cpu())):
            raise ValueError(
                "cu_seq_lens_k: ringattn runs self-attention over the packed documents; expected the same "
                "boundaries as cu_seq_lens_q"
            )
        cpu = {
            key: (batch[key].detach().cpu() if isinstance(batch[key], torch.Tensor) else batch[key])
            for key in _SHARD_KEYS
            if batch.get(key) is not None
        }
        s = self.ringattn
        return shard_batch(cpu, s.group, strategy=s.strategy, comm=s.comm, backend=s.backend, device=device)

    def _ringattn_batches(self, batches: list, device: torch.device | str) -> tuple[list, torch.Tensor | None]:
        """Shard ``batches`` (one optimizer step's micro-batches, or one eval batch) and count the step's labels.

        One integer all-reduce over the world: each rank's label count and whether it refused a batch. If any
        rank did, the messages are gathered and every rank raises the same ``ValueError`` (before the step's
        first forward). Returns the sharded inputs and ``num_items_in_batch``: with
        ``average_tokens_across_devices`` (the default) the world sum divided by the CP size, i.e. the label
        count of the global batch with each CP group's batch counted once; else this CP group's count divided
        by the CP size (``Trainer._get_num_items_in_batch`` divides by the ranks that share a batch alike).
        """
        s = self.ringattn
        problem, sharded, count = None, [], 0
        try:
            for b in batches:
                inputs = self._ringattn_shard(b, device)
                count += int(inputs["num_items_in_batch"])
                sharded.append(inputs)
        except ValueError as exc:
            problem = str(exc)
        local = count
        if s.world_size > 1:
            both = torch.tensor([count, 0 if problem is None else 1], dtype=torch.int64, device=_comm_device(device))
            dist.all_reduce(both)
            count, refusals = (int(x) for x in both.tolist())
            if refusals:
                every: list = [None] * s.world_size
                dist.all_gather_object(every, problem)
                raise ValueError(_verdict(every))
        elif problem is not None:
            raise ValueError(problem)
        if not batches:
            return [], None
        if getattr(self.args, "average_tokens_across_devices", True):
            # C x the global count (each CP rank counted its group's batch; CP ranks fed different batches are refused
            # by the attention's batch fingerprint): divided exactly and kept an integer, where the Trainer's float32
            # division would round above 2**24 labels per step
            num_items = torch.tensor(count // s.cp_size, dtype=torch.int64, device=device)
        else:  # this CP group's count over the CP size, a float as in Trainer._get_num_items_in_batch
            num_items = torch.tensor(local / s.cp_size, dtype=torch.float32, device=device)
        for inputs in sharded:
            inputs["num_items_in_batch"] = num_items
        return sharded, num_items

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device | str
    ) -> tuple[list, torch.Tensor | None]:
        """One optimizer step's micro-batches, sharded for this CP rank, and the step's ``num_items_in_batch``."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return self._ringattn_batches(batches, device)

    # ------------------------------------------------------------------------------------------ evaluation
    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """The eval loss of one batch (the same value on every rank); logits and labels are not returned."""
        if not prediction_loss_only:
            raise ValueError(
                "prediction_loss_only: under context parallelism each rank holds a shard of the logits; "
                "ringattn's Trainer evaluates the loss only (evaluate() without compute_metrics)"
            )
        s = self.ringattn
        (sharded,), num_items = self._ringattn_batches([inputs], self.args.device)
        sharded = self._prepare_inputs(sharded)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, sharded, num_items_in_batch=num_items).detach()
        if s.world_size > 1:  # the ranks' losses average to the batch loss (the Trainer's rule): make it every rank's
            loss = loss.reshape(()).to(_comm_device(self.args.device)).clone()
            dist.all_reduce(loss)
            loss = loss.to(self.args.device) / s.world_size
        return loss, None, None

    def predict(self, *args: Any, **kwargs: Any) -> None:
        """Refused: under context parallelism each rank holds a shard of the logits."""
        raise ValueError(
            "predict: under context parallelism each rank holds a shard of the logits; ringattn's Trainer "
            "evaluates the loss only (trainer.evaluate()); gather logits with "
            "ringattn.adapters.transformers.gather_logits in a custom loop"
        )


def _check_requests(every: list) -> str | None:
    """Why the ranks' ``(cp_size, ulysses_size, strategy, cp group ranks or None)`` do not fit together."""
    sizes = {(c, u, s) for c, u, s, _ in every}
    if len(sizes) > 1:
        return f"cp_size/ulysses_size/strategy: the ranks passed different values {sorted(sizes, key=repr)}"
    c = every[0][0]
    given = [g for *_, g in every]
    if any(g is not None for g in given):
        if any(g is None for g in given):
            return "cp_groups: some ranks passed cp_groups and others did not; pass it on every rank or on none"
        for r, g in enumerate(given):
            start = r - r % c
            if list(g) != list(range(start, start + c)):
                return (
                    f"cp_groups: rank {r}'s CP group has ranks {list(g)}, expected {list(range(start, start + c))} "
                    "(CP groups of consecutive ranks; data parallelism across them)"
                )
    return None


def _build_groups(c: int, u: int, world: int, rank: int):
    """This rank's CP group (consecutive ranks) and, for ``u > 1``, its Ulysses x ring split (collective)."""
    mine = None
    if c == world:
        mine = dist.group.WORLD
    else:
        for start in range(0, world, c):  # every rank creates every group, in one order (new_group's rule)
            g = dist.new_group(list(range(start, start + c)))
            if start <= rank < start + c:
                mine = g
    if u > 1:
        return new_cp_groups(u, mine)
    return mine


def ringattn_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``transformers.Trainer`` subclass) with :class:`RingAttnTrainerMixin` in front."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise ValueError(f"trainer_cls: expected a transformers.Trainer subclass, got {trainer_cls!r}")
    return type(
        f"RingAttn{trainer_cls.__name__}",
        (RingAttnTrainerMixin, trainer_cls),
        {"__doc__": f"{trainer_cls.__name__} with ringattn context parallelism (RingAttnTrainerMixin)."},
    )


class RingAttnTrainer(RingAttnTrainerMixin, Trainer):
    """``transformers.Trainer`` with ringattn context parallelism (``cp_size=C, ulysses_size=U``)."""


try:  # TRL is optional: RingAttnSFTTrainer exists where it is installed
    from trl import SFTTrainer as _SFTTrainer
except ImportError:  # pragma: no cover - exercised only without trl
    _SFTTrainer = None
else:

    class RingAttnSFTTrainer(RingAttnTrainerMixin, _SFTTrainer):
        """TRL ``SFTTrainer`` with ringattn context parallelism (``packing=True`` / ``padding_free=True`` batches)."""

    __all__.append("RingAttnSFTTrainer")

"""Batch sharding: a packed batch -> this CP rank's ``model(**inputs)`` (see :mod:`ringattn.adapters.transformers`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..._validate import positive_int
from ...eod import cu_seqlens_from_tokens, position_ids_from_cu_seqlens
from ...groups import CPGroups, resolve_group
from ...layout import DocLayout
from .context import CONTEXT_KWARG, IGNORE_INDEX, RingAttnContext, attended_check

__all__ = ["shard_batch"]


def _as_2d(name: str, x, shape=None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected [batch, seq], got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(
            f"{name}: expected shape {shape} (as input_ids), got {tuple(x.shape)}; pass one value per "
            "token of input_ids"
        )
    return x.detach().to("cpu", torch.int64)


def _documents(batch, ids: torch.Tensor, eod_id, pos) -> torch.Tensor:
    """Global document boundaries (int64, flattened ``[b*s]``), every sample boundary included."""
    b, s = ids.shape
    total = b * s
    if eod_id is not None:
        return cu_seqlens_from_tokens(ids, eod_id)  # documents end with their EoD (ringattn.eod)
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        cu = torch.as_tensor(cu).detach().to("cpu", torch.int64).reshape(-1)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(
                f"cu_seq_lens_q: expected boundaries from 0 to {total} (the batch's tokens), got "
                f"{cu.tolist()[:4]}...{cu.tolist()[-2:]}"
            )
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(
                "cu_seq_lens_q: expected strictly increasing boundaries; pass the collator's cu_seq_lens_q unchanged"
            )
        missing = sorted(set(range(s, total, s)) - set(cu.tolist()))
        if missing:
            raise ValueError(
                f"cu_seq_lens_q: every sample boundary must be a document boundary; missing {missing[:4]}; "
                "end every sample's last document at the sample end (DataCollatorWithFlattening makes "
                "one sample, [1, T])"
            )
        return cu
    if pos is not None:
        # a document starts wherever the position ids do not grow by one: transformers' own rule for packed
        # position ids (masking_utils.find_packed_sequence_indices: position_diff != 1), plus every sample start
        starts = torch.ones(b, s, dtype=torch.bool)
        starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    else:
        starts = torch.zeros(b, s, dtype=torch.bool)
        starts[:, 0] = True
    first = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    return torch.cat([first, torch.tensor([total])])


def _digest(*tensors: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def shard_batch(
    batch: Mapping[str, Any],
    group: dist.ProcessGroup | CPGroups | None = None,
    *,
    eod_id: int | None = None,
    strategy: str = "zigzag",
    pad_to_multiple_of: int | None = None,
    pad_token_id: int = 0,
    num_items_in_batch: int | torch.Tensor | None = None,
    comm: str | None = None,
    backend: str | None = None,
    device: torch.device | str | None = None,
    **layout_kwargs: Any,
) -> dict[str, Any]:
    """This CP rank's ``model(**inputs)`` arguments for a packed batch; every CP rank passes the same batch.

    batch: ``input_ids`` ``[b, s]`` (``[1, T]`` from ``DataCollatorWithFlattening``) and optionally
    ``labels`` (aligned with ``input_ids``, -100 = ignored; default: ``input_ids``), ``shift_labels``
    (already shifted; used as given), ``position_ids``, ``cu_seq_lens_q``, ``attention_mask`` (all ones only).
    Documents, in order of precedence: ``eod_id`` (a document ends with its EoD token, as
    :mod:`ringattn.eod`), ``cu_seq_lens_q``, ``position_ids`` (a document starts where they do not
    grow by one), else one document per sample. Position ids: the batch's (without ``eod_id``),
    else restarting at 0 per document.

    Labels are shifted over the whole sample *before* sharding (``shift_labels[i] = labels[i+1]``), and
    no prediction crosses a document: the last token of every document gets -100 (the collator's
    -100 at document starts does this already). ``num_items_in_batch``: the number of labels that
    count in the whole batch (override it, e.g. with the count over data-parallel ranks).

    Each sample is padded to a multiple of ``pad_to_multiple_of`` (default: what the layout needs,
    :meth:`DocLayout.required_multiple` for the CP split, ``strategy``, ``chunks_per_rank`` and the
    number of samples: ``2*R``, ``chunks_per_rank*R`` for ``balanced``, and each ring rank's tokens
    in ``U`` equal parts) with a filler document (``pad_token_id``, labels -100) that no real token
    attends to. An explicit ``pad_to_multiple_of`` must give a length the layout accepts.

    group: the CP group. A ProcessGroup runs ring attention over it; a :class:`ringattn.CPGroups`
    (``ringattn.new_cp_groups(U, cp_group)``, or ``CPGroups.from_groups`` over existing groups)
    runs Ulysses x ring with ``U = groups.ulysses_size`` (pure Ulysses when ``ring_size == 1``,
    the plain ring when ``U == 1``); None: the world group if torch.distributed is initialised,
    else CP size 1. Shards by the CP rank (``cp_rank = ring_rank * U + ulysses_rank``).
    ``strategy`` and ``**layout_kwargs`` go to :meth:`DocLayout.from_cu_seqlens` (its
    ``ulysses_size`` comes from the groups); ``comm`` and ``backend`` to :func:`ring_eod_attention`. Returns
    ``input_ids``, ``position_ids``,
    ``labels``, ``shift_labels`` as ``[1, n_local]`` (this rank's tokens of every sample, in the
    layout's local order, on ``device``), ``num_items_in_batch``, ``use_cache=False`` and
    ``ringattn_context``. Raises ``ValueError`` (no communication) for malformed batches.
    """
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(f"batch: expected a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch or batch["input_ids"] is None:
        raise ValueError(
            "batch: expected input_ids (inputs_embeds are not supported); pass the collator's batch with input_ids"
        )
    group, groups, rank, cp = resolve_group(group)
    ulysses = groups.ulysses_size if groups is not None else 1
    if layout_kwargs.get("ulysses_size", ulysses) != ulysses:
        raise ValueError(
            f"ulysses_size: shard_batch takes the Ulysses split from the group (here {ulysses}), got "
            f"ulysses_size={layout_kwargs['ulysses_size']!r}; pass group=ringattn.new_cp_groups(U, cp_group)"
        )
    layout_kwargs["ulysses_size"] = ulysses
    ids, cu, pos = _read(batch, eod_id)
    b, s = ids.shape
    labels, shift = _labels(batch, ids, cu)
    if num_items_in_batch is None:
        num_items_in_batch = (shift != IGNORE_INDEX).sum()

    # the layout's own rule (one source of truth: DocLayout.required_multiple)
    rule = dict(
        strategy=strategy, chunks_per_rank=layout_kwargs.get("chunks_per_rank"), ulysses_size=ulysses, num_samples=b
    )
    if pad_to_multiple_of is not None:
        multiple = pad_to_multiple_of
    else:
        multiple = DocLayout.required_multiple(cp, **rule)
    positive_int("pad_to_multiple_of", multiple)
    padded = -(-s // multiple) * multiple
    ids_p, pos_p, labels_p, shift_p = (
        _pad(x, padded, value, filler)
        for x, value, filler in (
            (ids, pad_token_id, None),
            (pos, 0, torch.arange(padded - s, dtype=pos.dtype)),
            (labels, IGNORE_INDEX, None),
            (shift, IGNORE_INDEX, None),
        )
    )
    try:
        layout = DocLayout.from_cu_seqlens(
            _padded_documents(cu, b, s, padded), cp, sample_len=padded, strategy=strategy, **layout_kwargs
        )
    except ValueError as exc:
        if pad_to_multiple_of is None:
            raise
        need = DocLayout.required_multiple(cp, **rule)
        raise ValueError(
            f"pad_to_multiple_of={pad_to_multiple_of} pads the samples to {padded} tokens, which the "
            f"layout refuses ({exc}); pass pad_to_multiple_of=None (shard_batch then pads to the layout's "
            f"own multiple, {need}) or a multiple of {need}"
        ) from None
    idx = layout.local_indices(rank)

    def local(x):
        return x.reshape(-1)[idx].unsqueeze(0).to(device)

    local_pos = local(pos_p)
    ctx = RingAttnContext(
        layout=layout,
        group=group,
        rank=rank,
        position_ids=local_pos,
        batch_shape=(b, s),
        padded_len=padded,
        batch_digest=_digest(ids_p, pos_p, shift_p),
        max_doc_len=int((cu[1:] - cu[:-1]).max()),
        comm=comm,
        backend=backend,
        groups=groups,
    )
    return {
        "input_ids": local(ids_p),
        "position_ids": local_pos,
        "labels": local(labels_p),
        "shift_labels": local(shift_p),
        "num_items_in_batch": _num_items(num_items_in_batch, ctx, device),
        "use_cache": False,
        CONTEXT_KWARG: ctx,
    }


def _read(batch: Mapping[str, Any], eod_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [b, s], documents (global cu_seqlens), position ids [b, s])`` of a packed batch, checked."""
    ids = _as_2d("input_ids", batch["input_ids"])
    b, s = ids.shape
    if s == 0:
        raise ValueError("input_ids: sequence length must be positive")
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() != 2 or tuple(mask.shape) != (b, s) or not bool((mask != 0).all()):
            raise ValueError(
                "attention_mask: ringattn takes documents, not padding masks; expected none or all ones "
                f"[b, s] (use DataCollatorWithFlattening, or pass eod_id), got shape {tuple(mask.shape)}"
                + ("" if mask.dim() != 2 else " with padded positions")
            )
    pos_in = batch.get("position_ids")
    pos_in = None if pos_in is None else _as_2d("position_ids", pos_in, (b, s))
    cu = _documents(batch, ids, eod_id, pos_in)
    if pos_in is not None and eod_id is None:
        return ids, cu, pos_in
    return ids, cu, position_ids_from_cu_seqlens(cu, b * s).view(b, s)


def _labels(batch: Mapping[str, Any], ids: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, shift_labels)``: the batch's, or shifted over the whole batch here (no prediction crosses a
    document)."""
    shape = tuple(ids.shape)
    labels = batch.get("labels")
    labels = ids if labels is None else _as_2d("labels", labels, shape)
    shift = batch.get("shift_labels")
    if shift is not None:
        return labels, _as_2d("shift_labels", shift, shape)
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = labels[:, 1:]
    shift.view(-1)[cu[1:] - 1] = IGNORE_INDEX  # the last token of a document predicts nothing
    return labels, shift


def _pad(x: torch.Tensor, padded: int, value: int, filler: torch.Tensor | None = None) -> torch.Tensor:
    """``x [b, s]`` padded to ``[b, padded]`` with ``value`` (or the ``filler`` row)."""
    b, s = x.shape
    out = torch.full((b, padded), value, dtype=x.dtype)
    out[:, :s] = x
    if filler is not None:
        out[:, s:] = filler
    return out


def _padded_documents(cu: torch.Tensor, b: int, s: int, padded: int) -> list[int]:
    """The documents of ``b`` samples of ``s`` tokens padded to ``padded``: one filler document per sample's padding."""
    fill = padded - s
    return sorted(
        {int(x) // s * padded + int(x) % s for x in cu[:-1]}
        | ({j * padded + s for j in range(b)} if fill else set())
        | {b * padded}
    )


def _num_items(num_items_in_batch, ctx: RingAttnContext, device) -> torch.Tensor:
    """The batch's label count for the loss, carrying the check that ringattn's attention ran (float32, exact up to
    2**24 labels; a larger count is passed as it is, without the check)."""
    count = torch.as_tensor(num_items_in_batch).to(device)
    if count.numel() != 1 or count.dtype.is_floating_point or int(count) >= 1 << 24:
        return count
    return attended_check(count, ctx)

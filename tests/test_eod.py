"""ringattn.eod against a direct loop written from Megatron's definition."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn.eod import cu_seqlens_from_tokens, eod_metadata

EOD = 7


def megatron_loop(tokens, eod, eod_mask_loss):
    """get_ltor_masks_and_position_ids with reset_position_ids / reset_attention_mask, as a loop."""
    b, s = tokens.shape
    mask = torch.tril(torch.ones(b, s, s, dtype=torch.bool))
    pos = torch.arange(s).repeat(b, 1)
    loss = torch.ones(b, s)
    if eod_mask_loss:
        loss[tokens == eod] = 0.0
    for i in range(b):
        prev = 0
        for j in range(s):
            if tokens[i, j] == eod:
                mask[i, j + 1 :, : j + 1] = False
                pos[i, j + 1 :] -= j + 1 - prev
                prev = j + 1
    return mask, pos, loss


def mask_from_cu(cu, b, s):
    doc = torch.empty(b * s, dtype=torch.long)
    for d, (x, y) in enumerate(zip(cu, cu[1:])):
        doc[x:y] = d
    doc = doc.view(b, s)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    return (doc[:, :, None] == doc[:, None, :]) & causal


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_matches_megatron_definition(b, s, seed, eod_mask_loss):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (b, s), generator=g)  # EoD (7) appears with p = 0.1, runs included
    meta = eod_metadata(tokens, EOD, eod_mask_loss=eod_mask_loss)
    mask, pos, loss = megatron_loop(tokens, EOD, eod_mask_loss)
    cu = meta.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == b * s and all(y > x for x, y in zip(cu, cu[1:]))
    assert all(c in cu for c in range(0, b * s + 1, s)), "sample boundaries are document boundaries"
    assert torch.equal(mask_from_cu(cu, b, s), mask)
    assert torch.equal(meta.position_ids, pos)
    assert torch.equal(meta.loss_mask, loss)


def test_document_ends_with_its_eod():
    tokens = torch.tensor([[1, 7, 2, 3, 7, 7, 4, 5]])
    assert cu_seqlens_from_tokens(tokens, EOD).tolist() == [0, 2, 5, 6, 8]
    assert eod_metadata(tokens, EOD).position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]


def test_no_reset_keeps_positions():
    tokens = torch.tensor([[1, 7, 2, 3]])
    assert eod_metadata(tokens, EOD, reset_position_ids=False).position_ids.tolist() == [[0, 1, 2, 3]]

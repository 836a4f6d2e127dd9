"""Malformed input raises ValueError naming the problem, before any communication."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn import DocLayout
from ringattn.attention import check_inputs

from .dist import run_ranks


@pytest.mark.parametrize(
    "cu, cp, sample_len, match",
    [
        ([0, 10, 30], 4, None, "multiple of 2\\*cp_size=8"),
        ([1, 10, 32], 2, None, "start at 0"),
        ([0, 10, 10, 32], 2, None, "strictly increasing"),
        ([0, 20, 10, 32], 2, None, "strictly increasing"),
        ([0, 10, 40], 2, 32, "multiple of sample_len=32"),
        ([0, 20, 40, 64], 2, 32, "sample boundaries must be document boundaries"),
        ([0], 2, None, "at least 2 entries"),
        ([0, 32], 0, None, "cp_size"),
    ],
)
def test_bad_cu_seqlens(cu, cp, sample_len, match):
    with pytest.raises(ValueError, match=match):
        DocLayout.from_cu_seqlens(cu, cp, sample_len=sample_len)


def test_bad_strategy():
    with pytest.raises(ValueError, match="strategy"):
        DocLayout.from_cu_seqlens([0, 32], 2, strategy="nope")


def test_tokens_not_matching_cu_seqlens_end():
    tokens = torch.ones(2, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of 2\\*cp_size=8"):
        DocLayout.from_tokens(tokens, 0, 4)


LAYOUT = DocLayout.from_cu_seqlens([0, 5, 16], 2)


def qkv(tq=8, tk=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (
        torch.randn(tq, hq, d, dtype=dtype),
        torch.randn(tk, hkv, d, dtype=dtype),
        torch.randn(tk, hkv, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(tq=7), "q: expected 8 tokens on rank 1"),
        (dict(tk=9), "k: expected 8 tokens on rank 1"),
        (dict(hq=3, hkv=2), "multiple of k/v heads"),
        (dict(hq=4, hkv=3), "multiple of k/v heads"),
    ],
)
def test_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        check_inputs(*qkv(**args), LAYOUT, 1)


def test_bad_dtype_device_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        check_inputs(q, k.double(), v, LAYOUT, 0)
    with pytest.raises(ValueError, match="device"):
        check_inputs(q, k.to("meta"), v, LAYOUT, 0)
    with pytest.raises(ValueError, match="head_dim"):
        check_inputs(q, k[..., :8], v[..., :8], LAYOUT, 0)
    with pytest.raises(ValueError, match="floating"):
        check_inputs(q.long(), k.long(), v.long(), LAYOUT, 0)
    with pytest.raises(ValueError, match="shape \\[tokens, heads, head_dim\\]"):
        check_inputs(q[0], k, v, LAYOUT, 0)


def test_cp_layout_without_process_group():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="initialised process group"):
        ringattn.ring_eod_attention(q, k, v, LAYOUT)


def test_bad_scale_and_comm():
    layout = DocLayout.from_cu_seqlens([0, 8], 1)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softmax_scale"):
        ringattn.ring_eod_attention(q, k, v, layout, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="comm"):
        ringattn.ring_eod_attention(q, k, v, layout, comm="star")


def _bad_inputs_worker(rank, cp, payload):
    """Every rank gets malformed input; each must raise ValueError without posting any P2P op."""
    import torch.distributed as dist

    posted = []
    real = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: posted.extend(ops) or real(ops)
    layout = DocLayout.from_cu_seqlens([0, 5, 16], cp)
    n = layout.local_tokens(rank)
    messages = []
    for q, k, v, lay in [
        (torch.randn(n + 1, 4, 8), torch.randn(n + 1, 2, 8), torch.randn(n + 1, 2, 8), layout),
        (torch.randn(n, 4, 8), torch.randn(n, 3, 8), torch.randn(n, 3, 8), layout),
        (torch.randn(n, 4, 8), torch.randn(n, 2, 8).double(), torch.randn(n, 2, 8), layout),
        (
            torch.randn(n, 4, 8),
            torch.randn(n, 2, 8),
            torch.randn(n, 2, 8),
            DocLayout.from_cu_seqlens([0, 5, 16], cp * 2 if 16 % (4 * cp) == 0 else 1),
        ),
    ]:
        try:
            ringattn.ring_eod_attention(q, k, v, lay)
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages, len(posted)


def test_all_ranks_reject_malformed_input_before_communicating():
    results = run_ranks(2, _bad_inputs_worker, timeout_s=20)
    for status, res in results:
        assert status == "ok", res
        messages, posted = res
        assert posted == 0
        assert all(m is not None for m in messages), messages
        assert "tokens on rank" in messages[0] and "multiple of k/v heads" in messages[1]
        assert "dtype" in messages[2] and "ranks (layout.cp_size)" in messages[3]


def test_balanced_strategy_checks_its_chunking():
    with pytest.raises(ValueError, match="chunks_per_rank\\*cp_size=16"):
        DocLayout.from_cu_seqlens([0, 40], 4, strategy="balanced")
    with pytest.raises(ValueError, match="chunks_per_rank: expected a positive int"):
        DocLayout.from_cu_seqlens([0, 32], 4, strategy="balanced", chunks_per_rank=0)

"""Agreement before communication, and bounded failure when a rank fails mid-exchange."""

from __future__ import annotations

import os
import time

import pytest
import torch

import ringattn
import ringattn.attention
from ringattn import DocLayout

from .dist import run_ranks, unwrap

CU = [0, 3, 20, 45, 72]  # documents crossing chunks (72 = 2*cp*chunk for cp 2 and 3), so every shape exchanges KV


def _inputs(layout, rank, dtype=torch.float32, hkv=2, extra=0):
    n = layout.local_tokens(rank) + extra
    g = torch.Generator().manual_seed(rank)
    return (
        torch.randn(n, 4, 16, generator=g).to(dtype).requires_grad_(),
        torch.randn(n, hkv, 16, generator=g).to(dtype).requires_grad_(),
        torch.randn(n, hkv, 16, generator=g).to(dtype).requires_grad_(),
    )


def _disagreement_worker(rank, cp, what):
    cu = CU
    if what == "layout" and rank == 1:
        cu = [0, 3, 21, 45, 72]
    layout = DocLayout.from_cu_seqlens(cu, cp)
    dtype = torch.bfloat16 if (what == "dtype" and rank == 2) else torch.float32
    q, k, v = _inputs(layout, rank, dtype=dtype, extra=1 if (what == "tokens" and rank == 1) else 0)
    scale = 0.5 if (what == "scale" and rank == 0) else None
    try:
        ringattn.ring_eod_attention(q, k, v, layout, softmax_scale=scale)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "what, expect",
    [
        ("tokens", "rank 1: q: expected"),
        ("dtype", "ranks disagree"),
        ("layout", "ranks disagree"),
        ("scale", "ranks disagree"),
    ],
)
def test_every_rank_raises_the_same_error(rank_pools, what, expect):
    results = rank_pools(3).run(_disagreement_worker, what, timeout_s=60)
    messages = [res for status, res in results]
    assert all(status == "ok" for status, _ in results), results
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1, "every rank raises the same ValueError"
    assert expect in messages[0]


FIELDS = ("layout", "q heads/dim", "k/v heads/dim", "dtype", "softmax_scale", "comm", "ulysses x ring")


def _one_field_worker(rank, cp, what):
    """Every rank's input is valid on its own; rank 1 differs from the others in one agreed fact only."""
    odd = rank == 1
    cu = [0, 3, 21, 45, 72] if (what == "layout" and odd) else CU
    layout = DocLayout.from_cu_seqlens(cu, cp)
    n = layout.local_tokens(rank)
    g = torch.Generator().manual_seed(rank)
    hq = 2 if (what == "q heads/dim" and odd) else 4
    hkv = 1 if (what == "k/v heads/dim" and odd) else 2
    dtype = torch.bfloat16 if (what == "dtype" and odd) else torch.float32
    q = torch.randn(n, hq, 16, generator=g).to(dtype)
    k, v = (torch.randn(n, hkv, 16, generator=g).to(dtype) for _ in range(2))
    try:
        ringattn.ring_eod_attention(
            q,
            k,
            v,
            layout,
            softmax_scale=0.5 if (what == "softmax_scale" and odd) else None,
            comm="ring" if (what == "comm" and odd) else "direct",
        )
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("field", [f for f in FIELDS if f != "ulysses x ring"])
def test_ranks_that_differ_in_one_field_get_one_error_naming_it(rank_pools, field):
    """Every field of the agreement is checked: rank 1 differs in that field alone, and every rank raises the same
    ValueError before communicating, naming that field (with each rank group's value and the remedy) and no other."""
    results = rank_pools(3).run(_one_field_worker, field, timeout_s=60)
    assert all(status == "ok" for status, _ in results), results
    messages = [res for _, res in results]
    assert messages[0] is not None and len(set(messages)) == 1, messages
    msg = messages[0]
    assert f"ranks disagree on {field} (ranks [0, 2]: " in msg and "ranks [1]: " in msg, msg
    assert ringattn.attention.AGREEMENT_REMEDIES[field] in msg, msg
    assert [f for f in FIELDS if f"{f} (ranks" in msg] == [field], msg


def _split_worker(rank, cp, _):
    """Ranks 0-1 run a pure ring of 4, ranks 2-3 the same documents as Ulysses 2 x ring 2: each rank's groups fit
    its own layout, so only the agreement can see that they differ."""
    hybrid = rank >= 2
    groups = ringattn.new_cp_groups(2)
    layout = DocLayout.from_cu_seqlens([0, 3, 21, 45, 80], cp, ulysses_size=2 if hybrid else 1)
    q, k, v = _inputs(layout, rank)
    try:
        ringattn.ring_eod_attention(q, k, v, layout, groups if hybrid else None)
    except ValueError as exc:
        return str(exc)
    return None


def test_ranks_that_differ_in_the_split_get_one_error_naming_it():
    """The Ulysses x ring split is agreed too (it can only differ together with the layout, which records it)."""
    messages = [res for res in unwrap(run_ranks(4, _split_worker))]
    assert messages[0] is not None and len(set(messages)) == 1, messages
    assert (
        "ranks disagree on layout (" in messages[0]
        and "ulysses x ring (ranks [0, 1]: '1x4'; ranks [2, 3]: '2x2')" in messages[0]
    ), messages[0]


def _agreement_cost_worker(rank, cp, _):
    layout = DocLayout.from_cu_seqlens(CU, cp)
    q, k, v = _inputs(layout, rank)
    calls = []
    import torch.distributed as dist

    real = dist.all_gather
    dist.all_gather = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        for _ in range(3):
            ringattn.ring_eod_attention(q, k, v, layout)  # agreed once, then cached on the layout
        first = len(calls)
        for _ in range(2):
            ringattn.ring_eod_attention(q, k, v, layout, validate=True)
        return first, len(calls)
    finally:
        dist.all_gather = real


def test_agreement_runs_on_first_use_and_when_asked(rank_pools):
    for status, res in rank_pools(2).run(_agreement_cost_worker):
        assert status == "ok", res
        assert res == (1, 3)


def _fault_worker(rank, cp, mode):
    """Rank 1 fails at its second kernel call (inside the exchange loop); the others must not hang."""
    from ringattn.kernels import cpu

    layout = DocLayout.from_cu_seqlens(CU, cp)
    q, k, v = _inputs(layout, rank)
    ringattn.ring_eod_attention(q, k, v, layout, comm="plain")  # connections up, agreement done
    if rank == 1:
        real, count = cpu.forward, [0]

        def failing(*args):
            count[0] += 1
            if count[0] == 2:
                if mode == "die":
                    os._exit(3)
                if mode == "hang":
                    time.sleep(600)
                raise RuntimeError("injected kernel failure")
            return real(*args)

        cpu.forward = failing
    t0 = time.perf_counter()
    try:
        for _ in range(3):  # a rank that needs nothing more from rank 1 may finish one pass; not three
            ringattn.ring_eod_attention(q, k, v, layout, comm="plain").sum().backward()
    except RuntimeError as exc:
        return "raised", str(exc), time.perf_counter() - t0
    return "returned", "", time.perf_counter() - t0


@pytest.mark.parametrize("mode", ["raise", "die", "hang"])
def test_peer_failure_raises_naming_step_and_peer(mode):
    """The other ranks raise within the group's timeout, naming the step and the peers."""
    timeout = 5
    results = run_ranks(
        3,
        _fault_worker,
        mode,
        timeout_s=timeout,
        tolerate_exit=True,
        kill_after_s=60,
        hung_ranks=(1,) if mode == "hang" else (),
    )
    if mode == "die":
        assert results[1] == ("dead", 3)
    if mode == "hang":
        assert results[1][0] == "dead", "the hanging rank was killed by the test"
    for r in (0, 2):
        status, res = results[r]
        assert status == "ok", res
        outcome, msg, took = res
        assert outcome == "raised", f"rank {r} returned although rank 1 failed"
        assert "step" in msg and "peer rank(s) [" in msg, msg
        assert took < timeout + 10


def _later_bad_input_worker(rank, cp, validate):
    """The layout is agreed on the first call; on the second, rank 1 passes one token too many."""
    layout = DocLayout.from_cu_seqlens(CU, cp)
    ringattn.ring_eod_attention(*_inputs(layout, rank), layout)
    q, k, v = _inputs(layout, rank, extra=1 if rank == 1 else 0)
    try:
        ringattn.ring_eod_attention(q, k, v, layout, validate=validate).sum().backward()
    except (ValueError, RuntimeError) as exc:
        return type(exc).__name__, str(exc)
    return "returned", ""


def test_bad_input_on_a_later_call_says_what_the_other_ranks_see():
    """Without validate=True a later call is checked on each rank only (agreement costs a collective): the bad rank's
    ValueError says so, the others time out with a RuntimeError that names the remedy. With validate=True every
    rank raises the same ValueError."""
    results = run_ranks(3, _later_bad_input_worker, False, timeout_s=5)
    (s0, r0), (s1, r1), (s2, r2) = results
    assert s0 == s1 == s2 == "ok", results
    assert r1[0] == "ValueError" and "q: expected" in r1[1] and "found on this rank only" in r1[1], r1
    for kind, msg in (r0, r2):
        assert kind == "RuntimeError" and "peer rank(s)" in msg and "validate=True" in msg, msg
    results = run_ranks(3, _later_bad_input_worker, True, timeout_s=5)
    messages = {res for _, res in results}
    assert len(messages) == 1, messages
    kind, msg = messages.pop()
    assert kind == "ValueError" and "rank 1: q: expected" in msg and "found on this rank only" not in msg

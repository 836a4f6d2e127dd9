"""Sliding windows and learned sinks under EoD context parallelism, against an independent float64 reference.

The reference (:func:`window_reference`) builds the full ``[S, S]`` mask from the document list and the window
definition alone (query ``i`` sees key ``j`` of its document iff ``i - W < j <= i``) and appends one sink logit
per head to every softmax row; it shares nothing with the planner. The multi-rank cases run CP 1-4 and Ulysses
2 x ring 2, every comm shape, MHA / GQA / MQA, windows 1, 2, sizes that cut chunks mid-document and one longer
than every document; the plan tests check that a window removes exactly the masked work and traffic.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ringattn
from ringattn import DocLayout, build_plan, rank_plan

from .dist import unwrap

CU = [0, 7, 40, 41, 70, 96]  # documents crossing chunk edges at CP 2-4 (96 = 2*4*12 = 4*4*6)
LONGEST = 33
WINDOWS = [1, 2, 5, 11, 23, LONGEST + 4]


def window_reference(q, k, v, cu, scale, window=None, sinks=None):
    """float64 out ``[S, Hq, D]`` of document-causal attention under ``window`` with ``sinks`` (dense, full mask)."""
    q, k, v = q.double(), k.double(), v.double()
    hq = q.shape[1]
    k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    s = q.shape[0]
    doc = torch.zeros(s, dtype=torch.int64)
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = d
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    keep = (doc[:, None] == doc[None, :]) & (j <= i)
    if window is not None:
        keep &= j > i - window
    scores = (torch.einsum("ihd,jhd->hij", q, k) * scale).masked_fill(~keep, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[:, None, None].expand(hq, s, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1)[..., :s]
    return torch.einsum("hij,jhd->ihd", p, v)


def _global(seed: int, total: int, hq: int, hkv: int, d: int, sinks: bool):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(total, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq)]
    return t + [torch.randn(hq, generator=g, dtype=torch.float64) if sinks else None]


def _run_case(rank, cp, case):
    """This rank's out and grads (q, k, v, sinks partial) for one case; every rank builds the same globals."""
    cu, hq, hkv, d, _, use_sinks, *_, backend, seed = case
    return run_on_rank(rank, cp, case, _global(seed, cu[-1], hq, hkv, d, use_sinks), backend)


def run_on_rank(rank, cp, case, tensors, backend):
    """``(local indices, out, dq, dk, dv, dsinks partial)`` in float64 of this rank for ``case`` on the global
    float64 ``tensors`` ``(q, k, v, dout, sinks or None)`` (the same on every rank)."""
    cu, _, _, _, window, _, comm, strategy, ulysses, dtype, *_ = case
    layout = DocLayout.from_cu_seqlens(cu, cp, strategy=strategy, ulysses_size=ulysses)
    group = ringattn.new_cp_groups(ulysses) if ulysses > 1 else None
    q, k, v, dout, sinks = tensors
    idx = layout.local_indices(rank)
    dt = getattr(torch, dtype)
    ql, kl, vl = (x[idx].to(dt).requires_grad_() for x in (q, k, v))
    sl = None if sinks is None else sinks.float().requires_grad_()
    out = ringattn.ring_eod_attention(ql, kl, vl, layout, group, window=window, sinks=sl, comm=comm, backend=backend)
    out.backward(dout[idx].to(dt))
    return (
        idx,
        out.detach().double(),
        ql.grad.double(),
        kl.grad.double(),
        vl.grad.double(),
        None if sl is None else sl.grad.double(),
    )


def _check(case, per_rank, tol):
    cu, hq, hkv, d, window, use_sinks, *_, seed = case
    q, k, v, dout, sinks = _global(seed, cu[-1], hq, hkv, d, use_sinks)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([sinks.clone().requires_grad_()] if use_sinks else [])
    ref = window_reference(*leaves[:3], cu, d**-0.5, window, leaves[3] if use_sinks else None)
    ref.backward(dout)
    got = [torch.zeros_like(x) for x in (q, q, k, v)]
    dsinks = torch.zeros(hq, dtype=torch.float64)
    for idx, *parts, ds in per_rank:
        for full, part in zip(got, parts):
            full[idx] = part
        if ds is not None:
            dsinks += ds  # every rank's partial: their sum is the single-device gradient
    want = [ref.detach()] + [x.grad for x in leaves[:3]]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a - b).abs().max().item()
        assert err < tol, f"{case}: {name} off by {err:.3g}"
    if use_sinks:
        err = (dsinks - leaves[3].grad).abs().max().item()
        assert err < tol, f"{case}: dsinks off by {err:.3g}"


def _cases(cp: int, ulysses: int = 1) -> list[tuple]:
    rng = random.Random(cp * 10 + ulysses)
    heads = [(4, 4), (4, 2), (4, 1)] if ulysses == 1 else [(4, 2), (4, 1)]
    out = []
    for n, (window, (hq, hkv)) in enumerate(itertools.product(WINDOWS, heads)):
        comm = ("direct", "ring", "plain")[n % 3]
        strategy = ("zigzag", "balanced", "auto")[(n // 3) % 3]
        out.append(
            (CU, hq, hkv, 16, window, n % 2 == 0, comm, strategy, ulysses, "float32", "cpu", rng.randrange(1000))
        )
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_window_and_sinks_match_the_dense_reference(rank_pools, cp):
    """fp32 within 1e-5 (out, dq, dk, dv, the CP-summed dsinks): every window size, with and without sinks, every comm
    shape, zigzag / balanced / auto, MHA / GQA / MQA."""
    cases = _cases(cp)
    if cp == 1:
        per_case = [[_run_case(0, 1, c)] for c in cases]
    else:
        per_rank = unwrap(rank_pools(cp).run(_run_cases, cases))
        per_case = list(zip(*per_rank))
    for case, results in zip(cases, per_case):
        _check(case, results, 1e-5)


def _run_cases(rank, cp, cases):
    return [_run_case(rank, cp, c) for c in cases]


def test_window_and_sinks_under_ulysses_2_x_ring_2(rank_pools):
    """Hybrid CP: the all-to-all scatters heads (and the sinks with them), the windowed ring plan runs on the ring."""
    cases = _cases(4, ulysses=2)
    per_case = list(zip(*unwrap(rank_pools(4).run(_run_cases, cases))))
    for case, results in zip(cases, per_case):
        _check(case, results, 1e-5)


def test_math_backend_windows_match():
    """The portable backend masks windows itself (no tiles): the same cases at CP 1."""
    for c in _cases(1)[::3]:
        case = c[:10] + ("math",) + c[11:]
        _check(case, [_run_case(0, 1, case)], 1e-5)


# ---------------------------------------------------------------------------------------------- the plan
def _needed_keys(layout: DocLayout, rank: int, window: int) -> set[int]:
    """Global keys held by other ranks that some query of ``rank`` reads under the window (brute force)."""
    cu = layout.cu_seqlens
    mine = set(layout.local_indices(rank).tolist())
    need = set()
    for i in mine:
        d = max(x for x in range(len(cu) - 1) if cu[x] <= i)
        for j in range(max(cu[d], i - window + 1), i + 1):
            if j not in mine:
                need.add(j)
    return need


@pytest.mark.parametrize("strategy", ["zigzag", "balanced", "auto"])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_window_kv_received_is_exactly_what_the_window_reads(cp, strategy):
    """direct plan: the remote KV rows a rank receives are exactly the keys some local query reads under the window,
    the dK/dV it returns are for those rows, and the total work is the window's unmasked entries, each once."""
    layout = DocLayout.from_cu_seqlens(CU, cp, strategy=strategy)
    for window in WINDOWS:
        plans = [rank_plan(layout, r, "direct", window) for r in range(cp)]
        for x, plan in enumerate(plans):
            got = []
            for step in plan.steps:
                if step.recv is None:
                    continue
                sender = plans[step.recv.peer]
                send = next(s.send for s in sender.steps if s.distance == step.distance)
                assert send.peer == x and send.tokens == step.recv.tokens
                src = layout.local_indices(step.recv.peer).tolist()
                got += [src[r] for a, b in send.rows for r in range(a, b)]
                assert step.grad_send.tokens == step.recv.tokens  # dK/dV of exactly the rows read
            assert len(got) == len(set(got)) and set(got) == _needed_keys(layout, x, window), (cp, strategy, window, x)
        want = sum(min(t + 1, window) for a, b in zip(CU, CU[1:]) for t in range(b - a))
        assert sum(p.work for p in plans) == want


def test_window_shrinks_work_and_traffic_and_a_long_one_changes_nothing():
    """A window never adds work or traffic; one at least the longest document gives the very same plan objects."""
    layout = DocLayout.from_cu_seqlens(CU, 4)
    full = build_plan(layout, "direct").stats
    for window in WINDOWS:
        st = build_plan(layout, "direct", window).stats
        assert all(a <= b for a, b in zip(st.work, full.work)) and sum(st.work) <= sum(full.work)
        assert all(a <= b for a, b in zip(st.kv_recv_tokens, full.kv_recv_tokens))
        assert all(a <= b for a, b in zip(st.pairs_computed, full.pairs_computed))
    assert rank_plan(layout, 1, "direct", LONGEST) is rank_plan(layout, 1, "direct")
    assert build_plan(layout, "ring", 10**6).stats == build_plan(layout, "ring").stats
    one = build_plan(layout, "direct", 1).stats
    assert one.num_steps == 0 and sum(one.kv_recv_tokens) == 0 and sum(one.work) == CU[-1]


def _no_window_worker(rank, cp, _):
    layout = DocLayout.from_cu_seqlens(CU, cp)
    idx = layout.local_indices(rank)
    q, k, v, dout, _ = _global(3, CU[-1], 4, 2, 16, False)
    outs = []
    for window in (None, LONGEST, 10**6):
        ql, kl, vl = (x[idx].float().requires_grad_() for x in (q, k, v))
        out = ringattn.ring_eod_attention(ql, kl, vl, layout, window=window)
        out.backward(dout[idx].float())
        outs.append((out.detach(), ql.grad, kl.grad, vl.grad))
    return all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other))


def test_a_window_longer_than_every_document_is_bit_identical_to_none(rank_pools):
    assert all(unwrap(rank_pools(3).run(_no_window_worker)))


# ---------------------------------------------------------------------------------------------- bad input
def _bad_worker(rank, cp, what):
    layout = DocLayout.from_cu_seqlens(CU, cp)
    n = layout.local_tokens(rank)
    q, k, v = torch.randn(n, 4, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    window, sinks = None, None
    if what == "window not positive":
        window = 0 if rank == 1 else 5
    elif what == "window not int":
        window = 2.5
    elif what == "sinks shape":
        sinks = torch.zeros(2)
    elif what == "sinks dtype":
        sinks = torch.zeros(4, dtype=torch.int64)
    elif what == "sinks device":
        sinks = torch.zeros(4, device="meta")
    elif what == "ranks disagree on window":
        window = 5 if rank == 0 else 6
    elif what == "ranks disagree on sinks":
        sinks = torch.zeros(4) if rank == 2 else None
    try:
        ringattn.ring_eod_attention(q, k, v, layout, window=window, sinks=sinks)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "what, expect",
    [
        ("window not positive", "rank 1: window: expected a positive int"),
        ("window not int", "window: expected a positive int"),
        ("sinks shape", "sinks: expected shape [4]"),
        ("sinks dtype", "sinks: expected a floating dtype"),
        ("sinks device", "sinks: expected to be on q's device"),
        ("ranks disagree on window", "ranks disagree on window (ranks [0]: 5; ranks [1, 2]: 6)"),
        ("ranks disagree on sinks", "ranks disagree on sinks (ranks [0, 1]: 'none'; ranks [2]: 'given')"),
    ],
)
def test_bad_window_or_sinks_raise_the_same_error_on_every_rank(rank_pools, what, expect):
    messages = unwrap(rank_pools(3).run(_bad_worker, what, timeout_s=60))
    assert messages[0] is not None and len(set(messages)) == 1, messages
    assert expect in messages[0], messages[0]

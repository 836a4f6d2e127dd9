"""Runs a global plan on token ids instead of tensors, in pure Python (no torch.distributed).

Each rank's "KV" is the list of global token ids it holds; messages carry ids. The result
says which (query, key) global pairs each rank computed and which ids travelled where, so
tests can compare the plan with what the dense mask requires.
"""

from __future__ import annotations

from collections import Counter


def _take(src, rows):
    return [x for s, e in rows for x in src[s:e]]


def _received(plan, local):
    """Per step, every rank's received ids (None where it receives nothing), routing each step's sends."""
    cp = len(plan.ranks)
    n_steps = len(plan.ranks[0].steps)
    assert all(len(rp.steps) == n_steps for rp in plan.ranks), "every rank runs the same steps"
    prev = [None] * cp
    for i in range(n_steps):
        msgs = {}
        for x, rp in enumerate(plan.ranks):
            st = rp.steps[i]
            assert st.distance == plan.ranks[0].steps[i].distance
            if st.send:
                src = prev[x] if st.send_from_buffer else local[x]
                msgs[(x, st.send.peer)] = _take(src, st.send.rows)
        bufs = []
        for x, rp in enumerate(plan.ranks):
            st = rp.steps[i]
            if st.recv:
                data = msgs.pop((st.recv.peer, x))
                assert len(data) == st.recv.tokens
            else:
                data = None
            bufs.append(data)
        assert not msgs, f"step {i}: sends nobody receives: {list(msgs)}"
        yield bufs
        prev = bufs


def simulate(layout, plan):
    cp = layout.cp_size
    local = [layout.local_indices(r).tolist() for r in range(cp)]
    pairs = [Counter() for _ in range(cp)]  # (q global, k global) -> times computed
    received = [[] for _ in range(cp)]  # per rank, per step: ids received
    grads = []  # (owner, reader, ids) dK/dV returns
    for i, bufs in enumerate(_received(plan, local)):
        for x, data in enumerate(bufs):
            received[x].append(data or [])
        for x, rp in enumerate(plan.ranks):
            st = rp.steps[i]
            src = local[x] if i == 0 else bufs[x]
            assert i == 0 or st.origin == (x - st.distance) % cp
            read = set()
            for seg in st.segments:
                assert seg.q[1] > seg.q[0] and seg.kv[1] > seg.kv[0], "empty block pair"
                qs = local[x][seg.q[0] : seg.q[1]]
                ks = src[seg.kv[0] : seg.kv[1]]
                assert all(k in set(local[st.origin]) for k in ks), "KV from the wrong origin"
                read.update(range(seg.kv[0], seg.kv[1]))
                for a, qg in enumerate(qs):
                    for b, kg in enumerate(ks):
                        if not seg.causal or b <= a:
                            pairs[x][(qg, kg)] += 1
            if i > 0:
                want = sorted(read)
                got = [r for s, e in st.grad_send.rows for r in range(s, e)] if st.grad_send else []
                assert got == want, "dK/dV returned for exactly the rows read"
                if st.grad_send:
                    assert st.grad_send.peer == st.origin
                    ids = _take(src, st.grad_send.rows)
                    orp = plan.ranks[st.origin].steps[i]
                    assert orp.grad_recv.peer == x and _take(local[st.origin], orp.grad_recv.rows) == ids
                    grads.append((st.origin, x, ids))
        # every announced grad_recv has a sender
        for o, rp in enumerate(plan.ranks):
            gr = rp.steps[i].grad_recv
            if gr:
                assert plan.ranks[gr.peer].steps[i].grad_send.peer == o
    return pairs, received, grads


def bf16_partials(layout, plan) -> tuple[int, int]:
    """``(q, kv)``: the most kernel calls any one token takes part in as a query / as a key-value row.

    A step runs at most two kernel calls on a rank (its causal and its dense segments). On a device
    path each call returns bf16 partials, so a token's dq (or dK/dV) is the fp32 sum of that many
    bf16-rounded partials. Only the real-GPU tests still bound their error with this count ((P + 1) / 2
    ulps of the largest value, ``tests/test_attention.py::check_case``), since a real kernel's internal error
    is not modelled; the emulated kernels are checked element by element against the error analysis of
    ``tests/rounding.py`` over :func:`kernel_calls` (which also counts a KV row read by two segments of one
    call twice, as the kernel returns a partial per segment row).
    """
    ring = layout if layout.ulysses_size == 1 else layout.ring_layout
    local = [ring.local_indices(r).tolist() for r in range(ring.cp_size)]
    q_calls, kv_calls = Counter(), Counter()
    for i, bufs in enumerate(_received(plan, local)):
        for x, rp in enumerate(plan.ranks):
            src = local[x] if i == 0 else bufs[x]
            for causal in (True, False):
                segs = [s for s in rp.steps[i].segments if s.causal == causal]
                q_calls.update({t for s in segs for t in local[x][s.q[0] : s.q[1]]})
                kv_calls.update({t for s in segs for t in src[s.kv[0] : s.kv[1]]})
    return max(q_calls.values(), default=1), max(kv_calls.values(), default=1)


def kernel_calls(layout, plan) -> list:
    """Every kernel call the plan makes, on any rank: a list of its segments ``(q ids, kv ids, causal)`` (int64
    tensors of global token ids; a hybrid layout's ring plan, whose ranks hold global tokens too).

    A step runs at most two calls on a rank, its causal and its dense segments. Within a call a query row is in
    one segment, a KV row may be in several (two query pieces reading one KV piece). On a device path each
    segment's partial results come back rounded to half precision, which is what ``tests/rounding.py`` bounds;
    ``tests/test_plan.py`` checks that the plan computes every unmasked pair exactly once.
    """
    import torch

    ring = layout if layout.ulysses_size == 1 else layout.ring_layout
    local = [ring.local_indices(r).tolist() for r in range(ring.cp_size)]
    calls = []
    for i, bufs in enumerate(_received(plan, local)):
        for x, rp in enumerate(plan.ranks):
            src = local[x] if i == 0 else bufs[x]
            for causal in (True, False):
                segs = [g for g in rp.steps[i].segments if g.causal == causal]
                if segs:
                    calls.append(
                        [
                            (torch.tensor(local[x][g.q[0] : g.q[1]]), torch.tensor(src[g.kv[0] : g.kv[1]]), causal)
                            for g in segs
                        ]
                    )
    return calls

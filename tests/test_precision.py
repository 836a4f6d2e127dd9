"""The half-precision promises, pinned directly rather than through an error bound.

* The CPU backend computes partials in fp32, accumulates in fp32 and rounds once: its bf16 CP result is its fp32
  CP result (same values, upcast) rounded once — every element within half a bf16 ulp of it — for the ring, and
  for Ulysses x ring with KV heads split or replicated.
* The executor accumulates dq and dK/dV in fp32 and returns dK/dV partials in fp32, whatever the kernel returns:
  with a kernel that hands back bf16 partials (as a device kernel does), the messages carrying dK/dV are fp32 and
  every gradient element is the fp32 sum of that kernel's partials (recorded on every rank), rounded once.
* Backward gets the merged output in fp32 exactly when the kernel sets ``BACKWARD_TAKES_FP32_OUT`` (ring and
  Ulysses x ring), in q's dtype otherwise.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from .cases import Case, assemble, cp_groups, global_tensors
from .dist import unwrap
from .rounding import half_ulp


def _run(rank, case: Case, dtype, backend=None):
    """This rank's (idx, out, dq, dk, dv) of ``case`` with its (bf16) inputs computed in ``dtype``."""
    import ringattn

    from .cases import case_layout

    layout = case_layout(case, dist_size())
    group = cp_groups(case.ulysses) if case.ulysses is not None else None
    idx = layout.local_indices(rank)
    q, k, v, dout = (x.to(dtype) for x in global_tensors(case))
    q, k, v = (x[idx].clone().requires_grad_() for x in (q, k, v))
    out = ringattn.ring_eod_attention(q, k, v, layout, group, comm=case.comm, backend=backend)
    out.backward(dout[idx])
    return idx, out.detach(), q.grad, k.grad, v.grad


def dist_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _both_dtypes(rank, cp, cases):
    return [(_run(rank, c, torch.bfloat16), _run(rank, c, torch.float32)) for c in cases]


def _rounding_cases(cp: int):
    s = 2 * cp * 6
    docs = (0, 5, s - 9, s)  # a long document over every rank, and short ones
    base = dict(cu_seqlens=docs, sample_len=s, d=64, dtype="bfloat16")
    return [
        Case("ring GQA", hq=4, hkv=2, seed=61, comm="direct", **base),
        Case("ring MHA, ring comm", hq=2, hkv=2, seed=62, comm="ring", **base),
        Case("2x2 KV heads split", hq=4, hkv=2, seed=63, comm="direct", ulysses=2, **base),
        Case("2x2 KV heads replicated", hq=4, hkv=1, seed=64, comm="direct", ulysses=2, **base),
    ]


def test_bf16_cp_result_is_the_fp32_cp_result_rounded_once(rank_pools):
    """CPU backend, CP 4: the bf16 result equals the fp32 result of the same (bf16-valued) inputs rounded once —
    every element of out, dq, dk, dv within half a bf16 ulp of it. Accumulating dq or dK/dV in bf16, returning
    dK/dV partials or replicated KV heads' gradients rounded, or giving backward the rounded output, rounds
    twice somewhere and fails here."""
    cp = 4
    cases = _rounding_cases(cp)
    per_rank = unwrap(rank_pools(cp).run(_both_dtypes, cases))
    for i, case in enumerate(cases):
        s = case.cu_seqlens[-1]
        low = assemble([r[i][0] for r in per_rank], s)
        high = assemble([r[i][1] for r in per_rank], s)
        for name, lo, hi in zip(("out", "dq", "dk", "dv"), low, high):
            assert lo.dtype == torch.bfloat16 and hi.dtype == torch.float32
            excess = (lo.double() - hi.double()).abs() - half_ulp(hi.double(), torch.bfloat16)
            assert excess.max() <= 0, (
                f"{case.name}: {name} is not the fp32 result rounded once: "
                f"{int((excess > 0).sum())} elements off by more than half an ulp"
            )


# ---------------------------------------------------------------------------------------------- spy kernels
def _spy_backend(name: str, fp32_out: bool, round_partials: bool, record: list):
    """Register backend ``name``: the math kernel, returning its partials in q's dtype when ``round_partials``
    (what a device kernel does), with or without ``BACKWARD_TAKES_FP32_OUT``; every call appends to ``record``."""
    from ringattn.kernels import BACKENDS
    from ringattn.kernels import math as mk

    def forward(q, k, v, call, scale):
        out, lse = mk.forward(q, k, v, call, scale)
        return (out.to(q.dtype) if round_partials else out), lse

    def backward(dout, q, k, v, out, lse, call, scale):
        grads = mk.backward(dout, q, k, v, out, lse, call, scale)
        if round_partials:
            grads = tuple(g.to(q.dtype) for g in grads)
        record.append(
            {
                "out_dtype": out.dtype,
                "q": q.detach().clone(),
                "k": k.detach().clone(),
                "grads": tuple(g.detach().clone() for g in grads),
            }
        )
        return grads

    mod = types.ModuleType(name)
    mod.forward, mod.backward = forward, backward
    if fp32_out:
        mod.BACKWARD_TAKES_FP32_OUT = True
    sys.modules[name] = mod
    BACKENDS[name] = name
    return mod


def _spied(rank, cp, payload):
    """Run ``case`` in bf16 on a spy backend; record every kernel backward call and every P2P message's tag and
    dtype. Restores the executor's ``post`` and the registry (pool processes are reused)."""
    import ringattn.comm.executor as executor
    from ringattn.kernels import BACKENDS

    case, fp32_out, round_partials = payload
    record, sent = [], []
    name = f"_spy_{int(fp32_out)}{int(round_partials)}"
    _spy_backend(name, fp32_out, round_partials, record)
    real_post = executor.post

    def post(group, what, sends, recvs, tag):
        sent.extend((tag, t.dtype) for _, t in sends)
        return real_post(group, what, sends, recvs, tag)

    executor.post = post
    try:
        res = _run(rank, case, torch.bfloat16, backend=name)
    finally:
        executor.post = real_post
        BACKENDS.pop(name, None)
        sys.modules.pop(name, None)
    return res, record, sent


def _rows_of(x: torch.Tensor, table: dict) -> list[int]:
    """Global row of every row of ``x`` (bf16 values), by exact value."""
    return [table[bytes(r.contiguous().view(torch.int16).numpy())] for r in x]


def _table(x: torch.Tensor) -> dict:
    table = {bytes(r.contiguous().view(torch.int16).numpy()): i for i, r in enumerate(x)}
    assert len(table) == x.shape[0], "rows must be distinct to be identified"
    return table


def test_executor_accumulates_dq_and_dkv_in_fp32_and_returns_dkv_in_fp32(rank_pools):
    """CP 4, one long document (up to 5 partials per dq row, 8 per dK/dV row), a kernel that returns bf16
    partials: every dK/dV message is fp32 (KV messages bf16), and each of dq, dk, dv is the fp32 sum of all the
    kernel's partials of that row — identified by value on every rank — rounded once (half an ulp). Summing in
    bf16 anywhere (dq or dK/dV accumulator, returned partial) rounds more than once and fails."""
    cp = 4
    s = 2 * cp * 6
    case = Case("one document", (0, s), s, hq=4, hkv=2, d=64, dtype="bfloat16", seed=65, comm="direct")
    per_rank = unwrap(rank_pools(cp).run(_spied, (case, False, True)))
    q, k, _, _ = global_tensors(case)
    q_rows, k_rows = _table(q.reshape(s, -1)), _table(k.reshape(s, -1))
    sums = [
        torch.zeros(q.shape, dtype=torch.float64),
        torch.zeros(k.shape, dtype=torch.float64),
        torch.zeros(k.shape, dtype=torch.float64),
    ]
    counts = torch.zeros(s, dtype=torch.long)
    for _, record, sent in per_rank:
        assert {d for t, d in sent if t == 12} == {torch.float32}, sent  # TAG_GRAD: dK/dV partials
        assert {d for t, d in sent if t == 11} == {torch.bfloat16}, sent  # TAG_KV: K/V in the inputs' dtype
        for call in record:
            qi = _rows_of(call["q"].reshape(call["q"].shape[0], -1), q_rows)
            ki = _rows_of(call["k"].reshape(call["k"].shape[0], -1), k_rows)
            g_q, g_k, g_v = (g.double() for g in call["grads"])
            sums[0].index_add_(0, torch.tensor(qi), g_q)
            sums[1].index_add_(0, torch.tensor(ki), g_k)
            sums[2].index_add_(0, torch.tensor(ki), g_v)
            counts.index_add_(0, torch.tensor(ki), torch.ones(len(ki), dtype=torch.long))
    assert counts.max() >= 4  # several partials per KV row, so a bf16 sum would round several times
    got = assemble([r[0] for r in per_rank], s)[1:]
    for name, x, want in zip(("dq", "dk", "dv"), got, sums):
        excess = (x.double() - want).abs() - half_ulp(want, torch.bfloat16) * (1 + 2**-16) - 1e-7
        assert excess.max() <= 0, (
            f"{name} is not the fp32 sum of the kernel's partials rounded once: {int((excess > 0).sum())} elements off"
        )


def _saved_out_dtypes(rank, cp, payload):
    case, fp32_out = payload
    res, record, _ = _spied(rank, cp, (case, fp32_out, False))
    return sorted({str(r["out_dtype"]) for r in record})


@pytest.mark.parametrize("ulysses", [None, 2], ids=["ring", "ulysses_2x1"])
@pytest.mark.parametrize("fp32_out", [True, False], ids=["fp32_out", "kernel_dtype_out"])
def test_backward_gets_the_fp32_merged_output_when_the_kernel_asks(ulysses, fp32_out, rank_pools):
    """A kernel with ``BACKWARD_TAKES_FP32_OUT`` is handed the merged output in fp32 (no rounding noise in its
    rowsum term); any other kernel gets it in q's dtype, as the device operators take it. Ring at CP 2 and pure
    Ulysses 2x1."""
    cp = 2
    s = 2 * cp * 4
    case = Case(
        "saved output", (0, 5, s), s, hq=4, hkv=2, d=16, dtype="bfloat16", seed=66, comm="direct", ulysses=ulysses
    )
    per_rank = unwrap(rank_pools(cp).run(_saved_out_dtypes, (case, fp32_out)))
    want = ["torch.float32"] if fp32_out else ["torch.bfloat16"]
    assert all(r == want for r in per_rank), per_rank

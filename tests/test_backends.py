"""Backend selection, the NPU emulation's strictness, host staging, and GPU runs where present."""

from __future__ import annotations

import sys

import pytest
import torch

from ringattn.kernels import VarlenCall, get_backend

from . import flash_standin
from . import npu_emulation as emu
from .cases import Case, assemble, global_tensors, run_cases
from .dist import run_ranks, unwrap
from .reference import dense_with_grads
from .test_attention import check_case, device_baseline, layout_cases


def test_backend_from_device_type_and_override():
    assert get_backend("cpu").__name__ == "ringattn.kernels.cpu"
    assert get_backend("cpu", "math").__name__ == "ringattn.kernels.math"
    assert get_backend("cuda").__name__ == "ringattn.kernels.cuda"
    with pytest.raises(ValueError, match="backend"):
        get_backend("xpu")


def test_npu_backend_without_torch_npu_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    npu = get_backend("cpu", "npu")
    q = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="torch_npu could not be imported"):
        npu.forward(q, q, q, VarlenCall((0, 4), (0, 4), True), 0.1)


def test_npu_backend_refuses_what_the_operator_documents_as_unsupported():
    npu = get_backend("cpu", "npu")
    with pytest.raises(ValueError, match="head_dim at most 768"):
        npu.validate(*(torch.empty(4, 2, 800),) * 3)
    with pytest.raises(ValueError, match="at most 256 query heads"):
        npu.validate(*(torch.empty(4, 300, 64),) * 3)
    with pytest.raises(ValueError, match="dtype"):
        npu.validate(*(torch.empty(4, 2, 64, dtype=torch.float64),) * 3)


def _emulated(generation):
    return emu._bind(emu._Generation(generation))


def test_emulation_rejects_contract_misuse():
    fwd, bwd = _emulated("current")
    q = torch.randn(6, 2, 64)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        fwd(q, q, q, 2, "TND", actual_seq_qlen=[4, 2, 6], actual_seq_kvlen=[4, 2, 6])
    with pytest.raises(RuntimeError, match="1..1024"):
        fwd(q, q, q, 2, "TND", actual_seq_qlen=[0] * 1024 + [6], actual_seq_kvlen=[0] * 1024 + [6])
    with pytest.raises(RuntimeError, match="equal length"):
        fwd(q, q, q, 2, "TND", actual_seq_qlen=[0, 6], actual_seq_kvlen=[6])
    with pytest.raises(RuntimeError, match="triu"):
        fwd(q, q, q, 2, "TND", atten_mask=~mask, sparse_mode=3, actual_seq_qlen=[6], actual_seq_kvlen=[6])
    out, smax, ssum = fwd(q, q, q, 2, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6])[:3]
    with pytest.raises(TypeError):  # the grad op's keyword is scale_value, not scale
        bwd(
            q,
            q,
            q,
            q,
            2,
            "TND",
            softmax_max=smax,
            softmax_sum=ssum,
            attention_in=out,
            scale=0.1,
            actual_seq_qlen=[6],
            actual_seq_kvlen=[6],
        )
    # zero-length segments are documented as allowed: a leading 0 is an empty first segment
    again = fwd(q, q, q, 2, "TND", actual_seq_qlen=[0, 6], actual_seq_kvlen=[0, 6])[0]
    assert torch.equal(again, out)
    # lists covering fewer tokens than the tensors must end in 0 (CANN 9 tiling); then the rest is not computed
    with pytest.raises(RuntimeError, match="should be 0 in EOD scenario"):
        fwd(q, q, q, 2, "TND", actual_seq_qlen=[4], actual_seq_kvlen=[4])
    part = fwd(q, q, q, 2, "TND", actual_seq_qlen=[4, 0], actual_seq_kvlen=[4, 0])[0]
    assert torch.equal(part[:4], fwd(q[:4], q[:4], q[:4], 2, "TND", actual_seq_qlen=[4], actual_seq_kvlen=[4])[0])
    # generations: the keyword is unknown before torch_npu 7.2, refused by a CANN without the V4 kernels
    legacy_fwd, _ = _emulated("legacy")
    with pytest.raises(TypeError):
        legacy_fwd(q, q, q, 2, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6], softmax_layout="TND")
    old_cann_fwd, _ = _emulated("layout-kwarg-old-cann")
    with pytest.raises(RuntimeError, match="softmax_layout is not supported"):
        old_cann_fwd(q, q, q, 2, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6], softmax_layout="TND")
    # npu_ring_attention_update: the real keywords, D a multiple of 64, int64 actual_seq_qlen from 0 to T
    stats = torch.zeros(6, 2, 8)
    ones = torch.ones(6, 2, 8)
    seq = torch.tensor([0, 6])
    with pytest.raises(TypeError):  # MindSpeed's wrapper keyword, not torch_npu's
        emu.npu_ring_attention_update(q, stats, ones, q, stats, ones, actual_seq_qlen=seq, layout="TND")
    with pytest.raises(RuntimeError, match="multiple of 64"):
        small = torch.randn(6, 2, 32)
        emu.npu_ring_attention_update(
            small, stats, ones, small, stats, ones, actual_seq_qlen=seq, input_layout="TND", input_softmax_layout="TND"
        )
    with pytest.raises(RuntimeError, match="from 0 to T"):
        emu.npu_ring_attention_update(
            q,
            stats,
            ones,
            q,
            stats,
            ones,
            actual_seq_qlen=torch.tensor([6]),
            input_layout="TND",
            input_softmax_layout="TND",
        )
    with pytest.raises(RuntimeError, match="same shape and dtype"):
        emu.npu_ring_attention_update(
            q,
            stats,
            ones,
            q.bfloat16(),
            stats,
            ones,
            actual_seq_qlen=seq,
            input_layout="TND",
            input_softmax_layout="TND",
        )


def test_emulation_default_statistics_match_mindspeeds_flatten_softmax():
    """The default TND statistics, read the way MindSpeed's ``flatten_softmax`` reads them (per segment of
    length s, the next s*N rows of the [-1, 8] view are an [N, s, 8] block), equal the token-major ones."""
    fwd, _ = _emulated("current")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 3, 64, generator=g) for _ in range(3))
    lengths = [2, 4, 3]
    seq = [2, 6, 9]
    default = fwd(q, k, v, 3, "TND", actual_seq_qlen=seq, actual_seq_kvlen=seq)[1]
    token_major = fwd(q, k, v, 3, "TND", actual_seq_qlen=seq, actual_seq_kvlen=seq, softmax_layout="TND")[1]
    rows = default.reshape(-1, 8).split([n * 3 for n in lengths])
    flattened = torch.cat([r.view(3, n, 8).transpose(0, 1) for r, n in zip(rows, lengths)])
    assert torch.equal(flattened, token_major)
    assert not torch.equal(default, token_major)  # with several heads and segments the layouts differ


def _layout_regression_worker(rank, cp, payload):
    """Run cases on the NPU backend; with ``old_reading`` the statistics are read token-major (identity index),
    as before issue 9 — restored afterwards, the pool process is reused."""
    import ringattn.kernels.npu as npu

    cases, old_reading = payload
    original = npu._head_major_index
    if old_reading:

        def identity(call, chunk, heads, device):
            idx = torch.arange((chunk.q1 - chunk.q0) * heads, device=device)
            return idx, idx

        npu._head_major_index = identity
    try:
        return run_cases(rank, cp, cases)
    finally:
        npu._head_major_index = original


def _max_error(case, got) -> float:
    q, k, v, dout = global_tensors(case)
    ref = dense_with_grads(q, k, v, dout, case.cu_seqlens, case.d**-0.5)
    return max((x.double() - r).abs().max().item() for x, r in zip(got, ref))


@pytest.mark.parametrize("cp", [2, 4])
def test_npu_default_statistics_layout_regression(cp, rank_pools):
    """Several heads, several segments per call, default (legacy) statistics layout: exact as the CPU
    backend (fp32 <= 1e-5), while the pre-fix token-major reading of the same statistics is far off."""
    s = 2 * cp * 8
    cu = tuple(range(0, s, 5)) + (s,)  # 5-token documents: many cross a chunk with 2+ tokens on each side
    case = Case("layout regression", cu, s, hq=4, hkv=2, d=64, seed=31, comm="direct", backend="npu-legacy")
    errors = {}
    for old in (False, True):
        per_rank = unwrap(rank_pools(cp).run(_layout_regression_worker, ([case], old)))
        errors[old] = _max_error(case, assemble([r[0] for r in per_rank], s))
    assert errors[False] <= 1e-5, errors
    assert errors[True] > 1e-2, errors


def test_npu_step_with_more_than_1024_segments_is_split_and_exact(rank_pools):
    """1,200 single-token documents on rank 0 plus a document crossing ranks: step 0's causal call has
    1,201 segments, more than the operator's 1,024, so the backend splits it; both generations exact."""
    from ringattn import DocLayout
    from ringattn.comm.executor import plan_exec
    from ringattn.plan import rank_plan

    s = 4800
    cu = tuple(range(0, 2201)) + (s,)
    plan = rank_plan(DocLayout.from_cu_seqlens(cu, 2), 0, "direct")
    causal = [c for c in plan_exec(plan).steps[0].calls if c.varlen.causal][0]
    assert causal.varlen.num_segments > 1024
    cases = [
        Case(">1024 segments", cu, s, hq=2, hkv=1, d=64, seed=41, comm="direct", backend=b)
        for b in ("npu", "npu-legacy")
    ]
    per_rank = unwrap(rank_pools(2).run(run_cases, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], s))


def test_npu_capabilities_are_detected_once():
    """The softmax_layout probe costs one extra call per op on the first use, none afterwards."""
    import ringattn
    from ringattn import DocLayout

    from .cases import NPU_GENERATIONS

    layout = DocLayout.from_cu_seqlens([0, 3, 8], 1)
    for name, generation in NPU_GENERATIONS.items():
        with emu.installed(generation) as mod:
            calls = {"fwd": 0, "bwd": 0}
            fwd, bwd = mod.npu_fusion_attention, mod.npu_fusion_attention_grad

            def counting(op, key):
                def wrapped(*a, **kw):
                    calls[key] += 1  # noqa: B023 - this iteration's counter, used before the next one
                    return op(*a, **kw)

                return wrapped

            mod.npu_fusion_attention, mod.npu_fusion_attention_grad = counting(fwd, "fwd"), counting(bwd, "bwd")
            for _ in range(3):
                q, k, v = (torch.randn(8, 2, 64, requires_grad=True) for _ in range(3))
                ringattn.ring_eod_attention(q, k, v, layout, backend="npu").sum().backward()
        probe = 0 if generation in ("current", "tnd-without-update") else 1  # TND works at once there
        assert calls == {"fwd": 3 + probe, "bwd": 3 + probe}, (name, calls)
    assert getattr(sys.modules.get("torch_npu"), "emulated_generation", None) is None  # removed after use


def _merge_inputs(g, t=5, heads=2, d=64, lse_shift=0.0):
    out_acc, out = (torch.randn(t, heads, d, generator=g) for _ in range(2))
    lse_acc, lse = (torch.randn(t, heads, generator=g) * 3 + lse_shift for _ in range(2))
    return out_acc, lse_acc, out, lse


def test_npu_fused_merge_missing_from_cann_falls_back_once():
    """torch_npu 26.1.0 on a CANN whose aclnn library lacks aclnnRingAttentionUpdateV2: the op exists in Python
    but raises RuntimeError when called. The backend warns once, naming the error, merges with torch from then on
    (never calling the op again) and stays exact."""
    import warnings

    from ringattn.kernels import npu as npu_backend
    from ringattn.merge import merge as ringattn_merge

    calls = []

    def missing_kernel(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("aclnnRingAttentionUpdateV2 not found")  # what a missing aclnn symbol gives

    with emu.installed("current") as mod:
        mod.npu_ring_attention_update = missing_kernel
        call = VarlenCall((0, 5), (0, 5), True)
        g = torch.Generator().manual_seed(9)
        for i in range(3):
            args = _merge_inputs(g)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = npu_backend.merge(*args, call)
            messages = [str(w.message) for w in seen]
            if i == 0:
                assert len(messages) == 1 and "npu_ring_attention_update failed on its first call" in messages[0]
                assert "RuntimeError: aclnnRingAttentionUpdateV2 not found" in messages[0], messages
            else:
                assert messages == [], messages  # once
            want = ringattn_merge(*args)
            assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert len(calls) == 1


def test_npu_fused_merge_rejection_after_the_first_call_is_handled_the_same_way():
    """The fused op works, then rejects a later call's input (RuntimeError): the same one-time warning naming the
    error, the torch merge for that call (exact) and from then on, the op never called again."""
    import warnings

    from ringattn.kernels import npu as npu_backend
    from ringattn.merge import merge as ringattn_merge

    calls = []
    with emu.installed("current") as mod:
        real = mod.npu_ring_attention_update

        def rejects_second_call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("EZ1001: prevSoftmaxMax rejected")
            return real(*args, **kwargs)

        mod.npu_ring_attention_update = rejects_second_call
        call = VarlenCall((0, 5), (0, 5), True)
        g = torch.Generator().manual_seed(10)
        for i in range(4):
            args = _merge_inputs(g)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = npu_backend.merge(*args, call)
            messages = [str(w.message) for w in seen]
            want = ringattn_merge(*args)
            if i == 1:
                assert len(messages) == 1 and "failed after earlier calls succeeded" in messages[0], messages
                assert "RuntimeError: EZ1001: prevSoftmaxMax rejected" in messages[0], messages
            else:
                assert messages == [], messages
            if i == 0:  # the fused op's own result: the same merge to fp32 accuracy
                assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-6) for x, y in zip(got, want))
            else:
                assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert len(calls) == 2


def test_npu_fused_merge_takes_negative_lse():
    """The recorded departure from aclnnRingAttentionUpdate's "softmax_max must be positive" (see
    ringattn/kernels/npu.py): negative LSEs go through the fused op (no fallback, no warning), and its result is
    the fp32 merge — to fp32 accuracy, so a fused merge rounded to the inputs' half precision would fail here."""
    import warnings

    from ringattn.kernels import npu as npu_backend
    from ringattn.merge import merge as ringattn_merge

    calls = []
    with emu.installed("current") as mod:
        real = mod.npu_ring_attention_update

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        mod.npu_ring_attention_update = counted
        g = torch.Generator().manual_seed(11)
        call = VarlenCall((0, 6), (0, 6), True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for shift in (-20.0, 0.0, 20.0):
                out_acc, lse_acc, out, lse = _merge_inputs(g, t=6, heads=3, d=128, lse_shift=shift)
                if shift < 0:
                    assert (lse_acc < 0).all() and (lse < 0).all()  # every softmax_max passed is negative
                out = out.bfloat16()  # a device kernel's half-precision partial; the accumulator stays fp32
                got_out, got_lse = npu_backend.merge(out_acc, lse_acc, out, lse, call)
                want_out, want_lse = ringattn_merge(out_acc, lse_acc, out, lse)
                assert got_out.dtype == torch.float32 and got_lse.dtype == torch.float32
                torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
    assert len(calls) == 3


def _staged_worker(rank, cp, cases):
    """Force the host-staging path (what a gloo group over GPU/NPU tensors takes) on CPU tensors."""
    import ringattn.comm.p2p as p2p

    p2p.host_staging = lambda group, device: True
    return run_cases(rank, cp, cases)


def test_host_staging_path_is_exact():
    cases = [c for c in layout_cases(3) if c.comm == "direct" and c.dtype == "float32"][:3]
    per_rank = unwrap(run_ranks(3, _staged_worker, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], case.cu_seqlens[-1]))


def _cuda_worker(rank, cp, cases):
    import tests.cases as tc

    torch.cuda.set_device(0)
    real = tc.global_tensors
    tc.global_tensors = lambda case: tuple(x.cuda() for x in real(case))
    res = run_cases(rank, cp, cases)
    return [tuple(x.cpu() for x in r) for r in res]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cuda_multi_rank_on_one_gpu(cp):
    """2-4 processes share GPU 0 through a gloo group with host staging (NCCL refuses this); windows and sinks too."""
    base = [c for c in layout_cases(cp) if c.comm == "direct"]
    fp16 = [Case(**{**c.__dict__, "dtype": "float16", "name": c.name + " fp16"}) for c in base if c.dtype == "bfloat16"]
    # sliding windows and sinks on the real flash kernels (a window cutting documents, and a window of 1)
    windowed = [
        Case(**{**c.__dict__, "window": w, "sinks": True, "name": f"{c.name} window {w} sinks"})
        for c in base
        if c.dtype == "bfloat16"
        for w in (1, 5)
    ]
    cases = [Case(**{**c.__dict__, "backend": "cuda"}) for c in base + fp16 + windowed]
    per_rank = unwrap(run_ranks(cp, _cuda_worker, cases, timeout_s=300))
    single = unwrap(run_ranks(1, _cuda_worker, cases, timeout_s=300))[0]  # the same backend on one device, CP=1
    for i, case in enumerate(cases):
        baseline = device_baseline(case, cp, assemble([single[i]], case.cu_seqlens[-1]))
        check_case(case, assemble([r[i] for r in per_rank], case.cu_seqlens[-1]), baseline)


# ---------------------------------------------------------------------------------------------- CUDA, on CPU
FLASH_ATTN_SIGNATURES = flash_standin.FLASH_ATTN_SIGNATURES


@pytest.mark.parametrize("tag", sorted(FLASH_ATTN_SIGNATURES))
def test_flash_attn_arguments_bind_to_the_real_signatures(tag):
    from ringattn.kernels import cuda

    fwd_names, bwd_names = FLASH_ATTN_SIGNATURES[tag]
    version = cuda._version(tag)
    q, k, v, cq, ck, dq, dk, dv, out, lse, dout = (object() for _ in range(11))
    f = (
        flash_standin._signature(fwd_names)
        .bind(*cuda.flash_forward_args(version, q, k, v, cq, ck, 7, 9, 0.125, True))
        .arguments
    )
    assert (f["q"], f["k"], f["v"], f["cu_seqlens_q"], f["cu_seqlens_k"]) == (q, k, v, cq, ck)
    assert (f["max_seqlen_q"], f["max_seqlen_k"], f["dropout_p"], f["softmax_scale"], f["causal"]) == (
        7,
        9,
        0.0,
        0.125,
        True,
    )
    assert f["softcap"] == 0.0 and f["alibi_slopes"] is None and f["return_softmax"] is False
    window = (f["window_size_left"], f["window_size_right"]) if version >= (2, 7) else f["window_size"]
    assert tuple(window) == (-1, -1)
    b = (
        flash_standin._signature(bwd_names)
        .bind(*cuda.flash_backward_args(version, dout, q, k, v, out, lse, dq, dk, dv, cq, ck, 7, 9, 0.125, False))
        .arguments
    )
    assert (b["dout"], b["q"], b["k"], b["v"], b["out"], b["softmax_lse"]) == (dout, q, k, v, out, lse)
    assert (b["dq"], b["dk"], b["dv"], b["cu_seqlens_q"], b["cu_seqlens_k"]) == (dq, dk, dv, cq, ck)
    assert (b["max_seqlen_q"], b["max_seqlen_k"], b["dropout_p"], b["softmax_scale"], b["causal"]) == (
        7,
        9,
        0.0,
        0.125,
        False,
    )
    assert b["softcap"] == 0.0 and b["alibi_slopes"] is None and b["deterministic"] is False and b["rng_state"] is None
    window = (b["window_size_left"], b["window_size_right"]) if version >= (2, 7) else b["window_size"]
    assert tuple(window) == (-1, -1)


def _check_cuda_backend_on_cpu(dtype, head_dim, seed):
    """``cuda.forward`` / ``cuda.backward`` on CPU tensors, through whatever provider is installed, against the
    float64 masked reference (tests/reference.py, autograd): causal and dense calls, GQA, strided K/V views; every
    element within the error analysis's bound for one kernel call (tests/rounding.py: one rounding of out; the
    gradients' one rounding plus the rounded out in the rowsum term)."""
    from ringattn.kernels import cuda

    from .reference import masked_with_grads, varlen_mask
    from .rounding import device_bounds, varlen_call

    g = torch.Generator().manual_seed(seed)
    for causal, cu_q, cu_k in ((True, (0, 3, 8, 9), (0, 3, 8, 9)), (False, (0, 2, 5), (0, 4, 10))):
        call = VarlenCall(cu_q, cu_k, causal)
        q = torch.randn(cu_q[-1], 4, head_dim, generator=g).to(dtype)
        kv = torch.randn(cu_k[-1], 2, 2, head_dim, generator=g).to(dtype)
        k, v = kv[:, 0], kv[:, 1]  # strided views, as the executor passes them
        dout = torch.randn(q.shape, generator=g).to(dtype)
        mask = varlen_mask(cu_q, cu_k, causal)
        ref_out, ref_lse, *ref_grads = masked_with_grads(q, k, v, dout, mask, 0.3)
        bounds = device_bounds(q, k, v, dout, mask, [varlen_call(cu_q, cu_k, causal)], 0.3, dtype)
        out, lse = cuda.forward(q, k, v, call, 0.3)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:2] and lse.dtype == torch.float32
        assert (lse.double() - ref_lse).abs().max() < 1e-5
        # backward gets the LSE as the executor hands it: a token-major [Tq, H] tensor of its own (the merged one)
        got = (out,) + tuple(cuda.backward(dout, q, k, v, out, lse.contiguous(), call, 0.3))
        for name, x, r, like, b in zip(("out", "dq", "dk", "dv"), got, [ref_out] + ref_grads, (q, q, k, v), bounds):
            assert x.shape == like.shape and x.dtype == dtype, name
            worst = ((x.double() - r).abs() / b).max().item()
            assert worst <= 1.0, f"{name}: {worst:.2f}x the error analysis's bound"


@pytest.mark.parametrize("version", ["2.6.3", "2.7.4.post1", "2.8.3"])
@pytest.mark.parametrize("head_dim", [64, 20])
def test_cuda_backend_through_flash_attn_matches_float64(version, head_dim):
    """The CUDA backend's flash_attn path, on CPU, through a stand-in that binds the version's real signature,
    enforces its flash_api.cpp checks (head size a multiple of 8 in every backward and in forwards from 2.7,
    int32 contiguous cu_seqlens, fp16/bf16, ...) and computes in float64: equal to the float64 reference. Head
    dim 20 needs the backend's zero padding to 24 (without it the stand-in refuses the call, as flash_attn
    does)."""
    from ringattn.kernels import cuda

    with flash_standin.installed(version):
        assert cuda.flash_attn_api()[0] == cuda._version(version)
        for dtype in (torch.bfloat16, torch.float16):
            _check_cuda_backend_on_cpu(dtype, head_dim, seed=3)


@pytest.mark.parametrize("head_dim", [64, 20])
def test_cuda_backend_through_aten_flash_ops_matches_float64(head_dim):
    """No flash_attn installed: the backend calls ``aten::_flash_attention_forward/_backward`` with
    ``cum_seq_q/k``; here stand-ins bound to the installed torch's own schemas of those ops, enforcing the checks
    of torch's vendored flash_api.cpp (which does not pad: "this is ensured by padding!")."""
    from ringattn.kernels import cuda

    with flash_standin.installed(None):
        assert cuda.flash_attn_api() is None
        for dtype in (torch.bfloat16, torch.float16):
            _check_cuda_backend_on_cpu(dtype, head_dim, seed=4)


def test_flash_standins_enforce_the_upstream_checks():
    """Not vacuous: each stand-in refuses what its provider's flash_api.cpp refuses, per version."""
    from ringattn.kernels import cuda

    def args(d, dtype=torch.bfloat16, cu_dtype=torch.int32, heads=(4, 2), lengths=(3, 5)):
        cu = torch.tensor((0,) + tuple(torch.tensor(lengths).cumsum(0).tolist()), dtype=cu_dtype)
        t = int(cu[-1])
        q = torch.randn(t, heads[0], d).to(dtype)
        k = torch.randn(t, heads[1], d).to(dtype)
        return q, k, k.clone(), cu, cu, max(lengths), max(lengths)

    def fwd(version, q, k, v, cq, ck, mq, mk):
        _, iface = flash_standin.flash_attn_module(version)
        return iface._flash_attn_varlen_forward(
            *cuda.flash_forward_args(cuda._version(version), q, k, v, cq, ck, mq, mk, 0.3, True)
        )

    for version in ("2.7.4.post1", "2.8.3"):
        with pytest.raises(RuntimeError, match="multiple of 8"):
            fwd(version, *args(20))
    res = fwd("2.6.3", *args(20))  # 2.6 forwards pad internally: out at 20, q_padded at 24
    assert res[0].shape[-1] == 20 and res[1].shape[-1] == 24
    for version in ("2.6.3", "2.8.3"):
        with pytest.raises(RuntimeError, match="fp16 and bf16"):
            fwd(version, *args(64, dtype=torch.float32))
        with pytest.raises(RuntimeError, match="int32"):
            fwd(version, *args(64, cu_dtype=torch.int64))
        with pytest.raises(RuntimeError, match="at most 256"):
            fwd(version, *args(264))
        with pytest.raises(RuntimeError, match="must divide"):
            fwd(version, *args(64, heads=(3, 2)))
        q, k, v, cq, ck, _, _ = args(64)
        with pytest.raises(RuntimeError, match="max_seqlen"):
            fwd(version, q, k, v, cq, ck, 4, 5)
    # backward: head size a multiple of 8 in every version; dq written in place must have a contiguous last dim;
    # the LSE is read as a contiguous h x total_q
    for version in ("2.6.3", "2.8.3"):
        key = cuda._version(version)
        _, iface = flash_standin.flash_attn_module(version)
        for d, lse_t, dq_strided, match in (
            (20, False, False, "multiple of 8"),
            (64, True, False, "h x total_q"),
            (64, False, True, "contiguous last dimension"),
        ):
            q, k, v, cq, ck, mq, mk = args(d)
            lse = torch.zeros(q.shape[1], q.shape[0])
            lse = lse.t().contiguous().t() if lse_t else lse  # right shape, wrong memory order
            dq = torch.empty(q.shape[:2] + (2 * d,), dtype=q.dtype)[..., ::2] if dq_strided else torch.empty_like(q)
            with pytest.raises(RuntimeError, match=match):
                iface._flash_attn_varlen_backward(
                    *cuda.flash_backward_args(
                        key, q, q, k, v, q, lse, dq, torch.empty_like(k), torch.empty_like(v), cq, ck, mq, mk, 0.3, True
                    )
                )
    # aten: no internal padding in forward either
    fwd_op, bwd_op = flash_standin.aten_flash_ops()
    q, k, v, cq, ck, mq, mk = args(20)
    with pytest.raises(RuntimeError, match="ensured by padding"):
        fwd_op(q, k, v, cq, ck, mq, mk, 0.0, True, False, scale=0.3)
    with pytest.raises(TypeError):  # scale is keyword-only in the schema
        fwd_op(*args(64), 0.0, True, False, 0.3)


def _cuda_standin_worker(rank, cp, cases):
    return run_cases(rank, cp, cases)


@pytest.mark.parametrize("cp", [3])
def test_cuda_backend_multi_rank_on_cpu_through_the_standins(cp, rank_pools):
    """The whole CUDA path (padding, int32 cu_seqlens, LSE layouts, bf16/fp16 partials merged in fp32) on CP ranks
    over gloo, each provider's stand-in installed in every rank, against the float64 reference with the
    device-path bound (check_case)."""
    chunk = 4
    s = 2 * cp * chunk
    docs = (0, 3, 9, 10, 17, s)  # documents crossing chunk edges
    cases = [
        Case(
            f"cuda stand-in {backend} d{d} {dtype}",
            docs,
            s,
            hq=4,
            hkv=2,
            d=d,
            dtype=dtype,
            seed=51 + i,
            comm="direct",
            backend=backend,
        )
        for i, (backend, d, dtype) in enumerate(
            (
                ("cuda-fa2.8", 20, "bfloat16"),
                ("cuda-fa2.6", 20, "float16"),
                ("cuda-aten", 20, "bfloat16"),
                ("cuda-fa2.7", 64, "bfloat16"),
            )
        )
    ]
    per_rank = unwrap(rank_pools(cp).run(_cuda_standin_worker, cases))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], s), device_baseline(case, cp))


def test_cuda_backend_refuses_flash_attn_before_2_6(monkeypatch):
    from ringattn.kernels import cuda

    pkg, iface = flash_standin.flash_attn_module("2.6.0")
    pkg.__version__ = "2.5.9"
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    cuda.flash_attn_api.cache_clear()
    try:
        with pytest.warns(UserWarning, match="padded varlen LSE"):
            assert cuda.flash_attn_api() is None
    finally:
        cuda.flash_attn_api.cache_clear()


@pytest.mark.parametrize("why", ["fp32", "head_dim > 256", "pre-Ampere GPU"])
def test_cuda_backend_routes_what_flash_cannot_take_to_math(why, monkeypatch):
    """fp32, head dims above 256 and GPUs below compute capability 8.0 (flash_api.cpp: "FlashAttention only
    supports Ampere GPUs or newer") run on the math kernel with a warning, never into a flash kernel."""
    from ringattn.kernels import cuda
    from ringattn.kernels import math as mk

    def no_flash(*args, **kwargs):
        raise AssertionError("a flash kernel was called")

    monkeypatch.setattr(cuda, "flash_attn_api", lambda: (cuda._version("2.8.3"), no_flash, no_flash))
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", no_flash, raising=False)
    monkeypatch.setattr(cuda, "_pre_ampere", lambda device: why == "pre-Ampere GPU")
    dtype, d = {"fp32": (torch.float32, 16), "head_dim > 256": (torch.bfloat16, 264)}.get(why, (torch.bfloat16, 16))
    call = VarlenCall((0, 3, 8), (0, 3, 8), True)
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(8, 2, d, generator=g).to(dtype) for _ in range(4))
    with pytest.warns(UserWarning, match="run on the math backend"):
        out, lse = cuda.forward(q, k, v, call, 0.25)
    ref_out, ref_lse = mk.forward(q, k, v, call, 0.25)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.warns(UserWarning, match="run on the math backend"):
        got = cuda.backward(dout, q, k, v, out, lse, call, 0.25)
    for x, r in zip(got, mk.backward(dout, q, k, v, out, lse, call, 0.25)):
        assert torch.equal(x, r)


def test_cuda_head_dim_padding_is_exact():
    """Zero-padding the head dim to a multiple of 8 (what the CUDA backend does for flash) changes nothing."""
    from ringattn.kernels import cuda
    from ringattn.kernels import math as mk

    g = torch.Generator().manual_seed(5)
    call = VarlenCall((0, 4, 9), (0, 4, 9), True)
    q, k, v, dout = (torch.randn(9, 2, 12, generator=g) for _ in range(4))
    out, lse = mk.forward(q, k, v, call, 0.2)
    pq, pk, pv, pdout, pout = cuda._pad8(q, k, v, dout, out)
    assert pq.shape[-1] == 16
    p_out, p_lse = mk.forward(pq, pk, pv, call, 0.2)
    torch.testing.assert_close(p_out[..., :12], out)
    torch.testing.assert_close(p_lse, lse)
    for a, b in zip(
        mk.backward(pdout, pq, pk, pv, pout, lse, call, 0.2), mk.backward(dout, q, k, v, out, lse, call, 0.2)
    ):
        torch.testing.assert_close(a[..., :12], b)

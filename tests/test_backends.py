"""Backend selection, the NPU emulation's strictness, host staging, and GPU runs where present."""
from __future__ import annotations

import sys

import pytest
import torch

from ringattn.kernels import get_backend

from . import npu_emulation as emu
from .cases import Case, assemble, run_cases
from .dist import run_ranks, unwrap
from .test_attention import check_case, layout_cases


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
        npu.forward(q, q, q, (0, 4), (0, 4), 4, 4, True, 0.1)


def test_emulation_rejects_contract_misuse():
    q = torch.randn(6, 2, 64)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    with pytest.raises(RuntimeError, match="without a leading 0"):
        emu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[0, 6], actual_seq_kvlen=[0, 6])
    with pytest.raises(RuntimeError, match="triu"):
        emu.npu_fusion_attention(q, q, q, 2, "TND", atten_mask=~mask, sparse_mode=3, actual_seq_qlen=[6],
                                 actual_seq_kvlen=[6])
    out, smax, ssum = emu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6])[:3]
    with pytest.raises(TypeError):  # the grad op's keyword is scale_value, not scale
        emu.npu_fusion_attention_grad(q, q, q, q, 2, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
                                      scale=0.1, actual_seq_qlen=[6], actual_seq_kvlen=[6])
    with pytest.raises(RuntimeError, match="multiple of 64"):
        small = torch.randn(6, 2, 32)
        emu.npu_ring_attention_update(small, smax, ssum, small, smax, ssum, torch.tensor([0, 6]), "TND")


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
    """2-4 processes share GPU 0 through a gloo group with host staging (NCCL refuses this)."""
    cases = [Case(**{**c.__dict__, "backend": "cuda"}) for c in layout_cases(cp) if c.comm == "direct"]
    per_rank = unwrap(run_ranks(cp, _cuda_worker, cases, timeout_s=300))
    for i, case in enumerate(cases):
        check_case(case, assemble([r[i] for r in per_rank], case.cu_seqlens[-1]))

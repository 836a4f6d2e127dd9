"""Block attention kernels: one contract, one backend per device type.

Contract (THD layout, GQA native: k/v may have fewer heads than q, ``Hq % Hkv == 0``)::

    forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)

* q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, packed segments: segment ``i`` is rows
  ``cu_q[i]:cu_q[i+1]`` of q against rows ``cu_k[i]:cu_k[i+1]`` of k/v.
* ``cu_q``/``cu_k``: host tuples of ints starting at 0 (backends convert as they need);
  ``max_q``/``max_k``: the longest segment lengths.
* ``causal``: every segment has equal q and k lengths and is causal (top-left = bottom-right);
  otherwise every segment is dense. ``scale``: softmax scale (float).
* out: ``[Tq, Hq, D]`` in q's dtype or fp32; lse: fp32 ``[Tq, Hq]`` natural-log sum-exp of
  the scaled scores. Every query row has at least one key.
* backward gets the *merged* ``out`` (q's dtype) and ``lse`` (fp32) and returns gradients of
  this block's contribution (dq ``[Tq, Hq, D]``, dk/dv ``[Tk, Hkv, D]``, dtype q's or fp32).
  A backend that sets ``BACKWARD_TAKES_FP32_OUT = True`` is given the merged out in fp32.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BACKENDS", "get_backend"]

BACKENDS = {
    "cpu": "ringattn.kernels.cpu",
    "cuda": "ringattn.kernels.cuda",
    "npu": "ringattn.kernels.npu",
    "math": "ringattn.kernels.math",
}


def get_backend(device_type: str, override: str | None = None) -> ModuleType:
    """The kernel module for ``device_type`` (or the ``override`` backend name)."""
    name = override or device_type
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])

"""Block attention kernels: one contract, one backend per device type.

Contract (THD layout, GQA native: k/v may have fewer heads than q, ``Hq % Hkv == 0``)::

    forward(q, k, v, call, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, call, scale) -> (dq, dk, dv)
    merge(out_acc, lse_acc, out, lse, call) -> (out, lse)          # optional
    validate(q, k, v) -> None                                     # optional

* ``call`` is a :class:`VarlenCall`: the packed segments of one kernel call. Segment ``i`` is rows
  ``cu_q[i]:cu_q[i+1]`` of q against rows ``cu_k[i]:cu_k[i+1]`` of k/v; ``causal`` says whether every
  segment is causal (then q and k lengths are equal, so top-left = bottom-right alignment) or every
  segment is dense. ``window`` (None: none) is a sliding window as the one ``(left, right)`` pair of
  flash_attn's convention that every segment of the call shares: aligned to each segment's bottom-right
  corner, query row ``r`` of a segment with ``sq`` queries and ``sk`` keys sees the key columns
  ``[r + sk - sq - left, r + sk - sq + right]`` (``left, right >= 0``; causal segments get ``(W - 1, 0)``;
  every query row still sees at least one key). The executor builds each call once per plan and reuses it on
  every training step,
  so a backend derives what it needs from it *once* with :meth:`VarlenCall.cached` (device
  ``cu_seqlens``, statistics-layout indices, chunkings) instead of on every call: no host work per
  segment and no host-to-device copy on the hot path.
* q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``; k/v may be strided views (K and V of one stacked buffer).
* out: ``[Tq, Hq, D]`` in q's dtype or fp32; lse: fp32 ``[Tq, Hq]`` natural-log sum-exp of the scaled
  scores (token-major, whatever the device operator's own statistics layout). Every query row has at
  least one key.
* backward gets the *merged* ``out`` (q's dtype) and ``lse`` (fp32) and returns gradients of this
  block's contribution (dq ``[Tq, Hq, D]``, dk/dv ``[Tk, Hkv, D]``, dtype q's or fp32). A backend that
  sets ``BACKWARD_TAKES_FP32_OUT = True`` is given the merged out in fp32.
* merge (optional, e.g. a fused device op): the log-sum-exp merge of :func:`ringattn.merge.merge` for
  the rows of ``call``; without it the executor uses the torch merge.
* validate (optional): raise ``ValueError`` for local input the device operator cannot take (dtype,
  heads, head dim, tokens). It runs with ringattn's own validation, before any communication, and
  the verdict is agreed by every rank.

Registering a backend: add ``name -> module path`` to :data:`BACKENDS` and pass ``backend=name``.

Example: one call over two causal segments (documents of 3 and 5 tokens), GQA with 4 query and
2 KV heads; the CPU backend and the portable ``math`` backend agree, and the LSE is fp32
``[Tq, Hq]`` (token-major):

>>> import torch
>>> call = VarlenCall(cu_q=(0, 3, 8), cu_k=(0, 3, 8), causal=True)
>>> call
VarlenCall(cu_q=(0, 3, 8), cu_k=(0, 3, 8), causal=True, window=None, max_q=5, max_k=5)
>>> g = torch.Generator().manual_seed(0)
>>> q = torch.randn(8, 4, 16, generator=g)
>>> k, v = (torch.randn(8, 2, 16, generator=g) for _ in range(2))
>>> out, lse = get_backend("cpu").forward(q, k, v, call, 0.25)
>>> out_m, lse_m = get_backend("cpu", "math").forward(q, k, v, call, 0.25)
>>> tuple(out.shape), lse.dtype, tuple(lse.shape)
((8, 4, 16), torch.float32, (8, 4))
>>> torch.allclose(out, out_m, atol=1e-6) and torch.allclose(lse, lse_m, atol=1e-6)
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["BACKENDS", "VarlenCall", "get_backend"]

BACKENDS = {
    "cpu": "ringattn.kernels.cpu",
    "cuda": "ringattn.kernels.cuda",
    "npu": "ringattn.kernels.npu",
    "math": "ringattn.kernels.math",
}


@dataclass(frozen=True, eq=False)
class VarlenCall:
    """One kernel call over packed segments (see the module docstring).

    cu_q / cu_k: host tuples of ints starting at 0, one entry more than segments; max_q / max_k: the
    longest segment lengths; window: the ``(left, right)`` pair of a sliding window (None: none).
    Identity-hashed: a call is built once per plan and reused.
    """

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    causal: bool
    window: tuple[int, int] | None = None
    max_q: int = field(init=False)
    max_k: int = field(init=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_q", max(b - a for a, b in zip(self.cu_q, self.cu_q[1:])))
        object.__setattr__(self, "max_k", max(b - a for a, b in zip(self.cu_k, self.cu_k[1:])))

    @property
    def num_segments(self) -> int:
        return len(self.cu_q) - 1

    @property
    def total_q(self) -> int:
        return self.cu_q[-1]

    @property
    def total_k(self) -> int:
        return self.cu_k[-1]

    def cached(self, key, build: Callable[[], Any]):
        """``build()`` once per ``key`` (include the device in it), then the stored value."""
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = build()
            return value


def get_backend(device_type: str, override: str | None = None) -> ModuleType:
    """The kernel module for ``device_type`` (or the ``override`` backend name)."""
    name = override or device_type
    if name not in BACKENDS:
        raise ValueError(
            f"backend: expected one of {sorted(BACKENDS)}, got {name!r}; pass one of them (or None: "
            "from the tensors' device), or register yours in ringattn.kernels.BACKENDS"
        )
    return importlib.import_module(BACKENDS[name])

"""The autograd function, the functional API and the ``RingEoDAttention`` module."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ._validate import one_of
from .agreement import agree_once, agreement_device
from .comm import run_backward, run_forward
from .comm.a2a import gather_tokens, pack_qkv, pack_rows, scatter_tokens, unpack_rows
from .groups import CPGroups, resolve_group
from .kernels import get_backend
from .layout import DocLayout
from .plan import COMM_SHAPES, DEFAULT_COMM, rank_plan, ulysses_heads
from .plan.window import effective_window

__all__ = ["ring_eod_attention", "RingEoDAttention", "DEFAULT_COMM", "check_inputs", "AGREEMENT_REMEDIES"]

#: what to do when the CP ranks disagree on one of the facts attention agrees on (see ringattn.agreement)
AGREEMENT_REMEDIES = {
    "layout": "every CP rank must build the layout from the same batch with the same arguments (give every CP rank "
    "the same batch: shard the data loader over data-parallel ranks only)",
    "q heads/dim": "every CP rank must run the same layer (same num_heads and head_dim)",
    "k/v heads/dim": "every CP rank must run the same layer (same num_key_value_heads and head_dim)",
    "dtype": "q, k, v must have the same dtype on every CP rank (same precision / autocast settings)",
    "softmax_scale": "pass the same softmax_scale on every CP rank",
    "comm": "pass the same comm= on every CP rank",
    "ulysses x ring": "build the groups with the same ulysses_size on every rank (ringattn.new_cp_groups)",
    "window": "pass the same window= on every CP rank (the layer's sliding window, None on full-attention layers)",
    "sinks": "pass sinks= on every CP rank or on none (the layer's learned sink logits)",
}


def _add_sinks(out32: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged result with one more "key" per head whose score is ``sinks[h]`` and whose value is 0:
    ``lse' = logaddexp(lse, s)``, ``out' = out * exp(lse - lse')`` (fp32)."""
    new = torch.logaddexp(lse, sinks.float().unsqueeze(0))
    return out32 * torch.exp(lse - new).unsqueeze(-1), new


def _sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``dL/ds_h = -sum_i exp(s_h - lse'_i) * rowsum(dout_i * out'_i)`` over this rank's query rows (fp32)."""
    rowsum = (dout.float() * out.float()).sum(-1)
    return -(torch.exp(sinks.float().unsqueeze(0) - lse) * rowsum).sum(0)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocLayout, rank: int) -> None:
    """Raise ``ValueError`` naming the problem if q/k/v do not fit ``layout`` on ``rank``."""
    if not isinstance(layout, DocLayout):
        raise ValueError(f"layout: expected a DocLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name}: expected shape [tokens, heads, head_dim], got {tuple(x.shape)}; pass this "
                "rank's tokens flattened (THD), e.g. x.reshape(-1, heads, head_dim)"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"{name}: expected a floating dtype, got {x.dtype}; pass the projected q/k/v (fp32, fp16 or bf16)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"dtype: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one "
            "dtype (under autocast, run attention in its dtype)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"device: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them "
            "to this rank's device"
        )
    n = layout.local_tokens(rank)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[0] != n:
            raise ValueError(
                f"{name}: expected {n} tokens on rank {rank} (the layout's local count), got {x.shape[0]}; shard "
                "every per-token tensor with layout.local_indices(rank) of the same layout on every rank"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"k/v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}; pass k and v of "
            "the same layer (same KV heads and head dim)"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim: q has {q.shape[2]}, k/v have {k.shape[2]}; q, k and v need one head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"heads: q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}); GQA shares "
            "each KV head among Hq / Hkv query heads"
        )


class _RingEoDFunction(torch.autograd.Function):
    """Ring attention of one CP rank. Learned sinks are applied once, after the merge (:func:`_add_sinks`);
    the block backwards then run unchanged on the sinked ``(out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, group, scale, kernel):
        kv = torch.stack([k, v], dim=1)
        out32, lse = run_forward(plan, q, kv, group, kernel, scale)
        if sinks is not None:
            out32, lse = _add_sinks(out32, lse, sinks)
        out = out32.to(q.dtype)
        # kernels that compute in fp32 (cpu, math) get the unrounded merged output for backward:
        # the rowsum(dout * out) term then carries no bf16 rounding noise into dq/dk/dv
        saved_out = out32 if getattr(kernel, "BACKWARD_TAKES_FP32_OUT", False) else out
        ctx.save_for_backward(q, kv, saved_out, lse, sinks)
        ctx.plan, ctx.group, ctx.scale, ctx.kernel = plan, group, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse, sinks = ctx.saved_tensors
        dq, dkv = run_backward(ctx.plan, dout, q, kv, out, lse, ctx.group, ctx.kernel, ctx.scale)
        dsinks = None if sinks is None else _sinks_grad(dout, out, lse, sinks).to(sinks.dtype)
        return dq.to(q.dtype), dkv[:, 0].to(kv.dtype), dkv[:, 1].to(kv.dtype), dsinks, None, None, None, None


def _check_groups(layout: DocLayout, groups: CPGroups | None) -> None:
    """The Ulysses x ring split of the groups must be the layout's."""
    u = groups.ulysses_size if groups is not None else 1
    if layout.ulysses_size > 1 and groups is None:
        raise ValueError(
            f"group: layout.ulysses_size={layout.ulysses_size} needs the Ulysses and ring groups; pass "
            f"group=ringattn.new_cp_groups({layout.ulysses_size}, cp_group)"
        )
    if u != layout.ulysses_size:
        raise ValueError(
            f"group: the groups split CP as ulysses_size={u} x ring_size={groups.ring_size}, but the layout "
            f"has ulysses_size={layout.ulysses_size} (build both with the same ulysses_size)"
        )


class _UlyssesRingFunction(torch.autograd.Function):
    """Hybrid attention of one CP rank: all-to-all in, the ring plan on ``Hq/U`` heads, all-to-all out.

    Backward mirrors it: all-to-all of dout, the ring backward, one all-to-all of dq, dk, dv.
    Replicated KV heads return their dK/dV in fp32 (beside dq in q's dtype, in the same
    collective) and are summed in fp32, so replication adds no rounding: the result is rounded
    once, as in the pure ring.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, ulysses, ring, replication, scale, kernel):
        n, hq, d = q.shape
        u = ulysses.size()
        y = gather_tokens(pack_qkv(q, k, v, u, replication), ulysses, "forward all-to-all of q/k/v")
        hq_u = hq // u
        hk = (y.shape[1] - hq_u) // 2
        qg = y[:, :hq_u].contiguous()
        kv = y[:, hq_u:].reshape(y.shape[0], 2, hk, d).contiguous()
        out32, lse = run_forward(plan, qg, kv, ring, kernel, scale)
        # this rank holds head group ulysses_rank (pack_qkv): its share of the sinks
        my_sinks = None if sinks is None else sinks.reshape(u, hq_u)[ulysses.rank()]
        if my_sinks is not None:
            out32, lse = _add_sinks(out32, lse, my_sinks)
        out = out32.to(q.dtype)
        saved_out = out32 if getattr(kernel, "BACKWARD_TAKES_FP32_OUT", False) else out
        ctx.save_for_backward(qg, kv, saved_out, lse, my_sinks)
        ctx.sinks_shape = None if sinks is None else (sinks.shape, sinks.dtype)
        ctx.plan, ctx.ulysses, ctx.ring, ctx.scale, ctx.kernel = plan, ulysses, ring, scale, kernel
        ctx.replication, ctx.kv_heads, ctx.kv_dtype = replication, k.shape[1], k.dtype
        return scatter_tokens(out, u, ulysses, "forward all-to-all of the output").reshape(n, hq, d)

    @staticmethod
    def backward(ctx, dout):
        qg, kv, out, lse, my_sinks = ctx.saved_tensors
        u, (n, hq, d) = ctx.ulysses.size(), dout.shape
        hq_u, hk, rep = hq // u, kv.shape[2], ctx.replication
        dout_g = gather_tokens(dout.reshape(n, u, hq_u, d), ctx.ulysses, "backward all-to-all of d(output)")
        dq, dkv = run_backward(ctx.plan, dout_g, qg, kv, out, lse, ctx.ring, ctx.kernel, ctx.scale)
        dsinks = None
        if my_sinks is not None:  # this rank's heads, over its ring rank's tokens; zero for the other head groups
            shape, dtype = ctx.sinks_shape
            dsinks = torch.zeros(u, hq_u, dtype=torch.float32, device=my_sinks.device)
            dsinks[ctx.ulysses.rank()] = _sinks_grad(dout_g, out, lse, my_sinks)
            dsinks = dsinks.reshape(shape).to(dtype)
        kv_dtype = torch.float32 if rep > 1 else ctx.kv_dtype  # replicas are summed after the all-to-all
        grads = pack_rows([dq.to(qg.dtype).reshape(u, n, hq_u, d), dkv.to(kv_dtype).reshape(u, n, 2, hk, d)])
        back = scatter_tokens(grads.reshape(u * n, *grads.shape[2:]), u, ctx.ulysses, "backward all-to-all of dq/dk/dv")
        dq, dkv = unpack_rows(back, [((hq_u, d), qg.dtype), ((2, hk, d), kv_dtype)])
        dkv = dkv.transpose(1, 2).reshape(n, 2, u * hk, d)  # [n, k/v, head, d]
        if rep > 1:
            dkv = dkv.reshape(n, 2, ctx.kv_heads, rep, d).sum(3).to(ctx.kv_dtype)
        return dq.reshape(n, hq, d), dkv[:, 0], dkv[:, 1], dsinks, None, None, None, None, None, None


def _check_sinks(sinks, q: torch.Tensor) -> None:
    if not isinstance(sinks, torch.Tensor):
        raise ValueError(f"sinks: expected a tensor of one logit per query head, got {type(sinks).__name__}")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks: expected shape [{q.shape[1]}] (one logit per query head), got {tuple(sinks.shape)}")
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"sinks: expected a floating dtype, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks: expected to be on q's device {q.device}, got {sinks.device}")


def _local_verdict(q, k, v, layout, rank: int, size: int, scale, comm, backend, groups=None, window=None, sinks=None):
    """``(error message or None, kernel module or None)`` for this rank's input."""
    try:
        kernel = get_backend(q.device.type if isinstance(q, torch.Tensor) else "cpu", backend)
        if layout.cp_size != size:
            raise ValueError(
                f"group: expected {layout.cp_size} ranks (layout.cp_size), got a group of size {size}; "
                "pass the CP group the layout was built for (or build it with cp_size=the group's size)"
            )
        _check_groups(layout, groups)
        one_of("comm", comm, COMM_SHAPES)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"softmax_scale: expected a positive finite float, got {scale!r}; pass None for head_dim ** -0.5"
            )
        check_inputs(q, k, v, layout, rank)
        if effective_window(layout, window) is not None and not getattr(kernel, "SUPPORTS_WINDOW", False):
            raise ValueError(
                f"window: the {kernel.__name__.rsplit('.', 1)[-1]} backend has no sliding-window "
                "support; use backend='math' (portable) or another backend"
            )
        if sinks is not None:
            _check_sinks(sinks, q)
        kq, kk = q, k
        if layout.ulysses_size > 1:  # the kernels run on the ring rank's tokens and this rank's share of the heads
            hq_u, hkv_u, _ = ulysses_heads(q.shape[1], k.shape[1], layout.ulysses_size)
            n = q.shape[0] * layout.ulysses_size
            kq = torch.empty((n, hq_u, q.shape[2]), dtype=q.dtype, device="meta")
            kk = torch.empty((n, hkv_u, k.shape[2]), dtype=k.dtype, device="meta")
        backend_check = getattr(kernel, "validate", None)
        if backend_check is not None:
            backend_check(kq, kk, kk)
    except ValueError as exc:
        return str(exc), None
    return None, kernel


def _heads_and_dim(x):
    """``(heads, head_dim)`` of a THD tensor, None for anything else (reported by validation)."""
    return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None


def ring_eod_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: DocLayout,
    group: dist.ProcessGroup | CPGroups | None = None,
    softmax_scale: float | None = None,
    *,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    comm: str | None = None,
    backend: str | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Document-causal attention of this rank's queries over the whole packed batch.

    q ``[T_local, Hq, D]``, k/v ``[T_local, Hkv, D]`` hold this rank's tokens in the layout's
    local order (``layout.local_indices(rank)``); returns ``[T_local, Hq, D]`` in q's dtype,
    differentiable in q, k, v. ``group``: the CP process group (default: the world group;
    none needed for ``layout.cp_size == 1``), or the :class:`~ringattn.CPGroups` of
    :func:`ringattn.new_cp_groups` for a layout with ``ulysses_size > 1`` (hybrid: an
    all-to-all over heads inside each Ulysses group, the ring plan over the ring group on
    ``Hq / U`` heads, an all-to-all back; pure Ulysses when ``ring_size == 1``). Hybrid needs
    ``Hq % U == 0`` and ``Hkv % U == 0`` or ``U % Hkv == 0`` (KV heads then replicated).
    ``softmax_scale`` defaults to ``D ** -0.5``.
    ``window``: a sliding window, the number of keys a query may attend to, itself included: the query at
    document position ``i`` sees the keys at positions ``j`` with ``i - window < j <= i`` (transformers'
    ``sliding_window``; flash_attn's ``window_size=(window - 1, 0)``). None: no window; one at least as long
    as the longest document masks nothing and runs the plan without a window. Block pairs the window
    masks are neither computed nor sent (:mod:`ringattn.plan.window`).
    ``sinks``: learned sink logits ``[Hq]``, one per query head in the units of the scaled scores
    (gpt-oss): every softmax denominator gains ``exp(sinks[h])``, the output nothing. Differentiable:
    ``sinks.grad`` is this rank's partial, over its query rows (and, with Ulysses, its head group);
    like every weight under CP, the sum over the CP group's ranks equals the single-device gradient.
    ``comm``: plan shape (``"direct"``, the default, ``"ring"`` or the baseline ``"plain"``).
    ``backend``: kernel backend name (default: from ``q.device.type``).

    Before any communication the ranks agree (:mod:`ringattn.agreement`) on the first call
    with a layout and signature, and on every call with ``validate=True``: malformed input
    on any rank, or ranks that disagree, make every rank raise the same ``ValueError``.
    Ranks must build their layouts alike (one per batch on every rank, as ``get_batch`` does).

    CP size 1 needs no process group and runs the same code path (plain varlen attention over
    the documents). Two documents, ``[0, 3)`` and ``[3, 8)``, GQA with 4 query and 2 KV heads;
    the result equals an explicit float64 computation, per document, of causal softmax attention:

    >>> import torch
    >>> from ringattn import DocLayout, ring_eod_attention
    >>> layout = DocLayout.from_cu_seqlens([0, 3, 8], cp_size=1)
    >>> g = torch.Generator().manual_seed(0)
    >>> q = torch.randn(8, 4, 16, generator=g, requires_grad=True)
    >>> k, v = (torch.randn(8, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    >>> out = ring_eod_attention(q, k, v, layout)
    >>> out.shape, out.dtype
    (torch.Size([8, 4, 16]), torch.float32)
    >>> def reference(q, k, v, cu):
    ...     q, k, v = q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    ...     out = torch.empty_like(q)
    ...     for s, e in zip(cu, cu[1:]):               # every document alone, causal
    ...         scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / 16 ** 0.5
    ...         scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
    ...         out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e])
    ...     return out
    >>> ref = reference(q, k, v, [0, 3, 8])
    >>> torch.allclose(out.double(), ref, atol=1e-6)
    True

    Gradients flow to q, k and v and equal the reference's too:

    >>> w = torch.randn(8, 4, 16, generator=g, dtype=torch.float64)
    >>> (out.double() * w).sum().backward()
    >>> grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    >>> all(torch.allclose(x.grad, gx, atol=1e-5) for x, gx in zip((q, k, v), grads))
    True
    """
    if not isinstance(layout, DocLayout):
        raise ValueError(f"layout: expected a DocLayout, got {type(layout).__name__}")
    comm = comm or DEFAULT_COMM
    group, groups, rank, size = resolve_group(group, layout.cp_size)
    head_dim = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() >= 1 and q.shape[-1] else 1
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    verdict, kernel = _local_verdict(q, k, v, layout, rank, size, scale, comm, backend, groups, window, sinks)
    agreed_before = False
    if group is not None:  # agreement over the whole CP group, before any all-to-all or P2P
        split = (groups.ulysses_size, groups.ring_size) if groups is not None else (1, size)
        facts = {
            "layout": f"{layout!r} {layout.fingerprint:#x}",
            "q heads/dim": _heads_and_dim(q),
            "k/v heads/dim": _heads_and_dim(k),
            "dtype": str(getattr(q, "dtype", None)),
            "softmax_scale": scale,
            "comm": comm,
            "ulysses x ring": f"{split[0]}x{split[1]}",
            "window": window,
            "sinks": "given" if sinks is not None else "none",
        }
        agreed_before = agree_once(
            layout, group, verdict, facts, agreement_device(group, q), AGREEMENT_REMEDIES, always=validate
        )
    if verdict is not None:
        if agreed_before:
            verdict += (
                " (found on this rank only: this layout was agreed on an earlier call, so the other ranks go on "
                "and time out waiting for this one; validate=True makes every rank raise this error)"
            )
        raise ValueError(verdict)
    plan = rank_plan(layout, rank, comm, window)  # hybrid: the ring plan of this rank's ring rank
    if layout.ulysses_size == 1:
        ring = groups.ring if groups is not None else group
        return _RingEoDFunction.apply(q, k, v, sinks, plan, ring, scale, kernel)
    _, _, replication = ulysses_heads(q.shape[1], k.shape[1], layout.ulysses_size)
    return _UlyssesRingFunction.apply(q, k, v, sinks, plan, groups.ulysses, groups.ring, replication, scale, kernel)


_MODULE_WINDOW = object()  # forward's default: the window the module was built with


class RingEoDAttention(nn.Module):
    """Module form of :func:`ring_eod_attention`: ``forward(q, k, v, layout, *, window=, sinks=) -> out``.

    ``group``: a CP process group or the :class:`~ringattn.CPGroups` of a hybrid split. ``window``: the
    layer's sliding window (a ``forward(window=...)`` keyword overrides it for one call)."""

    def __init__(
        self,
        softmax_scale: float | None = None,
        group: dist.ProcessGroup | CPGroups | None = None,
        *,
        window: int | None = None,
        comm: str | None = None,
        backend: str | None = None,
        validate: bool = False,
    ) -> None:
        super().__init__()
        self.softmax_scale, self.group, self.comm, self.backend = softmax_scale, group, comm, backend
        self.window, self.validate = window, validate

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: DocLayout,
        *,
        window: int | None = _MODULE_WINDOW,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # type: ignore[assignment]
        return ring_eod_attention(
            q,
            k,
            v,
            layout,
            self.group,
            self.softmax_scale,
            window=self.window if window is _MODULE_WINDOW else window,
            sinks=sinks,
            comm=self.comm,
            backend=self.backend,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        split = (
            f", ulysses_size={self.group.ulysses_size}, ring_size={self.group.ring_size}"
            if isinstance(self.group, CPGroups)
            else ""
        )
        window = f", window={self.window}" if self.window is not None else ""
        return f"softmax_scale={self.softmax_scale}, comm={self.comm or DEFAULT_COMM!r}{window}{split}"

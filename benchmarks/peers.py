"""ringattn beside PyTorch's own context parallelism, on the same packed batches and q/k/v.

    torchrun --standalone --nproc-per-node 2 benchmarks/peers.py [--sample-len 4096] [--workloads a,b]
             [--strategies zigzag,balanced,auto] [--balancers headtail,perdoc,ptrr] [--no-flex-compile]
             [--device cuda --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128]

CP is the world size. Every standard workload is rescaled to ``--sample-len`` tokens per sample
(``B`` samples of ``S`` tokens, the same global q/k/v and output gradient on every rank) and run by

* ringattn with each layout strategy (``ring_eod_attention``, public API);
* torch's flex-attention context parallelism (private, ``torch.distributed.tensor.experimental``):
  a document-causal ``mask_mod`` BlockMask of the whole batch, ``_context_parallel_shard`` with
  each load balancer (``none``, ``headtail``, ``perdoc``, ``ptrr``), ``flex_attention`` wrapped in
  ``_ContextParallel(AttentionType.FLEX)`` (K and V all-gathered, dK/dV reduce-scattered);
* torch's SDPA ring (``_ContextParallel(AttentionType.SDPA)``), which takes no mask: with one
  document per sample it runs ``is_causal=True`` (exact there), otherwise the document mask is
  passed as ``attn_mask`` and torch's refusal is printed.

Columns: the largest absolute error of out (and dq/dk/dv where the peer has a backward) against
a float64 per-document reference computed here (no code shared with either library); forward
(no grad) and forward+backward time of the slowest rank, median over ``--rounds`` interleaved
rounds, as a ratio to the first ringattn strategy's in the same rounds (first calls - compile,
warm-up - excluded and reported apart); KV tokens each rank received in one forward (ringattn:
counted on the P2P receives and checked against ``layout.stats().kv_recv_tokens``; torch: the
all-gathered K length minus the local one) and the bytes forward / backward; per-batch setup
(ringattn: layout + this rank's plan + sharding; torch: BlockMask + load balancer + sharding).
A peer's refusal or exception is printed with its text and the run goes on; peers that the
installed torch lacks are skipped with the missing names.

Torch sources read for this (2.11.0 and 2.13.0 agree on all of it but the name of the functional collective
``flex_cp_allgather`` calls: ``all_gather_tensor`` / ``all_gather_single``), all under
``torch/distributed/tensor/experimental/``: ``_attention.py`` (re-exports) and
``_context_parallel/_attention.py``: ``_context_parallel_shard`` -> ``_context_parallel_buffers``
(rearranges by ``load_balancer._generate_indices()``, then ``distribute_tensor(..., Shard(seq_dim),
src_data_rank=None)``; a BlockMask becomes ``_create_cp_block_mask``, which requires
``Q_LEN % (CP * 128) == 0`` and compiles ``create_block_mask``), ``_ContextParallel.flex_input_fn``
(``flex_cp_allgather`` of K and V, ``_context_parallel/_cp_custom_ops.py``; its backward
reduce-scatters full-length dK/dV), ``_ContextParallel.sdpa_input_fn`` / ``_sdpa_handler``
(``_scaled_dot_product_ring_efficient_attention`` raises "attn_bias is not supported yet");
``_context_parallel/_load_balancer.py``: ``_HeadTailLoadBalancer`` (``S % (2*CP)``),
``_PerDocumentHeadTailLoadBalancer._generate_indices_for_batch`` (every document ``% (2*CP)``),
``_PTRRLoadBalancer.ptrr_scheduling`` (128-token blocks per sample ``% CP``). Usage follows torch's
``test/distributed/tensor/test_attention.py`` (``CPFlexAttentionTest._test_cp_flex_attention``,
``RingAttentionTest._ring_attention_sdpa``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from _timed import add_run_args, rescaled, timed_rounds

import ringattn
from ringattn import DocLayout, rank_plan

STRATEGIES = ("zigzag", "balanced", "auto")
BALANCERS = ("none", "headtail", "perdoc", "ptrr")
TORCH_BLOCK = 128  # torch.nn.attention.flex_attention._DEFAULT_SPARSE_BLOCK_SIZE, which _create_cp_block_mask uses


# ------------------------------------------------------------------------------------------ torch's CP, detected
def torch_cp_api():
    """``(api, missing)``: the private CP names this torch has (a dict) and, per peer kind, what is missing."""
    api, missing = {}, {"flex": [], "sdpa": []}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        api.update(init_device_mesh=init_device_mesh, parallelize_module=parallelize_module)
    except ImportError as exc:
        missing["flex"].append(f"DeviceMesh/parallelize_module ({exc})")
        missing["sdpa"].append(f"DeviceMesh/parallelize_module ({exc})")
    try:
        from torch.nn.attention import flex_attention as fa

        api.update(flex_attention=fa.flex_attention, create_block_mask=fa.create_block_mask)
    except ImportError as exc:
        missing["flex"].append(f"torch.nn.attention.flex_attention ({exc})")
    try:
        import torch.distributed.tensor.experimental._attention as cp
    except ImportError as exc:
        cp = None
        for kind in missing:
            missing[kind].append(f"torch.distributed.tensor.experimental._attention ({exc})")
    names = {
        "flex": ("_ContextParallel", "_context_parallel_shard"),
        "sdpa": (
            "_ContextParallel",
            "_context_parallel_shard",
            "_enable_context_parallel_dispatcher",
            "_disable_context_parallel_dispatcher",
            "_HeadTailLoadBalancer",
            "_cp_options",
        ),
    }
    balancers = {
        "headtail": "_HeadTailLoadBalancer",
        "perdoc": "_PerDocumentHeadTailLoadBalancer",
        "ptrr": "_PTRRLoadBalancer",
    }
    if cp is not None:
        for kind, wanted in names.items():
            missing[kind] += [f"_attention.{n}" for n in wanted if not hasattr(cp, n)]
        for n in set(sum(names.values(), ())) | set(balancers.values()):
            if hasattr(cp, n):
                api[n] = getattr(cp, n)
        ctx_parallel = api.get("_ContextParallel")
        for kind, member in (("flex", "FLEX"), ("sdpa", "SDPA")):
            if ctx_parallel is not None and not hasattr(getattr(ctx_parallel, "AttentionType", None), member):
                missing[kind].append(f"_ContextParallel.AttentionType.{member}")
    for b, n in balancers.items():
        missing[b] = [] if n in api else [f"_attention.{n}"]
    missing["none"] = []
    return api, missing


# ----------------------------------------------------------------------------------------------- the reference
def reference(q, k, v, dout, cu, scale, docs) -> tuple:
    """float64 ``(out, dq, dk, dv)`` of document-causal attention over the flat ``[T, H, D]`` batch, for the
    documents ``docs`` (indices into ``cu``; the other rows stay 0). Each document on its own, queries in chunks,
    gradients by the textbook formulas (dS = P * (dP - rowsum(dO * O))) - no code shared with either library."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    f64 = dict(dtype=torch.float64, device=q.device)
    out, dq = torch.zeros(T, hq, d, **f64), torch.zeros(T, hq, d, **f64)
    dk, dv = torch.zeros(T, hkv, d, **f64), torch.zeros(T, hkv, d, **f64)
    budget = (2**28 if q.device.type == "cuda" else 2**23) // 8  # float64 score entries per chunk
    for doc in docs:
        a, b = cu[doc], cu[doc + 1]
        n = b - a
        qd, dod = q[a:b].double(), dout[a:b].double()
        kd, vd = (x[a:b].double().repeat_interleave(rep, dim=1) for x in (k, v))
        dkr, dvr = torch.zeros(n, hq, d, **f64), torch.zeros(n, hq, d, **f64)
        rows = max(1, budget // (hq * n))
        for c0 in range(0, n, rows):
            c1 = min(n, c0 + rows)
            s = torch.einsum("ihd,jhd->hij", qd[c0:c1], kd[:c1]) * scale
            causal = torch.arange(c0, c1, device=q.device)[:, None] >= torch.arange(c1, device=q.device)[None, :]
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
            o = torch.einsum("hij,jhd->ihd", p, vd[:c1])
            out[a + c0 : a + c1] = o
            dvr[:c1] += torch.einsum("hij,ihd->jhd", p, dod[c0:c1])
            dp = torch.einsum("ihd,jhd->hij", dod[c0:c1], vd[:c1])
            delta = (dod[c0:c1] * o).sum(-1).transpose(0, 1).unsqueeze(-1)
            ds = p * (dp - delta)
            dq[a + c0 : a + c1] = torch.einsum("hij,jhd->ihd", ds, kd[:c1]) * scale
            dkr[:c1] += torch.einsum("hij,ihd->jhd", ds, qd[c0:c1]) * scale
        dk[a:b] = dkr.view(n, hkv, rep, d).sum(2)
        dv[a:b] = dvr.view(n, hkv, rep, d).sum(2)
    return out, dq, dk, dv


def split_docs(cu, parts: int) -> list[list[int]]:
    """Documents dealt to ``parts`` ranks, largest (by length squared) first onto the least loaded."""
    load, share = [0] * parts, [[] for _ in range(parts)]
    for doc in sorted(range(len(cu) - 1), key=lambda i: (-(cu[i + 1] - cu[i]), i)):
        r = min(range(parts), key=lambda j: (load[j], j))
        share[r].append(doc)
        load[r] += (cu[doc + 1] - cu[doc]) ** 2
    return share


def distributed_reference(q, k, v, dout, cu, scale, rank, cp):
    """The reference of every document: each rank computes its share, one SUM all-reduce per tensor."""
    if q.device.type != "cpu":  # plenty of float64 throughput; skip moving GiBs through gloo
        return reference(q, k, v, dout, cu, scale, range(len(cu) - 1))
    parts = reference(q, k, v, dout, cu, scale, split_docs(cu, cp)[rank])
    for x in parts:
        dist.all_reduce(x)
    return parts


# ------------------------------------------------------------------------------------------------ shared state
@dataclass
class Batch:
    """One workload on this rank: the global packed tensors (flat ``[T, H, D]``) and its shape."""

    name: str
    cu: list
    B: int
    S: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    scale: float
    rank: int
    cp: int

    @property
    def T(self) -> int:
        return self.B * self.S

    def doc_ids(self) -> torch.Tensor:
        """int32 ``[T]``: each token's document index (built on the host in one op, as a user would)."""
        cu = torch.tensor(self.cu)
        return torch.repeat_interleave(torch.arange(len(cu) - 1, dtype=torch.int32), cu.diff()).to(self.q.device)

    def doc_lengths(self) -> list[list[int]]:
        """Per sample, its documents' lengths."""
        out = [[] for _ in range(self.B)]
        for a, b in zip(self.cu, self.cu[1:]):
            out[a // self.S].append(b - a)
        return out


@dataclass
class Outcome:
    """What a peer gave on one batch (every number already agreed over the ranks)."""

    peer: str
    refused: str = ""  # why it did not run at all
    bwd_refused: str = ""  # why it has no forward+backward
    errors: dict = field(default_factory=dict)  # out/dq/dk/dv -> largest abs error over all ranks
    coverage: str = ""  # "" when every row of the batch came from exactly one rank
    kv_tokens: list = field(default_factory=list)  # per rank, one forward
    kv_expected: list | None = None  # ringattn: layout.stats().kv_recv_tokens
    fwd_bytes: int = 0  # the busiest rank's, forward
    bwd_bytes: int = 0  # backward (KV again + dK/dV partials)
    setup_s: float = float("nan")  # median per-batch setup, slowest rank
    warmup_s: float = float("nan")  # first setup + first forward + first forward+backward, slowest rank
    fwd: list = field(default_factory=list)
    fwdbwd: list = field(default_factory=list)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def slowest(fn, device):
    """``(result, seconds)``: ``fn()`` timed as the slowest rank's (barrier before, MAX after)."""
    dist.barrier()
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    dt = torch.tensor(time.perf_counter() - t0)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return res, dt.item()


def agreed(fn, device):
    """``(result, seconds, error text)``: ``fn()`` on every rank, timed as the slowest rank's; if it raised on any
    rank, every rank gets the (first failing rank's) error text and ``None``."""
    dist.barrier()
    t0 = time.perf_counter()
    try:
        res, err = fn(), ""
        sync(device)
    except Exception as exc:  # noqa: BLE001 - a peer's refusal is a result here, printed with its text
        res, err = None, explain(exc)
    dt = torch.tensor(time.perf_counter() - t0)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((f"rank {r}: {e}" if len(set(errs)) > 1 else e for r, e in enumerate(errs) if e), "")
    return (None if first else res), dt.item(), first


def explain(exc: BaseException) -> str:
    """The exception's own text; a bare ``assert`` in torch's load balancers gets the rule it checks."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if text.endswith(":"):
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_frame.f_code.co_name}"
        rules = {
            "_generate_indices_for_batch": "every document's length % (2*CP) == 0",
            "_generate_indices": "sequence length % (2*CP) == 0",
        }
        rule = rules.get(tb.tb_frame.f_code.co_name, "")
        text = f"{text} (no message; raised in torch's {where}{': it requires ' + rule if rule else ''})"
    return " ".join(text.split())[:600]


# --------------------------------------------------------------------------------------------------- the peers
class RingPeer:
    """ringattn, public API only."""

    def __init__(self, strategy: str, args):
        self.name = f"ringattn {strategy}"
        self.strategy = strategy
        self.needs = (
            f"sample_len % {DocLayout.required_multiple(dist.get_world_size(), strategy=strategy)} == 0 "
            f"(DocLayout.required_multiple; pad to it otherwise); public API; no compile"
        )

    def setup(self, batch: Batch):
        layout = DocLayout.from_cu_seqlens(batch.cu, batch.cp, sample_len=batch.S, strategy=self.strategy)
        rank_plan(layout, batch.rank)  # this rank's plan, cached on the layout for its calls
        rows = layout.local_indices(batch.rank, batch.q.device)
        return dict(
            layout=layout,
            rows=rows,
            kv_rows=rows,
            q=batch.q[rows],
            k=batch.k[rows],
            v=batch.v[rows],
            dout=batch.dout[rows],
        )

    def forward(self, st, batch: Batch):
        return ringattn.ring_eod_attention(st["q"], st["k"], st["v"], st["layout"], softmax_scale=batch.scale)

    def layout_out(self, out):
        return out

    @contextlib.contextmanager
    def kv_counter(self, st, batch: Batch):
        """Counts the bytes this rank receives through ``dist.batch_isend_irecv`` (how ringattn's executor posts
        its exchanges) while the block runs: only KV moves in a forward."""
        real, got = dist.batch_isend_irecv, [0]

        def counting(ops):
            got[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.irecv)
            return real(ops)

        dist.batch_isend_irecv = counting
        try:
            yield got
        finally:
            dist.batch_isend_irecv = real

    def account(self, st, batch: Batch, got_bytes: int, oc: Outcome) -> None:
        per_token = 2 * batch.k.shape[1] * batch.k.shape[2] * batch.k.element_size()
        oc.kv_expected = list(st["layout"].stats().kv_recv_tokens)
        oc.kv_tokens = gather_ints(got_bytes // per_token if got_bytes % per_token == 0 else -got_bytes)
        cs = st["layout"].cp_stats(batch.q.shape[1], batch.k.shape[1], batch.k.shape[2], batch.k.element_size())
        oc.fwd_bytes, oc.bwd_bytes = max(cs.ring_fwd_bytes), max(cs.ring_bwd_bytes)


class FlexPeer:
    """torch's flex-attention CP with one load balancer (private API)."""

    def __init__(self, balancer: str, api: dict, compile_flex: bool, args):
        self.name = f"torch flex {balancer}"
        self.balancer, self.api = balancer, api
        cp = dist.get_world_size()
        rule = {
            "none": "",
            "headtail": f"; S % {2 * cp} == 0",
            "perdoc": f"; every document % {2 * cp} == 0",
            "ptrr": f"; (S/128) % {cp} == 0",
        }[balancer]
        self.needs = (
            f"S % {TORCH_BLOCK * cp} == 0 (128*CP; pad otherwise){rule}; private: _ContextParallel(FLEX), "
            f"_context_parallel_shard"
            + ("" if balancer == "none" else ", a _LoadBalancer")
            + "; a BlockMask of the whole batch on every rank; "
            + (
                "create_block_mask and flex_attention compiled"
                if compile_flex
                else "create_block_mask and flex_attention eager (torch compiles its CP BlockMask anyway)"
            )
            + "; no backward on CPU"
        )
        flex = api["flex_attention"]

        # Two entry points with their own code objects: when a compiled call raises (on CPU, flex refuses any input
        # that requires grad), Dynamo marks that top-level function to run eagerly from then on - seen on torch 2.13:
        # the no-grad forward then ran 25-40x slower. The training entry point may be lost that way, not this one.
        def flex_infer(q, k, v, **kw):
            return flex(q, k, v, **kw)

        def flex_train(q, k, v, **kw):
            return flex(q, k, v, **kw)

        self.flex_infer, self.flex_train = (
            (torch.compile(f, dynamic=False) for f in (flex_infer, flex_train)) if compile_flex else (flex, flex)
        )
        if not compile_flex:  # chosen on purpose (the header says so): not worth a warning per call
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        self.block_mask = (
            torch.compile(api["create_block_mask"], dynamic=False, fullgraph=True)
            if compile_flex
            else api["create_block_mask"]
        )
        self.mesh = None
        self.seen_kv = []

    def _module(self, device):
        if self.mesh is None:
            peer = self

            class Flex(torch.nn.Module):
                def forward(self, q, k, v, **kw):
                    return (peer.flex_train if torch.is_grad_enabled() else peer.flex_infer)(q, k, v, **kw)

            self.mesh = self.api["init_device_mesh"](device.type, (dist.get_world_size(),))
            self.module = self.api["parallelize_module"](
                Flex(),
                self.mesh,
                self.api["_ContextParallel"](seq_dim=2, attention_type=self.api["_ContextParallel"].AttentionType.FLEX),
            )
            # after torch's pre-hook (flex_input_fn): the all-gathered K seen by the kernel
            self.module.register_forward_pre_hook(
                lambda mod, args, kw: self.seen_kv.append(args[1].shape[2]), with_kwargs=True
            )
        return self.module

    def setup(self, batch: Batch):
        B, S, dev = batch.B, batch.S, batch.q.device
        module = self._module(dev)
        doc = batch.doc_ids().view(B, S)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

        block_mask = self.block_mask(document_causal, B, 1, S, S, device=dev.type)
        lb = None
        if self.balancer == "headtail":
            lb = self.api["_HeadTailLoadBalancer"](S, batch.cp, dev)
        elif self.balancer == "perdoc":
            lb = self.api["_PerDocumentHeadTailLoadBalancer"](batch.doc_lengths(), batch.cp, dev)
        elif self.balancer == "ptrr":
            lb = self.api["_PTRRLoadBalancer"](block_mask, batch.cp)
        bhsd = [
            x.view(B, S, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()
            for x in (batch.q, batch.k, batch.v, batch.dout)
        ]
        *shards, cp_mask = self.api["_context_parallel_shard"](
            self.mesh, bhsd[:3] + [block_mask], [2] * 4, load_balancer=lb
        )
        (dout,) = self.api["_context_parallel_shard"](self.mesh, bhsd[3:], [2], load_balancer=lb)
        # which global rows this rank holds: torch rearranges by lb._generate_indices(), then takes block `rank`
        order = lb._generate_indices() if lb is not None else torch.arange(S, device=dev)[None]
        n = S // batch.cp
        local = order[:, batch.rank * n : (batch.rank + 1) * n].to(dev).long().expand(B, n)
        rows = (local + torch.arange(B, device=dev)[:, None] * S).reshape(-1)
        return dict(
            q=shards[0], k=shards[1], v=shards[2], dout=dout, mask=cp_mask, rows=rows, kv_rows=rows, module=module
        )

    def forward(self, st, batch: Batch):
        return st["module"](
            st["q"],
            st["k"],
            st["v"],
            block_mask=st["mask"],
            scale=batch.scale,
            enable_gqa=batch.q.shape[1] != batch.k.shape[1],
        )

    @staticmethod
    def layout_out(x):
        """``[B, H, n, D]`` -> ``[B*n, H, D]`` in the order of ``rows``."""
        return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])

    @contextlib.contextmanager
    def kv_counter(self, st, batch: Batch):
        self.seen_kv.clear()
        got = [0]
        yield got
        got[0] = sum(batch.B * (g - batch.S // batch.cp) for g in self.seen_kv)

    def account(self, st, batch: Batch, got_tokens: int, oc: Outcome) -> None:
        oc.kv_tokens = gather_ints(got_tokens)
        per_token = 2 * batch.k.shape[1] * batch.k.shape[2] * batch.k.element_size()
        oc.fwd_bytes = max(oc.kv_tokens) * per_token
        # backward: the reduce-scatter of full-length dK and dV (grad dtype = K's) brings (CP-1) local lengths
        oc.bwd_bytes = batch.B * (batch.cp - 1) * (batch.S // batch.cp) * per_token


class SdpaPeer:
    """torch's SDPA ring (private API); it takes no document mask."""

    name = "torch sdpa ring"

    def __init__(self, api: dict, args):
        self.api = api
        self.needs = (
            "no document mask (attn_bias refused): runs is_causal=True only where every sample is one "
            "document; K/V repeated to Hq heads by this script; private: _ContextParallel(SDPA), "
            "_context_parallel_shard, _enable_context_parallel_dispatcher; CUDA kernels only "
            "(no CPU sharding rule)"
        )
        self.mesh = None

    def close(self) -> None:
        if self.mesh is not None:
            self.api["_disable_context_parallel_dispatcher"]()

    def setup(self, batch: Batch):
        B, S, dev = batch.B, batch.S, batch.q.device
        if self.mesh is None:
            # DTensor's SDPA ops go to the CP ring from here on, backward included (no other peer uses DTensor)
            self.api["_enable_context_parallel_dispatcher"]()

            class Sdpa(torch.nn.Module):
                def forward(self, q, k, v, **kw):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

            self.mesh = self.api["init_device_mesh"](dev.type, (batch.cp,))
            self.module = self.api["parallelize_module"](
                Sdpa(),
                self.mesh,
                self.api["_ContextParallel"](seq_dim=2, attention_type=self.api["_ContextParallel"].AttentionType.SDPA),
            )
        causal = len(batch.cu) - 1 == B  # one document per sample: the causal mask is the document mask
        rep = batch.q.shape[1] // batch.k.shape[1]
        bhsd = [
            x.view(B, S, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()
            for x in (batch.q, batch.k, batch.v, batch.dout)
        ]
        lb = self.api["_HeadTailLoadBalancer"](S, batch.cp, dev) if causal else None  # lb needs is_causal
        shards = self.api["_context_parallel_shard"](self.mesh, bhsd, [2] * 4, load_balancer=lb)
        order = lb._generate_indices() if lb is not None else torch.arange(S, device=dev)[None]
        n = S // batch.cp
        local = order[:, batch.rank * n : (batch.rank + 1) * n].to(dev).long().expand(B, n)
        rows = (local + torch.arange(B, device=dev)[:, None] * S).reshape(-1)
        kw = dict(scale=batch.scale)
        if causal:
            kw["is_causal"] = True
        else:
            doc = batch.doc_ids().view(B, S)
            qd = doc.gather(1, local)
            pos = torch.arange(S, device=dev)
            kw["attn_mask"] = ((qd[:, :, None] == doc[:, None, :]) & (local[:, :, None] >= pos[None, None, :]))[:, None]
        return dict(
            q=shards[0],
            k=shards[1],
            v=shards[2],
            dout=shards[3],
            rows=rows,
            kv_rows=rows,
            kw=kw,
            rep=rep,
            balanced=lb is not None,
        )

    def forward(self, st, batch: Batch):
        # _context_parallel_shard sets the global _cp_options.enable_load_balance from its load_balancer argument,
        # and the flex peers' setups call it too: restore what this peer's shards were made with
        self.api["_cp_options"].enable_load_balance = st["balanced"]
        k, v = (x.repeat_interleave(st["rep"], dim=1) for x in (st["k"], st["v"]))
        return self.module(st["q"], k, v, **st["kw"])

    layout_out = staticmethod(FlexPeer.layout_out)

    @contextlib.contextmanager
    def kv_counter(self, st, batch: Batch):
        yield [batch.B * (batch.cp - 1) * (batch.S // batch.cp)]  # formula: its all-gather of the local K/V

    def account(self, st, batch: Batch, got_tokens: int, oc: Outcome) -> None:
        oc.kv_tokens = gather_ints(got_tokens)
        per_token = 2 * batch.q.shape[1] * batch.k.shape[2] * batch.k.element_size()  # K/V repeated to Hq heads
        oc.fwd_bytes = max(oc.kv_tokens) * per_token
        oc.bwd_bytes = oc.fwd_bytes


def gather_ints(x: int) -> list[int]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(x))
    return out


# ------------------------------------------------------------------------------------------------- one batch
def run_peer(peer, batch: Batch, ref, setup_reps: int) -> tuple[Outcome, dict]:
    """Everything but the timed rounds: setup (first call = warm-up), first forward, first forward+backward
    (refusals recorded), KV counted on one forward, exactness, the per-batch setup time. Returns the outcome and
    the closures to time (``{"fwd": fn, "fwdbwd": fn}``, only those that ran)."""
    dev = batch.q.device
    oc = Outcome(peer.name)
    st, t_setup, err = agreed(lambda: peer.setup(batch), dev)
    if err:
        oc.refused = f"setup: {err}"
        return oc, {}
    leaves = {n: st[n].detach().clone().requires_grad_() for n in ("q", "k", "v")}

    def fwd():
        with torch.no_grad():
            return peer.forward({**st, **{n: t.detach() for n, t in leaves.items()}}, batch)

    def fwdbwd():
        for t in leaves.values():
            t.grad = None
        out = peer.forward({**st, **leaves}, batch)
        out.backward(st["dout"])
        return out

    out, t_fwd, err = agreed(fwd, dev)
    if err:
        oc.refused = f"forward: {err}"
        oc.warmup_s = t_setup + t_fwd
        return oc, {}
    runs = {"fwd": fwd}
    out_b, t_bwd, err = agreed(fwdbwd, dev)
    oc.warmup_s = t_setup + t_fwd + t_bwd
    if err:
        oc.bwd_refused = err
    else:
        runs["fwdbwd"] = fwdbwd
        out = out_b
    with peer.kv_counter(st, batch) as got:
        fwd()
    peer.account(st, batch, got[0], oc)
    # exactness: every global row from exactly one rank, largest abs error against the reference
    results = {"out": (peer.layout_out(out), st["rows"])}
    if "fwdbwd" in runs:
        results.update(
            dq=(peer.layout_out(leaves["q"].grad), st["rows"]),
            dk=(peer.layout_out(leaves["k"].grad), st["kv_rows"]),
            dv=(peer.layout_out(leaves["v"].grad), st["kv_rows"]),
        )
    errs = torch.full((4,), -1.0, dtype=torch.float64)  # -1: no such result
    cover = torch.zeros(batch.T, dtype=torch.int64, device=dev)
    cover.index_add_(0, st["rows"], torch.ones_like(st["rows"]))
    for i, (key, r) in enumerate(zip(("out", "dq", "dk", "dv"), ref)):
        if key in results:
            x, rows = results[key]
            e = (x.detach().double() - r[rows]).abs().max().item() if rows.numel() else 0.0
            errs[i] = float("inf") if math.isnan(e) else e  # a NaN anywhere counts as infinitely wrong
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    dist.all_reduce(cover)
    for i, key in enumerate(("out", "dq", "dk", "dv")):
        if key in results:
            oc.errors[key] = errs[i].item()
    bad = (cover != 1).nonzero().flatten()
    if bad.numel():
        oc.coverage = f"{bad.numel()} of {batch.T} rows held by {sorted(set(cover[bad].tolist()))} ranks"
    times = [slowest(lambda: peer.setup(batch), dev)[1] for _ in range(setup_reps)]
    oc.setup_s = statistics.median(times) if times else float("nan")
    return oc, runs


def make_batch(name: str, args, rank: int, cp: int, device, dtype) -> Batch:
    wl, cu = rescaled(name, args.sample_len)
    T = cu[-1]
    g = torch.Generator().manual_seed(1234)  # the same global tensors on every rank
    mk = lambda h: torch.randn(T, h, args.head_dim, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v, dout = mk(args.heads), mk(args.kv_heads), mk(args.kv_heads), mk(args.heads)
    return Batch(wl["name"], cu, T // args.sample_len, args.sample_len, q, k, v, dout, args.head_dim**-0.5, rank, cp)


def build_peers(args, api, missing, cp):
    """``(peers, skipped)``: peers asked for that this torch offers, and ``(name, reason)`` for the rest."""
    peers, skipped = [RingPeer(s, args) for s in args.strategies.split(",") if s], []
    for b in [b for b in args.balancers.split(",") if b]:
        if b not in BALANCERS:
            raise SystemExit(f"--balancers: unknown {b!r}; choose from {','.join(BALANCERS)}")
        lack = missing["flex"] + missing[b]
        if lack:
            skipped.append((f"torch flex {b}", f"this torch ({torch.__version__}) lacks {', '.join(lack)}"))
        else:
            peers.append(FlexPeer(b, api, args.flex_compile, args))
    if args.sdpa:
        if args.device == "cpu":
            # _sdpa_handler's call_maps (_context_parallel/_attention.py) map only the CUDA kernels (flash, efficient,
            # cudnn); aten._scaled_dot_product_flash_attention_for_cpu goes to DTensor's generic sharding propagation,
            # which on torch 2.13 was still decomposing after 100 s at CP 2 on a 512-token sample (not waited for)
            skipped.append(
                (
                    SdpaPeer.name,
                    "CPU: torch's CP SDPA handler maps only the CUDA attention kernels "
                    "(_sdpa_handler); on CPU the op falls to DTensor's generic sharding "
                    "propagation, which did not finish in 100 s on torch 2.13",
                )
            )
        elif missing["sdpa"]:
            skipped.append((SdpaPeer.name, f"this torch ({torch.__version__}) lacks {', '.join(missing['sdpa'])}"))
        else:
            peers.append(SdpaPeer(api, args))
    return peers, skipped


def run(argv=None, out=sys.stdout) -> dict:
    """Runs the comparison on the initialised default process group (CP = its size); prints on rank 0 and returns
    ``{workload: [Outcome, ...]}`` on every rank."""
    args = parser().parse_args(argv)
    rank, cp = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    api, missing = torch_cp_api()
    peers, skipped = build_peers(args, api, missing, cp)
    say = (lambda *a: print(*a, file=out, flush=True)) if rank == 0 else (lambda *a: None)
    say(
        f"CP={cp} ({dist.get_backend()}, {device.type}), torch {torch.__version__}, Hq={args.heads} "
        f"Hkv={args.kv_heads} "
        f"D={args.head_dim} {args.dtype}, sample_len={args.sample_len}, {args.rounds} rounds, {args.threads} thread(s) "
        f"per rank, flex {'compiled' if args.flex_compile else 'eager'}"
    )
    say("What each needs from the user:")
    for p in peers:
        say(f"  {p.name:<20} {p.needs}")
    for name, why in skipped:
        say(f"  {name:<20} skipped: {why}")
    base = peers[0].name
    say(
        f"err: largest |x - float64 reference| over all ranks ('-': no such result); ms: median of the slowest rank; "
        f"x: ratio to {base} in the same rounds; warm-up: first setup + first calls (compile), slowest rank; "
        f"KV tok: tokens each rank received in one forward; MiB: busiest rank, forward / backward (ringattn: "
        f"layout.cp_stats, exact; torch flex: forward from the all-gathered K/V, backward the (CP-1)/CP share of "
        f"full-length dK/dV a reduce-scatter brings - gloo runs it as an all-reduce, which moves more); setup: "
        f"median per-batch setup, slowest rank"
    )
    results = {}
    for wname in args.workloads.split(","):
        batch = make_batch(wname, args, rank, cp, device, dtype)
        (ref, t_ref) = slowest(
            lambda: distributed_reference(batch.q, batch.k, batch.v, batch.dout, batch.cu, batch.scale, rank, cp),
            device,
        )
        say(f"\n{batch.name}: {batch.B} x {batch.S} tokens, {len(batch.cu) - 1} documents (reference {t_ref:.1f} s)")
        outcomes, runs = [], {}
        for peer in peers:
            oc, fns = run_peer(peer, batch, ref, args.setup_reps)
            outcomes.append(oc)
            runs.update({(peer.name, kind): fn for kind, fn in fns.items()})
        timed = timed_rounds(
            {key: (lambda fn=fn: (fn(), sync(device))) for key, fn in runs.items()}, args.rounds, warm=False
        )
        for oc in outcomes:
            oc.fwd, oc.fwdbwd = timed.get((oc.peer, "fwd"), []), timed.get((oc.peer, "fwdbwd"), [])
        results[batch.name] = outcomes
        if rank == 0:
            print_table(outcomes, batch, out)
        del ref
    for p in peers:
        getattr(p, "close", lambda: None)()
    return results


def fmt_err(oc: Outcome, key: str) -> str:
    return f"{oc.errors[key]:.1e}" if key in oc.errors else "-"


def print_table(outcomes: list[Outcome], batch: Batch, out) -> None:
    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    base = outcomes[0]
    bf, bb = med(base.fwd), med(base.fwdbwd)
    p(
        f"{'peer':<20} {'out':>7} {'dq':>7} {'dk':>7} {'dv':>7} {'fwd ms':>8} {'x':>5} {'f+b ms':>8} {'x':>5} "
        f"{'warm-up s':>9} {'setup ms':>8} {'MiB f/b':>11}  KV tok per rank"
    )
    notes = []
    for oc in outcomes:
        if oc.refused:
            p(f"{oc.peer:<20} refused - {oc.refused}")
            continue
        f, fb = med(oc.fwd), med(oc.fwdbwd)
        ratio = lambda a, b: "    -" if math.isnan(a) or math.isnan(b) else f"{a / b:5.2f}"  # noqa: E731
        ms = lambda a: "       -" if math.isnan(a) else f"{a * 1e3:8.1f}"  # noqa: E731
        kv = "/".join(str(t) for t in oc.kv_tokens)
        if oc.kv_expected is not None:
            kv += " (= plan)" if list(oc.kv_tokens) == list(oc.kv_expected) else f" (plan: {oc.kv_expected}!)"
        p(
            f"{oc.peer:<20} {fmt_err(oc, 'out'):>7} {fmt_err(oc, 'dq'):>7} {fmt_err(oc, 'dk'):>7} "
            f"{fmt_err(oc, 'dv'):>7} "
            f"{ms(f)} {ratio(f, bf)} {ms(fb)} {ratio(fb, bb)} {oc.warmup_s:9.2f} {oc.setup_s * 1e3:8.1f} "
            f"{oc.fwd_bytes / 2**20:5.2f}/{oc.bwd_bytes / 2**20:5.2f}  {kv}"
        )
        if oc.coverage:
            notes.append(f"  {oc.peer}: NOT EXACT - {oc.coverage}")
        if oc.bwd_refused:
            notes.append(f"  {oc.peer}: no backward - {oc.bwd_refused}")
    for n in dict.fromkeys(notes):
        p(n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, sample_len=4096, rounds=5)
    p.set_defaults(heads=4, kv_heads=2, head_dim=64)
    p.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="ringattn layout strategies; the first is the base of the time ratios",
    )
    p.add_argument(
        "--balancers",
        default="headtail,perdoc,ptrr",
        help=f"torch flex CP load balancers, from {','.join(BALANCERS)} ('' for none of them)",
    )
    p.add_argument("--no-sdpa", dest="sdpa", action="store_false", help="leave out torch's SDPA ring")
    p.add_argument(
        "--no-flex-compile",
        dest="flex_compile",
        action="store_false",
        help="run flex_attention eagerly (its unfused path: it materialises the scores)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--setup-reps", type=int, default=3, help="timed per-batch setups after the first")
    p.add_argument("--backend", default="gloo", help="process group backend (gloo: several ranks may share one GPU)")
    return p


def main() -> None:
    args, _ = parser().parse_known_args()
    dist.init_process_group(args.backend)
    try:
        run()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

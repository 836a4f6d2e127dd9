"""A cost model for one attention layer's forward + backward under a layout and plan shape.

:class:`HardwareProfile` holds the few numbers the model needs: the sustained attention kernel
rate and the link bandwidths (a few named presets, with their sources, or measured on this
machine with ``python -m ringattn.cost --calibrate``). :class:`CostModel` adds the attention
shape (heads, KV heads, head dim, dtype) and prices a layout:

* compute (forward + backward) = 3.5 x forward FLOPs, forward FLOPs = ``4 * head_dim * num_heads``
  per unmasked score entry (the plan's exact work: QK^T and PV, 2 FLOPs per multiply-add each;
  backward ~2.5x forward: dQ, dK, dV and the recomputed scores), at ``profile.flops``;
* communication = the forward KV exchange + its replay in backward + the fp32 dK/dV partials
  returned for the rows read, at ``profile.p2p_bandwidth`` bytes/s per rank and direction: a
  rank's link time is ``max(bytes in, bytes out) / p2p_bandwidth`` with
  bytes in = 2 x KV received + fp32 dK/dV arriving for its own KV, and
  bytes out = 2 x KV sent + fp32 dK/dV it returns (bf16 KV: about 4x the forward KV bytes for a
  rank that sends as much as it receives);
* a rank's time = ``max(compute, communication) + steps * latency`` (the exchange of the next
  step is overlapped with the current step's compute, as the executor does); the step's time
  is the busiest rank's; efficiency = ideal / step time with ideal = total compute / CP.

One optional term goes beyond that default: ``profile.segment_overhead`` seconds per block pair
given to the kernel (fixed per-segment cost: a kernel call or a partly filled tile), added to a
rank's compute. It is 0 in the presets, so the default model is exactly the one above;
``--calibrate`` measures it, which matters on CPU, where every segment is a separate kernel call.

All counts come from the plan (:class:`ringattn.plan.PlanStats`), exact for every comm shape.

Hybrid Ulysses x ring layouts (``ulysses_size = U > 1``, ``R = cp / U`` ring ranks), per CP rank
``c = ring_rank * U + ulysses_rank``:

* compute = its ring rank's work (the ring plan of ``layout.ring_layout``) on ``Hq/U`` query
  heads: the ``U`` Ulysses ranks of a ring rank share its work equally (each runs all of it on
  its share of the heads); the per-segment overhead counts the ring rank's segments;
* the ring exchange is priced as above on the KV heads each Ulysses rank carries around its
  ring (``Hkv/U`` when split, 1 when replicated: :func:`ringattn.plan.ulysses_heads`); ``R = 1``
  (pure Ulysses) has no exchange and no ring steps;
* all-to-all = the bytes a rank sends to (= receives from) its ``U - 1`` Ulysses peers, forward
  (q/k/v in, output back) and backward (d(output) in, dq/dk/dv back, the dK/dV of replicated KV
  heads in fp32), exactly :class:`ringattn.plan.CPStats`' ``a2a_fwd_bytes + a2a_bwd_bytes``, at
  ``profile.a2a_bandwidth`` bytes/s per rank (``p2p_bandwidth`` when it is ``None``). The
  all-to-alls sit before and after the ring in both passes and overlap nothing (as in the
  implementation), so they are *added*:
  ``time = max(compute, ring exchange) + ring steps * latency + all-to-all + 4 * latency / 3``
  (four all-to-alls per forward + backward, each charged one small exchange: ``latency`` is three
  per ring step, see ``--calibrate``). With ``U = 1`` this is exactly the ring model above.

Two-level clusters (``profile.node_size = n > 0``: ``n`` consecutive CP ranks per node):
``a2a_bandwidth`` is then the link *inside* a node (NVLink, HCCS) and ``p2p_bandwidth`` the link
*between* nodes (InfiniBand, RoCE). An all-to-all's bytes to peers on the rank's node move at
``a2a_bandwidth``, those to other nodes at ``p2p_bandwidth``, concurrently (its time is the larger
of the two); a ring whose ranks lie on one node exchanges at ``a2a_bandwidth``, a ring that spans
nodes at ``p2p_bandwidth`` (its steps are synchronised and every step of every comm shape has a
transfer that crosses nodes, which gates it). ``node_size = 0`` (the default, all presets but the
``*-nvlink-ib400`` ones) is one level: the ring at ``p2p_bandwidth``, all-to-alls at
``a2a_bandwidth``. The two-level rule assumes a switched node (NVSwitch: a rank's bandwidth does
not depend on how many peers it talks to); calibrate a full-mesh node (HCCS) with the all-to-all
over the ranks you will use as Ulysses group (``--calibrate --node-size``).
"""

from .model import (  # noqa: F401  (the model's constants)
    A2A_PER_LAYER,
    EXCHANGES_PER_STEP,
    FWD_BWD_FACTOR,
    CostModel,
    Prediction,
    default_cost_model,
    flops_per_entry,
)
from .profiles import DEFAULT_PROFILE, PRESETS, HardwareProfile, preset

__all__ = [
    "HardwareProfile",
    "CostModel",
    "Prediction",
    "PRESETS",
    "DEFAULT_PROFILE",
    "preset",
    "default_cost_model",
    "flops_per_entry",
]

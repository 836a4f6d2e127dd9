"""The schedule each CP rank runs: pure Python, deterministic, no torch.distributed.

Every rank derives the same global :class:`Plan` from the :class:`~ringattn.layout.DocLayout`,
so no metadata is exchanged at run time. Per rank, a plan is a list of :class:`Step` s, the
same step distances on every rank. At step ``t`` rank ``r`` computes on the KV of the
*origin* rank ``(r - t) % cp``: its own KV at ``t = 0``, a received buffer otherwise.

Facts the planner relies on (pieces of a rank are sorted and disjoint):

* a q piece against an *earlier* KV piece of the same sample shares at most one document
  (the one holding the q piece's first token), so the pair is one dense rectangle or nothing;
* a piece against itself is causal per document, with equal q and KV ranges;
* the KV a q piece reads from one origin, for that document, is contiguous in any buffer
  that holds the origin's tokens sorted by global position (everything between two read
  tokens lies in the same document and before the query).

Comm shapes (all run by the one executor in :mod:`ringattn.comm`):

* ``plain``  — the classic ring: every step forwards the origin's whole KV to the next rank
  (``cp - 1`` steps). Kept as the baseline.
* ``ring``   — neighbour forwarding of only what this and downstream ranks still read; stops
  when nothing is left.
* ``direct`` — shifted exchange: at step ``t`` rank ``r`` sends to ``r + t`` exactly the KV
  that rank reads; steps in which nobody sends are skipped.

dK/dV partials go back to the origin in one message per step, only for the rows the
computing rank read (see :mod:`ringattn.comm.executor`).

Work is counted in unmasked score entries (one query-key product per head), tokens in
KV tokens (one key and one value row per KV head).

Hybrid layouts (``ulysses_size > 1``) are planned over their ring ranks; :mod:`.hybrid` adds
the all-to-all bytes per CP rank (:class:`CPStats`).
"""
from __future__ import annotations

from .build import Accounting, build_plan, direct_accounting, pieces_accounting, rank_plan
from .hybrid import CPStats, cp_stats, ulysses_heads
from .types import COMM_SHAPES, DEFAULT_COMM, Plan, PlanStats, RankPlan, Segment, Step, Transfer

__all__ = ["COMM_SHAPES", "DEFAULT_COMM", "Segment", "Transfer", "Step", "RankPlan", "PlanStats", "Plan", "build_plan",
           "rank_plan", "CPStats", "cp_stats", "ulysses_heads", "direct_accounting", "pieces_accounting", "Accounting"]

"""The schedule each CP rank runs: pure Python, deterministic, no torch.distributed.

Every rank derives its own :class:`RankPlan` from the same :class:`~ringattn.layout.DocLayout`
(:func:`rank_plan`, kept for the layout object by this package, never in it), so no metadata is exchanged at run time;
:func:`build_plan` assembles every rank's plan with the exact :class:`PlanStats` (statistics,
the inspector, benchmarks). A rank's plan is a list of :class:`Step` s, the same step
distances on every rank. At step ``t`` rank ``r`` computes on the KV of the *origin* rank
``(r - t) % cp``: its own KV at ``t = 0``, a received buffer otherwise.

Modules: :mod:`.types` (the frozen dataclasses), :mod:`.build` (the planner and the direct
plan's fast accounting), :mod:`.hybrid` (Ulysses x ring head split and bytes per CP rank).

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

Example: one sample of 16 tokens, documents ``[0, 5)``, ``[5, 8)``, ``[8, 16)``, 2 CP ranks
(zigzag: rank 0 holds tokens ``[0, 4)`` and ``[12, 16)``, rank 1 ``[4, 12)``):

>>> from ringattn import DocLayout, build_plan, rank_plan
>>> layout = DocLayout.from_cu_seqlens([0, 5, 8, 16], cp_size=2)
>>> plan = rank_plan(layout, 1)
>>> plan
RankPlan(rank=1, comm='direct', steps=2, local_tokens=8, work=21, kv_recv_tokens=4)
>>> rank_plan(layout, 1) is plan              # planned once per layout object
True

Step 0 runs rank 1's own KV: causal blocks, one per document part. At step 1 rank 1 receives
rank 0's rows ``[0, 4)`` (tokens 0-3 of the first document, which its local row 0, token 4,
reads), sends rank 0 its rows ``[4, 8)`` (tokens 8-11, read by tokens 12-15), and in backward
returns the dK/dV of what it read and receives that of what it sent:

>>> [(s.q, s.kv, s.causal) for s in plan.steps[0].segments]
[((0, 1), (0, 1), True), ((1, 4), (1, 4), True), ((4, 8), (4, 8), True)]
>>> step = plan.steps[1]
>>> step.origin, [(s.q, s.kv, s.causal) for s in step.segments]
(0, [((0, 1), (0, 4), False)])
>>> step.recv, step.send
(Transfer(peer=0, rows=((0, 4),)), Transfer(peer=0, rows=((4, 8),)))
>>> step.grad_send.rows, step.grad_recv.rows
(((0, 4),), ((4, 8),))

The plan inspector (``python -m ringattn.inspect --workload NAME --cp N``, :mod:`ringattn.inspect`)
prints, for every rank, the stats of :func:`build_plan`, then one line per comm shape:

>>> from ringattn.inspect import rank_table, summary_line
>>> print(rank_table(build_plan(layout)))
rank   tokens          work work/mean  pairs skipped   KV recv x local recv steps
   0        8            36     1.263      3       3         4   0.500          1
   1        8            21     0.737      2       1         4   0.500          1
>>> print(summary_line(build_plan(layout, "plain")))
 plain: steps 1, imbalance 1.263, KV recv total 16 tokens, max/rank 8 (1.000x local), critical path 8 tokens
>>> print(summary_line(build_plan(layout, "direct")))
direct: steps 1, imbalance 1.263, KV recv total 8 tokens, max/rank 4 (0.500x local), critical path 4 tokens
"""

from __future__ import annotations

from .build import Accounting, build_plan, direct_accounting, pieces_accounting, rank_plan
from .hybrid import CPStats, cp_stats, ulysses_heads
from .types import COMM_SHAPES, DEFAULT_COMM, Plan, PlanStats, RankPlan, Segment, Step, Transfer

__all__ = [
    "COMM_SHAPES",
    "DEFAULT_COMM",
    "Segment",
    "Transfer",
    "Step",
    "RankPlan",
    "PlanStats",
    "Plan",
    "build_plan",
    "rank_plan",
    "CPStats",
    "cp_stats",
    "ulysses_heads",
    "direct_accounting",
    "pieces_accounting",
    "Accounting",
]

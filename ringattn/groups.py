"""Process groups of hybrid context parallelism: Ulysses (inner) x ring (outer).

A CP group of ``cp = U * R`` ranks is split into ``R`` Ulysses groups of ``U`` consecutive CP
ranks (one all-to-all over heads each; put them inside a node) and ``U`` ring groups of ``R``
ranks with stride ``U`` (P2P between nodes)::

    cp_rank = ring_rank * U + ulysses_rank

the order of megatron-core's hierarchical CP groups (``create_hierarchical_groups``, inner
level first) and of MindSpeed's hybrid CP. Groups are created explicitly, once, by
:func:`new_cp_groups` and passed to attention; nothing is created lazily or kept globally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.distributed as dist

from ._validate import positive_int

__all__ = ["CPGroups", "new_cp_groups", "ResolvedGroup", "resolve_group"]


@dataclass(frozen=True)
class CPGroups:
    """The CP group and its Ulysses and ring subgroups, as seen by this rank.

    cp: the whole CP group (agreement runs over it). ulysses: this rank's Ulysses group
    (``None`` when ``ulysses_size == 1``). ring: this rank's ring group (``None`` when
    ``ring_size == 1``). Pass it as ``group=`` wherever ringattn takes a CP group; a plain
    process group there keeps meaning a pure ring.
    """

    cp: dist.ProcessGroup
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    ulysses_size: int
    ring_size: int

    @property
    def cp_size(self) -> int:
        return self.ulysses_size * self.ring_size

    def ranks(self) -> tuple[int, int, int]:
        """``(cp_rank, ring_rank, ulysses_rank)`` of this process."""
        c = dist.get_rank(self.cp)
        return (c,) + divmod(c, self.ulysses_size)

    @classmethod
    def from_groups(
        cls, cp: dist.ProcessGroup, ulysses: dist.ProcessGroup | None, ring: dist.ProcessGroup | None
    ) -> CPGroups:
        """Wrap existing groups (e.g. megatron-core's hierarchical CP groups), checking their layout.

        Collective over ``cp``: every rank all-gathers the global ranks of its groups, so every
        rank checks the same facts and raises the same ``ValueError`` if ``ulysses``/``ring``
        (``None`` for size 1) are not the Ulysses and ring groups of ``cp`` in the order
        ``cp_rank = ring_rank * U + ulysses_rank``.
        """
        me = dist.get_process_group_ranks(cp)[dist.get_rank(cp)]
        mine = tuple(tuple(dist.get_process_group_ranks(g)) if g is not None else (me,) for g in (ulysses, ring))
        seen: list = [None] * dist.get_world_size(cp)
        dist.all_gather_object(seen, mine, group=cp)
        problem = _check_order(dist.get_process_group_ranks(cp), seen)
        if problem:
            raise ValueError(
                f"groups: {problem}; pass the groups ringattn.new_cp_groups(U, cp_group) builds, or "
                "megatron's hierarchical CP groups (Ulysses inner, ring outer)"
            )
        u, r = len(seen[0][0]), len(seen[0][1])
        return cls(cp, ulysses if u > 1 else None, ring if r > 1 else None, u, r)


def _check_order(cp_ranks: list[int], seen: list) -> str | None:
    """Why the per-CP-rank ``(ulysses ranks, ring ranks)`` are not the hybrid layout of ``cp_ranks``."""
    cp = len(cp_ranks)
    u, r = len(seen[0][0]), len(seen[0][1])
    if u * r != cp:
        return f"the Ulysses group size ({u}) times the ring group size ({r}) must equal the CP size ({cp})"
    for c, (uly, ring) in enumerate(seen):
        rr, uu = divmod(c, u)
        want_u = tuple(cp_ranks[rr * u + j] for j in range(u))
        want_r = tuple(cp_ranks[j * u + uu] for j in range(r))
        if tuple(uly) != want_u or tuple(ring) != want_r:
            return (
                f"CP rank {c} (global rank {cp_ranks[c]}) has Ulysses group {list(uly)} and ring group "
                f"{list(ring)}; expected {list(want_u)} and {list(want_r)} "
                f"(cp_rank = ring_rank * {u} + ulysses_rank, Ulysses groups of consecutive CP ranks)"
            )
    return None


def new_cp_groups(ulysses_size: int, group: dist.ProcessGroup | None = None) -> CPGroups:
    """Build the Ulysses and ring subgroups of the CP group ``group`` (default: the world).

    Collective over the *default* group: every process of the job calls it, in the same
    order relative to its other ``new_group`` calls (``torch.distributed.new_group`` requires
    that), each with its own CP group when there are several (data x context parallel).
    One ``all_gather_object`` over the default group lets every rank create every subgroup in
    the same order and reject bad arguments alike: a ``ulysses_size`` that differs between
    ranks or does not divide the CP size, or CP groups that overlap, raise the same
    ``ValueError`` on every rank before any group is created.

    Usage (not run here: it needs an initialised process group), e.g. 16 processes, CP 16 as
    Ulysses 8 (inside a node) x ring 2 (across nodes)::

        dist.init_process_group("nccl")
        groups = ringattn.new_cp_groups(8)            # every process calls it, in the same order
        groups.ulysses_size, groups.ring_size         # (8, 2)
        groups.ranks()                                # (cp_rank, ring_rank, ulysses_rank), e.g. (11, 1, 3) on rank 11
        layout = DocLayout.from_tokens(tokens, eod_id, cp_size=16, ulysses_size=8)
        out = ringattn.ring_eod_attention(q, k, v, layout, group=groups)

    With data x context parallelism, every process passes its own CP group
    (``new_cp_groups(8, my_cp_group)``); all processes still call it together.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "new_cp_groups: torch.distributed is not initialised; call dist.init_process_group first "
            "(e.g. under torchrun)"
        )
    cp_group = dist.group.WORLD if group is None else group
    mine = (ulysses_size, tuple(dist.get_process_group_ranks(cp_group)))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    problem = _check_request(every)
    if problem:
        raise ValueError(
            f"new_cp_groups: {problem}; every process calls new_cp_groups with the same ulysses_size, a "
            "divisor of its CP group's size, each with its own CP group (disjoint, ranks ascending)"
        )
    u = ulysses_size
    me = dist.get_rank()
    ulysses = ring = None
    for cp_ranks in sorted({ranks for _, ranks in every}):
        cp = len(cp_ranks)
        r = cp // u
        subgroups = []
        if 1 < u < cp:
            subgroups += [("ulysses", [cp_ranks[rr * u + j] for j in range(u)]) for rr in range(r)]
        if 1 < r < cp:
            subgroups += [("ring", [cp_ranks[j * u + uu] for j in range(r)]) for uu in range(u)]
        for kind, ranks in subgroups:
            g = dist.new_group(ranks)
            if me in ranks:
                ulysses, ring = (g, ring) if kind == "ulysses" else (ulysses, g)
        if me in cp_ranks:
            if u == cp and u > 1:
                ulysses = cp_group
            if r == cp and r > 1:
                ring = cp_group
    return CPGroups(cp_group, ulysses, ring, u, dist.get_world_size(cp_group) // u)


def _check_request(every: list) -> str | None:
    sizes = {u for u, _ in every}
    if len(sizes) > 1:
        return f"ranks passed different ulysses_size values {sorted(sizes, key=repr)}"
    (u,) = sizes
    try:
        positive_int("ulysses_size", u)
    except ValueError as exc:
        return str(exc)
    groups = sorted({ranks for _, ranks in every})
    owner: dict[int, tuple] = {}
    for ranks in groups:
        if list(ranks) != sorted(ranks):  # new_group orders a subgroup by global rank
            return (
                f"the CP group's global ranks {list(ranks)} are not ascending in CP rank order, so its subgroups "
                "could not follow cp_rank = ring_rank * ulysses_size + ulysses_rank"
            )
        if len(ranks) % u:
            return f"ulysses_size={u} does not divide the CP group size {len(ranks)} (ranks {list(ranks)})"
        for x in ranks:
            if x in owner:
                return f"CP groups {list(owner[x])} and {list(ranks)} overlap at rank {x}"
            owner[x] = ranks
    return None


class ResolvedGroup(NamedTuple):
    """What a ``group=`` argument means on this rank: the CP group (None for CP size 1), the
    :class:`CPGroups` of a hybrid split (None for a plain group), this rank's CP rank and the CP size."""

    group: dist.ProcessGroup | None
    groups: CPGroups | None
    rank: int
    size: int


def resolve_group(group: dist.ProcessGroup | CPGroups | None, cp_size: int | None = None) -> ResolvedGroup:
    """The one reading of ``group=`` (attention, adapters): local checks only, no communication.

    ``group``: a ``torch.distributed`` ProcessGroup (a ring over it), a :class:`CPGroups` (Ulysses x ring),
    or None: the world group when torch.distributed is initialised, else CP size 1. A group of one rank
    means CP size 1 (nothing to agree on or exchange). ``cp_size``: the CP size the caller needs (a
    layout's); with None and no process group, ``cp_size > 1`` is a ``ValueError``.
    """
    groups = None
    if isinstance(group, CPGroups):
        groups, group = group, group.cp
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                f"group: the CPGroups' cp group must be a torch.distributed ProcessGroup, got "
                f"{type(group).__name__}; build it with ringattn.new_cp_groups(U, cp_group)"
            )
    elif group is None:
        if not (dist.is_available() and dist.is_initialized()):
            if cp_size not in (None, 1):
                raise ValueError(
                    f"group: layout.cp_size={cp_size} needs an initialised process group, but "
                    "torch.distributed is not initialised (call dist.init_process_group, e.g. under torchrun)"
                )
            return ResolvedGroup(None, None, 0, 1)
        if cp_size == 1:
            return ResolvedGroup(None, None, 0, 1)
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"group: expected a torch.distributed ProcessGroup, a ringattn.CPGroups or None, got "
            f"{type(group).__name__}; pass the CP process group, ringattn.new_cp_groups(U, cp_group) for "
            "Ulysses x ring, or None for the world group"
        )
    size = dist.get_world_size(group)
    if groups is not None and groups.cp_size != size:
        raise ValueError(
            f"group: the CPGroups split {groups.cp_size} ranks (ulysses_size={groups.ulysses_size} x "
            f"ring_size={groups.ring_size}) but its cp group has {size}; build it with "
            "ringattn.new_cp_groups(U, cp_group) over this CP group"
        )
    if size == 1:
        return ResolvedGroup(None, None, 0, 1)
    return ResolvedGroup(group, groups, dist.get_rank(group), size)

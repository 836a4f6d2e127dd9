"""Host work per call does not grow with the number of documents (aten op counts, never times).

Ring at CP 1 and 4, and CP 4 as Ulysses x ring 2x2 and pure Ulysses 4x1 (the all-to-all path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .dist import unwrap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import overhead  # noqa: E402  (benchmarks/overhead.py)

SAMPLE = 4096
DOCS = (10, 100, 1000)


def _measure(rank, cp, docs_list, ulysses=1):
    import torch.distributed as dist

    from .cases import cp_groups

    group = cp_groups(ulysses) if ulysses > 1 else dist.group.WORLD if cp > 1 else None
    return [
        overhead.measure_rank(
            rank,
            cp,
            overhead.sample_cu(d, SAMPLE),
            SAMPLE,
            "null",
            "cpu",
            max(1, ulysses),
            8,
            repeat=1,
            group=group,
            ulysses=ulysses,
        )
        for d in docs_list
    ]


def _check(per_docs):
    """per_docs: {docs: [result per rank]}."""
    for docs, ranks in per_docs.items():
        for r in ranks:
            assert r["ops"] <= 100 + 150 * r["steps"], (docs, r["rank"], r["ops"], r["steps"])
            assert not r["syncing"], (docs, r["syncing"])
    worst = {docs: max(r["ops"] for r in ranks) for docs, ranks in per_docs.items()}
    # 100x more documents, no more ops than the smaller batches needed
    assert worst[1000] <= max(worst[10], worst[100]), worst


def test_op_count_flat_in_documents_cp1():
    _check({d: r for d, r in zip(DOCS, [_measure(0, 1, DOCS)[i : i + 1] for i in range(len(DOCS))])})


@pytest.mark.parametrize("cp", [4])
def test_op_count_flat_in_documents_multi_rank(cp, rank_pools):
    per_rank = unwrap(rank_pools(cp).run(_measure, DOCS))
    _check({d: [res[i] for res in per_rank] for i, d in enumerate(DOCS)})


@pytest.mark.parametrize("ulysses", [2, 4], ids=["hybrid_2x2", "ulysses_4x1"])
def test_op_count_flat_in_documents_ulysses_and_hybrid(ulysses, rank_pools):
    per_rank = unwrap(rank_pools(4).run(_measure, DOCS, ulysses))
    _check({d: [res[i] for res in per_rank] for i, d in enumerate(DOCS)})

"""Standard packed-document workloads and rescaling.

The workloads ship inside the package (``ringattn/data/workloads/*.json``, package data read through
:mod:`importlib.resources`), so the inspector and the benchmarks find them in any installation;
``RINGATTN_WORKLOADS`` points elsewhere (a directory of the same JSON files).
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

__all__ = ["WORKLOAD_DIR", "load_workload", "rescale_cu_seqlens", "workload_names"]

#: where the standard workloads are read from
WORKLOAD_DIR = Path(os.environ.get("RINGATTN_WORKLOADS") or str(files("ringattn") / "data" / "workloads"))


def workload_names() -> list[str]:
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.json"))


def load_workload(path_or_name: str) -> dict:
    """``{"name", "sample_len", "cu_seqlens", ...}`` from a JSON path or a standard name."""
    p = Path(path_or_name)
    if not p.exists():
        p = WORKLOAD_DIR / f"{path_or_name}.json"
    if not p.exists():
        raise ValueError(
            f"workload: no file {path_or_name!r} and no standard workload of that name "
            f"(known: {workload_names()}); pass one of those names or a JSON file with sample_len and "
            "cu_seqlens"
        )
    with open(p) as f:
        data = json.load(f)
    for key in ("sample_len", "cu_seqlens"):
        if key not in data:
            raise ValueError(
                f"workload {p}: missing key {key!r}; a workload JSON holds sample_len and cu_seqlens "
                "(global document boundaries from 0)"
            )
    data.setdefault("name", p.stem)
    return data


def rescale_cu_seqlens(cu_seqlens, sample_len: int, new_sample_len: int) -> list[int]:
    """Shrink a layout to ``new_sample_len`` tokens per sample, keeping its document structure.

    Boundaries are scaled and rounded; documents that would vanish keep one token; sample
    boundaries stay boundaries.

    >>> rescale_cu_seqlens([0, 100, 300, 400, 401, 800], 400, 40)   # 2 samples of 400 -> 40 tokens
    [0, 10, 30, 40, 41, 80]
    >>> load_workload("pretrain_mix_128k")["sample_len"]
    131072
    """
    out = [0]
    for c in cu_seqlens[1:]:
        sample, off = divmod(c, sample_len)
        if off == 0:
            sample, off = sample - 1, sample_len
        new = sample * new_sample_len + round(off * new_sample_len / sample_len)
        out.append(max(new, out[-1] + 1))
    # keep the last boundary of every sample exactly on the sample end
    total = (cu_seqlens[-1] // sample_len) * new_sample_len
    fixed = [0]
    for c in out[1:]:
        end = ((fixed[-1] // new_sample_len) + 1) * new_sample_len
        fixed.append(min(c, end, total))
    return sorted(set(fixed))

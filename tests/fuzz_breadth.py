"""What the fuzz draws, measured without running attention: ``python -m tests.fuzz_breadth [--profile P]``.

Calls every hypothesis test of ``tests/test_fuzz.py`` with its pytest parameters, exactly as pytest would under
the profile (the default profile is derandomized, so these are the CI's cases), but with the rank pool, the
kernels and the checks replaced by recorders. Prints, per test and CP size: cases drawn, the share of multi-rank
cases whose plan exchanges KV (some document on two ring ranks; under the case's window, if any), the Ulysses x
ring splits drawn, at CP 1 the share of cases made only of single-token documents, and the windows (none, 1, one
ending inside the longest document, one at least as long as every document) and sinks drawn.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter


def _params(fn) -> list[dict]:
    """The pytest parametrizations of ``fn`` as keyword dicts (their cross product)."""
    combos = [{}]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
        combos = [{**c, **dict(zip(names, v))} for c in combos for v in values]
    return combos


def drawn_cases(profile: str = "default") -> dict:
    """``{(test name, params): [Case, ...]}`` drawn by every fuzz test under ``profile``."""
    from hypothesis import settings

    from . import conftest  # noqa: F401 - registers the profiles

    settings.load_profile(profile)
    from . import test_fuzz as tf

    drawn: dict = {}
    current: list = []

    class Pool:
        def __init__(self, cp):
            self.cp = cp

        def run(self, fn, cases):
            current.extend(cases)
            return [("ok", [None] * len(cases))] * self.cp

    patched = {
        "check_case": lambda *a, **k: None,
        "device_baseline": lambda *a, **k: None,
        "assemble": lambda *a, **k: None,
        "run_case": lambda rank, cp, case: current.append(case),
    }
    saved = {name: getattr(tf, name) for name in patched if hasattr(tf, name)}
    for name, value in patched.items():
        if name in saved:
            setattr(tf, name, value)
    try:
        for name, fn in inspect.getmembers(tf, inspect.isfunction):
            if not name.startswith("test_fuzz"):
                continue
            for params in _params(fn):
                current.clear()
                kwargs = dict(params)
                if "rank_pools" in inspect.signature(fn).parameters:
                    kwargs["rank_pools"] = Pool
                fn(**kwargs)
                drawn[(name, tuple(sorted(params.items())))] = list(current)
    finally:
        for name, value in saved.items():
            setattr(tf, name, value)
    return drawn


def _exchanges_kv(case, cp: int) -> bool:
    from ringattn import build_plan

    from .cases import case_layout

    layout = case_layout(case, cp)
    return sum(build_plan(layout, case.comm, case.window).stats.kv_recv_tokens) > 0


def window_kind(case) -> str:
    """``none``, ``1``, ``inside`` (2 up to the longest document - 1: it ends inside a document) or ``>= docs``."""
    if case.window is None:
        return "none"
    longest = max(b - a for a, b in zip(case.cu_seqlens, case.cu_seqlens[1:]))
    return "1" if case.window == 1 else (">= docs" if case.window >= longest else "inside")


def _windows_and_sinks(cases) -> str:
    kinds = Counter(window_kind(c) for c in cases)
    drawn = ", ".join(f"{k} {kinds[k]}" for k in ("none", "1", "inside", ">= docs"))
    return f"windows {drawn}; sinks {sum(c.sinks for c in cases)}"


def report(drawn: dict) -> str:
    lines = []
    for (name, params), cases in sorted(drawn.items()):
        p = dict(params)
        cp = p.get("cp", 1)
        if "u" in p:  # hybrid, one split per test instance
            cp = p["u"] * p["r"]
        label = f"{name}[{', '.join(f'{k}={v}' for k, v in params)}]"
        n = len(cases)
        if cp == 1:
            single = sum(all(b - a == 1 for a, b in zip(c.cu_seqlens, c.cu_seqlens[1:])) for c in cases)
            lines.append(f"{label}: {n} cases, {single} only single-token documents; {_windows_and_sinks(cases)}")
            continue
        ring = Counter(f"{c.ulysses or 1}x{cp // (c.ulysses or 1)}" for c in cases)
        kv = sum(_exchanges_kv(c, cp) for c in cases)
        splits = ", ".join(f"{k}: {v}" for k, v in sorted(ring.items())) if any(c.ulysses for c in cases) else ""
        lines.append(
            f"{label}: {n} cases, {kv} exchange KV ({100 * kv / max(n, 1):.0f}%)"
            + (f"; splits {splits}" if splits else "")
            + f"; {_windows_and_sinks(cases)}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    args = ap.parse_args(argv)
    print(report(drawn_cases(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The plan inspector's window line and its picture (strategies side by side on shared scales)."""

from __future__ import annotations

import pytest

from ringattn import DocLayout, build_plan
from ringattn.inspect import main, window_line
from ringattn.workloads import load_workload


def test_window_line_compares_with_full_attention(capsys):
    main(["--workload", "pretrain_mix_128k", "--cp", "8", "--window", "4096"])
    text = capsys.readouterr().out
    wl = load_workload("pretrain_mix_128k")
    layout = DocLayout.from_cu_seqlens(wl["cu_seqlens"], 8, sample_len=wl["sample_len"])
    want = window_line(build_plan(layout, "direct", 4096), build_plan(layout, "direct"))
    assert want in text and "window=4096" in text
    assert want.startswith(f"window 4096: busiest rank work {max(build_plan(layout, 'direct', 4096).stats.work)} of ")


def test_png_draws_strategies_side_by_side(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="--png needs matplotlib (the plot extra)")
    import ringattn.inspect as inspector

    drawn = []
    real = inspector.save_png
    monkeypatch.setattr(inspector, "save_png", lambda rows, path, title: (drawn.append(rows), real(rows, path, title)))
    path = tmp_path / "cmp.png"
    main(["--workload", "pretrain_mix_128k", "--cp", "8", "--png", str(path), "--png-strategies", "zigzag,balanced"])
    assert path.stat().st_size > 10_000 and f"wrote {path}" in capsys.readouterr().out
    (rows,) = drawn
    assert [label for label, _ in rows] == ["zigzag: ", "balanced: "]
    assert rows[0][1].stats.imbalance > 2 and rows[1][1].stats.imbalance < 1.1  # what the shared scale shows

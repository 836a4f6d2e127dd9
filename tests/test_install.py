"""Install story: a wheel built from the checkout, installed (not editable) in a fresh virtual environment, runs the
plan inspector from outside the checkout with the workloads that ship inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_wheel_installs_and_the_inspector_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("ringattn-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    # the dependencies (torch, einops, numpy) from this interpreter's site-packages, added as a path only: its .pth
    # files (the editable install of the checkout among them) are not processed there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RINGATTN_WORKLOADS")}
    where = _run(
        [
            str(python),
            "-c",
            "import ringattn, ringattn.workloads as w; print(ringattn.__file__); print(w.workload_names())",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert where.startswith(str(site)) and "pretrain_mix_128k" in where, where
    out = _run(
        [str(python), "-m", "ringattn.plan", "--workload", "pretrain_mix_128k", "--cp", "8"], cwd=tmp_path, env=env
    )
    assert "pretrain_mix_128k: 54 docs, 131072 tokens, CP=8" in out and "direct: steps" in out, out

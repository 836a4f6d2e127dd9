"""Mutation check: does a one-line semantic change to the library, one per promise, fail a targeted test?

``make mutants`` (or ``python tests/mutants.py``) copies the repository's files (``git ls-files``, tracked and
untracked-not-ignored) into a temporary directory per mutant, replaces the mutant's exact original source text
(it must occur exactly once in its file) with the replacement, runs the mutant's short list of targeted tests
there (``python -m pytest -x``, that copy first on ``PYTHONPATH``) and records whether a test failed (killed) or
all passed (survived). The targeted tests are run once on an unmutated copy first: they must pass, and the
library they import must be the copy's. Mutants are identified by text, not line numbers, so they survive code
moves; a mutant whose original text is missing or ambiguous is an error.

The kill table goes to stdout (markdown); ``--doc docs/mutants.md`` rewrites that file with the list and the
table. Exit status: non-zero if any mutant survives (except those marked ``pending``, which name the tests that
will kill them once merged: they are reported, and ``--strict`` counts them too), if an original text is not
found exactly once, or if the unmutated baseline fails. ``-k TEXT`` runs the mutants whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LAST_VERDICTS: dict = {}


@dataclass(frozen=True)
class Mutant:
    name: str  # short id
    promise: str  # what the library promises that this breaks
    file: str  # path relative to the repository root
    original: str  # exact source text (one line, or a line plus the context that makes it unique)
    replacement: str
    tests: tuple[str, ...]  # targeted pytest node ids / paths, run with -x in the mutated copy
    pending: str = ""  # survives today: the tests that will kill it, and where they come from


_PREC = "tests/test_precision.py"
_CPU2 = "tests/test_attention.py::test_multi_rank_matches_dense_reference[2-cpu]"
_CP1 = "tests/test_attention.py::test_cp1_without_process_group_matches_reference[cpu]"
_FLASH = "tests/test_backends.py::test_cuda_backend_through_flash_attn_matches_float64"
_ATEN = "tests/test_backends.py::test_cuda_backend_through_aten_flash_ops_matches_float64"
_NPU_LAYOUT = "tests/test_backends.py::test_npu_default_statistics_layout_regression"
_FUSED = "tests/test_backends.py::test_npu_fused_merge_takes_negative_lse"
_FIELD = "tests/test_faults.py::test_ranks_that_differ_in_one_field_get_one_error_naming_it[{}]"
_WINDOW = (
    "tests/test_window.py::test_window_and_sinks_match_the_dense_reference[1]",
    "tests/test_window.py::test_window_and_sinks_match_the_dense_reference[2]",
)
_NPU_WINDOW = (
    "tests/test_window_npu.py::test_npu_window_and_sinks_match_the_dense_reference[1]",
    "tests/test_window_npu.py::test_npu_window_and_sinks_match_the_dense_reference[2]",
)
_CUDA_WINDOW = (
    "tests/test_window_cuda.py::test_cuda_windows_and_sinks_through_the_standins[1]",
    "tests/test_window_cuda.py::test_cuda_windows_and_sinks_through_the_standins[2]",
)

#: the curated list: one mutant per promise
MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "merge-lse",
        "LSE merge: the merged LSE is logaddexp of the parts",
        "ringattn/merge.py",
        "    new = torch.logaddexp(lse_acc, lse)",
        "    new = torch.maximum(lse_acc, lse)",
        ("ringattn/merge.py", _CPU2),
    ),
    Mutant(
        "merge-weight",
        "LSE merge: each part weighted by exp(its lse - merged lse)",
        "ringattn/merge.py",
        "out.float() * torch.exp(lse - new).unsqueeze(-1)",
        "out.float() * torch.exp(new - lse).unsqueeze(-1)",
        ("ringattn/merge.py", _CPU2),
    ),
    Mutant(
        "causal-flag",
        "causal flags: a rank's own blocks are causal",
        "ringattn/plan/build.py",
        "own.append(Segment((q_off + a - s, q_off + b - s), (q_off + a - s, q_off + b - s), True))",
        "own.append(Segment((q_off + a - s, q_off + b - s), (q_off + a - s, q_off + b - s), False))",
        ("tests/test_plan.py", _CP1),
    ),
    Mutant(
        "plan-range",
        "plan ranges: a dense block's query rows stop at the document end",
        "ringattn/plan/build.py",
        "q = (q_off, q_off + min(e, cu[d + 1]) - s)",
        "q = (q_off, q_off + e - s)",
        ("tests/test_plan.py", _CP1),
    ),
    Mutant(
        "step-distance",
        "step distances: at step t rank x reads origin x - t and sends to x + t",
        "ringattn/plan/build.py",
        "            o, y = (x - t) % cp, (x + t) % cp\n            mine = need.get(o)",
        "            o, y = (x + t) % cp, (x - t) % cp\n            mine = need.get(o)",
        ("tests/test_plan.py",),
    ),
    Mutant(
        "dkv-accumulate",
        "dK/dV accumulation: a step's partials add up (K)",
        "ringattn/comm/executor.py",
        "        call.kv.add(dsrc[:, 0], g_k)",
        "        call.kv.put(dsrc[:, 0], g_k)",
        (_CP1, _CPU2),
    ),
    Mutant(
        "dkv-land",
        "dK/dV accumulation: returned partials are added at the owner",
        "ringattn/comm/executor.py",
        "            rows.add(dkv, recv)",
        "            rows.put(dkv, recv)",
        (_CPU2,),
    ),
    # (a bf16 owner accumulator would also make the fp32 dK/dV messages land in bf16 buffers: gloo hangs on the size
    # mismatch; rounding each arrival breaks the same promise without that)
    Mutant(
        "dkv-owner-precision",
        "dK/dV partials arriving at the owner are accumulated in fp32",
        "ringattn/comm/executor.py",
        "            rows.add(dkv, recv)",
        "            rows.add(dkv, recv.to(kv.dtype).float())",
        (_PREC,),
    ),
    Mutant(
        "dkv-return-precision",
        "dK/dV partials return in fp32",
        "ringattn/comm/executor.py",
        "sends.append((step.grad_send.peer, sx.grad_send.take(target).contiguous()))",
        "sends.append((step.grad_send.peer, sx.grad_send.take(target).to(kv.dtype).float().contiguous()))",
        (_PREC,),
    ),
    Mutant(
        "dq-dtype",
        "dq accumulated in fp32",
        "ringattn/comm/executor.py",
        "    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)",
        "    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)",
        (_PREC,),
    ),
    Mutant(
        "saved-out-dtype",
        "backward gets the fp32 merged output (BACKWARD_TAKES_FP32_OUT)",
        "ringattn/attention.py",
        '        saved_out = out32 if getattr(kernel, "BACKWARD_TAKES_FP32_OUT", False) else out\n'
        "        ctx.save_for_backward(q, kv, saved_out, lse, sinks)",
        "        saved_out = out\n        ctx.save_for_backward(q, kv, saved_out, lse, sinks)",
        (_PREC,),
    ),
    Mutant(
        "replicated-dkv-dtype",
        "Ulysses: replicated KV heads' dK/dV return and are summed in fp32",
        "ringattn/attention.py",
        "        kv_dtype = torch.float32 if rep > 1 else ctx.kv_dtype",
        "        kv_dtype = ctx.kv_dtype",
        (_PREC,),
    ),
    Mutant(
        "cpu-kernel-fp32",
        "CPU backend computes half precision in fp32",
        "ringattn/kernels/cpu.py",
        "    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]",
        "    return list(xs)",
        (_PREC,),
    ),
    Mutant(
        "agreement-comm",
        "agreement facts hold the comm shape",
        "ringattn/attention.py",
        '            "comm": comm,\n',
        "",
        (_FIELD.format("comm"),),
    ),
    Mutant(
        "agreement-kv-heads",
        "agreement facts hold the K/V heads and head dim",
        "ringattn/attention.py",
        '"k/v heads/dim": _heads_and_dim(k),',
        "",
        (_FIELD.format("k/v heads/dim"),),
    ),
    Mutant(
        "agreement-window",
        "agreement facts hold the sliding window",
        "ringattn/attention.py",
        '"window": window,',
        "",
        ("tests/test_window.py::test_bad_window_or_sinks_raise_the_same_error_on_every_rank",),
    ),
    Mutant(
        "pad-forward",
        "CUDA: head dims padded to a multiple of 8 (forward)",
        "ringattn/kernels/cuda.py",
        "    q, k, v = _pad8(*(x.contiguous() for x in (q, k, v)))",
        "    q, k, v = (x.contiguous() for x in (q, k, v))",
        (_FLASH, _ATEN),
    ),
    Mutant(
        "pad-backward",
        "CUDA: head dims padded to a multiple of 8 (backward)",
        "ringattn/kernels/cuda.py",
        "    dout, q, k, v, out = _pad8(*(x.contiguous() for x in (dout, q, k, v, out.to(q.dtype))))",
        "    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out.to(q.dtype)))",
        (_FLASH, _ATEN),
    ),
    Mutant(
        "cuda-lse-layout",
        "CUDA: backward gets the LSE as a contiguous [H, total_q]",
        "ringattn/kernels/cuda.py",
        "    lse_ht = lse.t().contiguous()",
        "    lse_ht = lse.t()",
        (_FLASH,),
    ),
    Mutant(
        "cuda-cu-int32",
        "CUDA: cu_seqlens are int32",
        "ringattn/kernels/cuda.py",
        "torch.tensor(call.cu_q, dtype=torch.int32)",
        "torch.tensor(call.cu_q, dtype=torch.int64)",
        (_FLASH,),
    ),
    Mutant(
        "flash-version-args",
        "CUDA: flash_attn arguments by the installed version's signature",
        "ringattn/kernels/cuda.py",
        "    if version >= (2, 7):\n        return common + (left, right, 0.0, None, False)",
        "    if version >= (2, 8):\n        return common + (left, right, 0.0, None, False)",
        ("tests/test_backends.py::test_flash_attn_arguments_bind_to_the_real_signatures",),
    ),
    Mutant(
        "npu-stats-forward",
        "NPU: default statistics read head-major per segment",
        "ringattn/kernels/npu.py",
        "lse = flat[_head_major_index(call, ch, heads, q.device)[0]].view(t, heads)",
        "lse = flat.view(t, heads)",
        (_NPU_LAYOUT,),
    ),
    Mutant(
        "npu-stats-backward",
        "NPU: default statistics written head-major per segment",
        "ringattn/kernels/npu.py",
        "stats = _replicate8(_l.reshape(-1)[inverse]).view(_l.shape[0], heads, 8)",
        "stats = _replicate8(_l.reshape(-1)).view(_l.shape[0], heads, 8)",
        (_NPU_LAYOUT,),
    ),
    Mutant(
        "npu-fused-lse",
        "NPU fused merge: LSE = softmax_max + log(softmax_sum)",
        "ringattn/kernels/npu.py",
        "return new_out, new_max[..., 0] + torch.log(new_sum[..., 0])",
        "return new_out, new_max[..., 0]",
        (_FUSED,),
    ),
    Mutant(
        "npu-fused-fp32",
        "NPU fused merge keeps the accumulator in fp32",
        "ringattn/kernels/npu.py",
        "return new_out, new_max[..., 0] + torch.log(new_sum[..., 0])",
        "return new_out.to(out.dtype).float(), new_max[..., 0] + torch.log(new_sum[..., 0])",
        (_FUSED,),
    ),
    Mutant(
        "npu-fused-fp32-bound",
        "device-path bound (tests/rounding.py) tight enough to see one extra rounding per "
        "step: the multi-rank NPU test catches the fused merge rounded to bf16 (the old bound, one ulp of the "
        "largest value, let it through)",
        "ringattn/kernels/npu.py",
        "return new_out, new_max[..., 0] + torch.log(new_sum[..., 0])",
        "return new_out.to(out.dtype).float(), new_max[..., 0] + torch.log(new_sum[..., 0])",
        (
            "tests/test_attention.py::test_multi_rank_matches_dense_reference[2-npu]",
            "tests/test_attention.py::test_multi_rank_matches_dense_reference[3-npu]",
        ),
    ),
    Mutant(
        "npu-fallback-visible",
        "NPU: falling back from the fused merge warns, naming the error",
        "ringattn/kernels/npu.py",
        '        warnings.warn(\n            f"ringattn: npu_ring_attention_update failed',
        '        if False: warnings.warn(\n            f"ringattn: npu_ring_attention_update failed',
        ("tests/test_backends.py::test_npu_fused_merge_missing_from_cann_falls_back_once",),
    ),
    Mutant(
        "npu-fallback-later",
        "NPU: a fused-merge rejection after the first call is handled the same way",
        "ringattn/kernels/npu.py",
        "    except RuntimeError as exc:  # missing aclnn kernel",
        "    except (RuntimeError if caps.fused_merge is None else ()) as exc:  # missing aclnn kernel",
        ("tests/test_backends.py::test_npu_fused_merge_rejection_after_the_first_call_is_handled_the_same_way",),
    ),
    Mutant(
        "window-trim",
        "window: a read's query rows stop where the window no longer reaches its keys",
        "ringattn/plan/window.py",
        "    end = min(qe, b + w - 1)",
        "    end = min(qe, b + w)",
        _WINDOW,
    ),
    Mutant(
        "window-pair",
        "window: a read is masked by (W - 1 - delta, delta)",
        "ringattn/plan/window.py",
        "False, (w - 1 - delta, delta))",
        "False, (w - delta, delta))",
        _WINDOW,
    ),
    Mutant(
        "window-causal",
        "window: a rank's own blocks are masked by (W - 1, 0)",
        "ringattn/plan/window.py",
        "own.append(Segment(rows, rows, True, (w - 1, 0)))",
        "own.append(Segment(rows, rows, True, (w, 0)))",
        _WINDOW,
    ),
    Mutant(
        "window-reads",
        "window: a piece reads the keys [qs - W + 1, qs) before it, no fewer",
        "ringattn/plan/window.py",
        "lo = max(cu[d], s - w + 1)",
        "lo = max(cu[d], s - w + 2)",
        ("tests/test_window.py::test_window_kv_received_is_exactly_what_the_window_reads",),
    ),
    Mutant(
        "cpu-window-mask",
        "CPU kernel: the band mask keeps keys [r - left, r + right]",
        "ringattn/kernels/cpu.py",
        "keep = (c >= r - left) & (c <= r + right)",
        "keep = (c > r - left) & (c <= r + right)",
        _WINDOW,
    ),
    Mutant(
        "sinks-merge",
        "sinks: the output is rescaled by exp(lse - lse') after the merge",
        "ringattn/attention.py",
        "return out32 * torch.exp(lse - new).unsqueeze(-1), new",
        "return out32, new",
        _WINDOW,
    ),
    Mutant(
        "sinks-grad",
        "sinks: dL/ds = -sum exp(s - lse') rowsum(dout * out')",
        "ringattn/attention.py",
        "return -(torch.exp(sinks.float().unsqueeze(0) - lse) * rowsum).sum(0)",
        "return (torch.exp(sinks.float().unsqueeze(0) - lse) * rowsum).sum(0)",
        _WINDOW,
    ),
    Mutant(
        "sinks-ulysses",
        "sinks under Ulysses: a rank applies its head group's sinks",
        "ringattn/attention.py",
        "sinks.reshape(u, hq_u)[ulysses.rank()]",
        "sinks.reshape(u, hq_u)[0]",
        ("tests/test_window.py::test_window_and_sinks_under_ulysses_2_x_ring_2",),
    ),
    Mutant(
        "npu-window-tockens",
        "NPU: the window pair (left, right) is the band's (pre_tockens, next_tockens)",
        "ringattn/kernels/npu.py",
        '"pre_tockens": left, "next_tockens": right}',
        '"pre_tockens": right, "next_tockens": left}',
        _NPU_WINDOW,
    ),
    Mutant(
        "npu-window-mode",
        "NPU: a windowed call runs the band (sparse_mode=4), not right-down causal (3)",
        "ringattn/kernels/npu.py",
        '"sparse_mode": 4, "pre_tockens"',
        '"sparse_mode": 3, "pre_tockens"',
        _NPU_WINDOW,
    ),
    Mutant(
        "cuda-window-swap",
        "CUDA: the window pair reaches flash_attn as (left, right) (forward)",
        "ringattn/kernels/cuda.py",
        "    left, right = window if window is not None else (-1, -1)\n    common = (q, k, v,",
        "    right, left = window if window is not None else (-1, -1)\n    common = (q, k, v,",
        _CUDA_WINDOW,
    ),
    Mutant(
        "cuda-window-swap-backward",
        "CUDA: the window pair reaches flash_attn as (left, right) (backward)",
        "ringattn/kernels/cuda.py",
        "    left, right = window if window is not None else (-1, -1)\n    common = (dout,",
        "    right, left = window if window is not None else (-1, -1)\n    common = (dout,",
        _CUDA_WINDOW,
    ),
    Mutant(
        "cuda-window-swap-aten",
        "CUDA: the window pair reaches aten as window_size_left / window_size_right",
        "ringattn/kernels/cuda.py",
        '{"window_size_left": window[0], "window_size_right": window[1]}',
        '{"window_size_left": window[1], "window_size_right": window[0]}',
        _CUDA_WINDOW,
    ),
    Mutant(
        "cuda-window-max-k",
        "CUDA: windowed calls pass max_seqlen_k >= every query segment (flash_api.cpp's "
        "clamps then keep the documented window)",
        "ringattn/kernels/cuda.py",
        "    return call.max_k if call.window is None else max(call.max_k, call.max_q)",
        "    return call.max_k",
        ("tests/test_window_cuda.py::test_cuda_windows_and_sinks_through_the_standins[2]",),
    ),
    Mutant(
        "npu-segment-limit",
        "NPU: calls split at the operator's 1,024 segments",
        "ringattn/kernels/npu.py",
        "MAX_SEGMENTS = 1024",
        "MAX_SEGMENTS = 2048",
        ("tests/test_backends.py::test_npu_step_with_more_than_1024_segments_is_split_and_exact",),
    ),
)


#: issue 23's findings and the mutants that show each one caught now (docs/mutants.md)
FINDINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Agreement: dropping comm or the K/V heads from the signature passed every test",
        ("agreement-comm", "agreement-kv-heads", "agreement-window"),
    ),
    ("bf16: accumulating dq in bf16 passed every test", ("dq-dtype",)),
    ("bf16: saving the bf16 output for backward passed every test", ("saved-out-dtype",)),
    (
        "bf16: rounding the NPU fused merge to bf16 every step passed every test",
        ("npu-fused-fp32", "npu-fused-fp32-bound"),
    ),
    (
        "bf16: dK/dV returned in bf16 was caught by one hybrid case at 2.12e-2 against a 2e-2 bound",
        ("dkv-return-precision", "dkv-owner-precision", "replicated-dkv-dtype"),
    ),
    (
        "CUDA: removing the head-dim padding (forward or backward) passed every CPU test; the stand-in checked nothing",
        ("pad-forward", "pad-backward", "cuda-lse-layout", "cuda-cu-int32"),
    ),
    (
        "NPU: the fallback from the fused merge was silent, a later rejection raised",
        ("npu-fallback-visible", "npu-fallback-later"),
    ),
)


def repository_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def copy_repository(dest: Path, files: list[str], src: Path = ROOT) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, target)


def apply(m: Mutant, dest: Path) -> None:
    path = dest / m.file
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        raise LookupError(
            f"{m.name}: the original text occurs {count} times in {m.file} (expected once): {m.original!r}"
        )
    path.write_text(text.replace(m.original, m.replacement))


def run_tests(dest: Path, tests, timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][7:] if line.startswith("FAILED ") else line[6:]
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only the mutants whose name contains this text")
    ap.add_argument("--strict", action="store_true", help="pending mutants that survive fail the run too")
    ap.add_argument("--doc", help="rewrite this markdown file with the list and the kill table")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if args.k in m.name]
    files = repository_files()
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    problems = []

    with tempfile.TemporaryDirectory(prefix="ringattn-mutants-") as tmp:
        snapshot = Path(tmp) / "snapshot"  # the working tree as it was at the start, whatever happens to it later
        copy_repository(snapshot, files)
        base = Path(tmp) / "baseline"
        copy_repository(base, files, src=snapshot)
        for m in mutants:  # every original text exactly once, before spending time on tests
            try:
                _check_text(m, base)
            except LookupError as exc:
                problems.append(str(exc))
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
        union = sorted({t for m in mutants for t in m.tests})
        code, out, secs = run_tests(base, union, args.timeout)
        where = subprocess.run(
            [sys.executable, "-c", "import ringattn; print(ringattn.__file__)"],
            cwd=base,
            env={**os.environ, "PYTHONPATH": str(base)},
            capture_output=True,
            text=True,
        ).stdout
        if code != 0 or not where.strip().startswith(str(base)):
            print(
                f"baseline: the targeted tests must pass on the unmutated copy (exit {code}, ringattn from "
                f"{where.strip()}):\n{out[-3000:]}",
                file=sys.stderr,
            )
            return 3
        print(f"baseline: {len(union)} targeted test selections pass unmutated ({secs:.0f} s)", file=sys.stderr)
        rows = []
        for m in mutants:
            dest = Path(tmp) / m.name
            copy_repository(dest, files, src=snapshot)
            apply(m, dest)
            code, out, secs = run_tests(dest, m.tests, args.timeout)
            shutil.rmtree(dest, ignore_errors=True)
            if code == 1:
                verdict, by = "killed", first_failure(out)
            elif code == 0:
                verdict, by = ("survived (pending)" if m.pending else "SURVIVED"), ""
            else:
                verdict, by = f"ERROR (pytest exit {code})", out.strip().splitlines()[-1] if out.strip() else ""
            rows.append((m, verdict, by, secs))
            print(f"{m.name:24} {verdict:20} {secs:5.0f} s  {by}", file=sys.stderr, flush=True)

    _LAST_VERDICTS.update({m: verdict for m, verdict, _, _ in rows})
    table = kill_table(rows)
    print(table)
    if args.doc:
        write_doc(Path(args.doc), table, revision + (" + uncommitted changes" if dirty else ""))
    bad = [
        m.name
        for m, verdict, _, _ in rows
        if verdict.startswith(("SURVIVED", "ERROR")) or (args.strict and verdict == "survived (pending)")
    ]
    pending = [m.name for m, verdict, _, _ in rows if verdict == "survived (pending)"]
    if pending:
        print(f"pending (survive until their tests are merged): {', '.join(pending)}", file=sys.stderr)
    if bad:
        print(f"not killed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _check_text(m: Mutant, base: Path) -> None:
    count = (base / m.file).read_text().count(m.original)
    if count != 1:
        raise LookupError(
            f"{m.name}: the original text occurs {count} times in {m.file} (expected once): {m.original!r}"
        )


def kill_table(rows) -> str:
    lines = ["| mutant | promise | file | verdict | first failing test | s |", "|---|---|---|---|---|---:|"]
    for m, verdict, by, secs in rows:
        note = f" — {m.pending}" if m.pending and verdict != "killed" else ""
        lines.append(
            f"| `{m.name}` | {m.promise} | `{m.file}` | {verdict}{note} | `{by}` | {secs:.0f} |"
            if by
            else f"| `{m.name}` | {m.promise} | `{m.file}` | {verdict}{note} | | {secs:.0f} |"
        )
    return "\n".join(lines)


def write_doc(path: Path, table: str, revision: str) -> None:
    def code(text: str) -> str:
        return "<br>".join(f"`{line.strip()}`" for line in text.splitlines())

    listing = ["| mutant | file | original | replacement | targeted tests |", "|---|---|---|---|---|"]
    for m in MUTANTS:
        tests = "<br>".join(f"`{t}`" for t in m.tests)
        listing.append(f"| `{m.name}` | `{m.file}` | {code(m.original)} | {code(m.replacement)} | {tests} |")
    verdicts = {m.name: v for m, v in _LAST_VERDICTS.items()}
    findings = ["| finding of issue 23 | mutant(s) now | verdict |", "|---|---|---|"]
    for text, names in FINDINGS:
        findings.append(
            f"| {text} | {', '.join(f'`{n}`' for n in names)} | "
            f"{'; '.join(verdicts.get(n, 'not run') for n in names)} |"
        )
    today = datetime.date.today().isoformat()
    path.write_text(f"""# Mutants: one-line changes the tests must catch

`make mutants` (`python tests/mutants.py`) applies each mutant below to a temporary copy of the repository (found
by its exact original text, which must occur once in its file, not by line number), runs its targeted tests there
and reports whether one failed. The list lives in `tests/mutants.py` (`MUTANTS`), one mutant per promise of the
library; the targeted tests must first pass on the unmutated copy. A mutant marked *pending* names the tests that
will kill it once merged; it does not fail the run (`--strict` makes it). Regenerate this file with
`python tests/mutants.py --doc docs/mutants.md`.

## Kill table

Revision {revision}, {today}, this 2-core CPU machine (seconds are wall time of the targeted tests, for scale):

{table}

## Issue 23's findings

{chr(10).join(findings)}

The fuzz's breadth (also issue 23) is no mutant: `python -m tests.fuzz_breadth` counts what a profile draws.

## The mutants

{chr(10).join(listing)}
""")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# One-call GPU check for an NVIDIA machine whose Python already has torch (no package index needed):
#   1. the GPU tests (tests/test_backends.py -k cuda: CP 2-4 processes on one GPU over gloo with host staging,
#      fp32/bf16/fp16, against the float64 reference);
#   2. benchmarks/kernels.py at a realistic size: bf16, Hq=32, Hkv=8, D=128, the standard workloads rescaled to
#      32K tokens per sample, CP 8, zigzag and balanced;
#   3. benchmarks/overhead.py with the real CUDA kernel: host time per call beside kernel time, op counts, and
#      torch.cuda.set_sync_debug_mode("error") around a warm CP=1 call;
#   4. benchmarks/peers.py: ringattn beside torch's own context parallelism (flex attention compiled, with a
#      document mask and each load balancer; the SDPA ring), forward+backward, exactness against float64, time
#      ratios, KV received, setup: CP 2, 3 and 4 as processes sharing GPU 0 over gloo (as the GPU tests run),
#      bf16, Hq=16, Hkv=4, D=128, three workloads at 12288 tokens per sample (a multiple of 128*CP for each CP);
#      one torchrun per CP, so a peer that fails or hangs costs only its part;
#   5. everything into $GPU_REPORT_DIR (default ./gpu_report/), one file per part plus summary.txt.
# Runs from the source tree (PYTHONPATH), installs nothing, each part under its own time limit (14 minutes in all).
# Without a GPU it runs the CPU-reachable parts at small sizes (the GPU tests then report as skipped).
# Usage: bash benchmarks/gpu_check.sh   (or: make gpu-check; PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_REPORT_DIR:-./gpu_report}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }
part() {  # part NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  cat "$OUT/$name.txt"
  note "part $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)"
  return 0
}

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt" | tee -a "$summary"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, cuda {torch.version.cuda}")
try:
    import flash_attn
    print(f"flash_attn {flash_attn.__version__}")
except Exception as exc:  # noqa: BLE001 - report why
    print(f"flash_attn not used ({type(exc).__name__}); kernels: torch's aten flash attention")
PYEOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  part 1_gpu_tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_backends.py -k cuda -rs
  part 2_kernels 120 "$PY" benchmarks/kernels.py --device cuda --cp 8 --strategy zigzag,balanced --sample-len 32768 \
    --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --repeat 3
  part 3_overhead 150 "$PY" benchmarks/overhead.py --device cuda --backend cuda --cp 1,4 --docs 10,100,1000 \
    --sample-len 32768 --repeat 3
  for cp in 2 3 4; do
    part "4_peers_cp$cp" 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$cp" benchmarks/peers.py \
      --device cuda --dtype bfloat16 --heads 16 --kv-heads 4 --head-dim 128 --sample-len 12288 \
      --workloads pretrain_mix_128k,one_doc_128k,short_docs_128k --rounds 5
  done
else
  note "no CUDA device: running the CPU-reachable parts at small sizes"
  part 1_gpu_tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_backends.py -k cuda -rs
  part 2_kernels 120 "$PY" benchmarks/kernels.py --device cpu --cp 8 --strategy zigzag,balanced --sample-len 2048 \
    --workloads pretrain_mix_128k,short_docs_128k --heads 4 --kv-heads 2 --head-dim 64 --dtype bfloat16 --repeat 1
  part 3_overhead 150 "$PY" benchmarks/overhead.py --device cpu --backend null --cp 1,4 --docs 10,100,1000 \
    --sample-len 32768 --repeat 3
  part 4_peers_cp2 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/peers.py \
    --device cpu --sample-len 512 --workloads pretrain_mix_128k,one_doc_128k --no-flex-compile --rounds 1
fi
note "report: $OUT"

#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (torch with CUDA, triton, nvcc; no network needed) it
#   1. builds the extension for this GPU's architecture,
#   2. runs the GPU-marked tests (every op and backend against the float64 reference, bf16 included),
#   3. benchmarks forward TFLOP/s of our kernels against torch SDPA (cuDNN, flash, efficient), the fused
#      ring step's cost, the merge kernels' GB/s against a plain torch merge and the device copy, and the
#      Ulysses pack/unpack ops,
#   4. prints a short summary table last and writes JSON (benchmarks/results/ unless --out-dir).
# --dry-run does everything but the GPU parts on the CPU (quick benchmark modes, a test subset), so the
# script itself stays tested where no GPU is at hand.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out-dir DIR] [--python PY]
set -uo pipefail

DRY=0
OUT_DIR=""
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out-dir) OUT_DIR="$2"; shift ;;
    --out-dir=*) OUT_DIR="${1#*=}" ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$OUT_DIR/gpu_check-$STAMP.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STATUS=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
run() {  # run CMD...: logs it, keeps going on failure, remembers that something failed
  echo "+ $*" >>"$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "FAILED (exit $rc): $*" | tee -a "$LOG"; STATUS=1; fi
  return "$rc"
}

step "environment"
run "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory // 2**20, "MiB")
else:
    print("gpu: none")
EOF
if [ "$DRY" -eq 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv \
    | tee -a "$LOG"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; use --dry-run on machines without one" | tee -a "$LOG"
    exit 1
  fi
fi

step "build"
if [ "$DRY" -eq 0 ]; then
  ARCH="$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M >= 9 else ''))")"
  echo "building for compute capability $ARCH" | tee -a "$LOG"
  CP_ATTENTION_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" run "$PY" setup.py build_ext --inplace -q \
    || { echo "build failed: see $LOG"; exit 1; }
else
  # The CPU parts of the build that CI already checks; reuse an existing build when there is one.
  "$PY" -c "import cp_attention" 2>/dev/null \
    || CP_ATTENTION_SKIP_CUDA=1 run "$PY" setup.py build_ext --inplace -q || exit 1
fi
run "$PY" -c "import cp_attention, json; print(json.dumps(cp_attention.build_info()))"

step "tests"
JUNIT="$OUT_DIR/gpu_check-tests-$STAMP.xml"
if [ "$DRY" -eq 0 ]; then
  run "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$JUNIT" tests/
else
  # What the GPU run selects, and a small CPU sample of the same tests.
  run "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests/ | tail -n 3
  run "$PY" -m pytest -q -p no:cacheprovider --junitxml="$JUNIT" tests/test_flash_attn.py tests/test_chunking.py \
    -k "test_head_dims or (fused and 1chunks)" --maxfail=5
fi

step "benchmarks"
if [ "$DRY" -eq 0 ]; then
  DEV=(--device cuda)
  QUICK=(--budget 0.3)
else
  DEV=(--device cpu)
  QUICK=(--quick)
fi
run "$PY" benchmarks/bench_flash_fwd.py "${DEV[@]}" "${QUICK[@]}" --out-dir "$OUT_DIR"
run "$PY" benchmarks/bench_merge.py "${DEV[@]}" "${QUICK[@]}" --out-dir "$OUT_DIR"
run "$PY" benchmarks/bench_a2a_pack.py "${DEV[@]}" "${QUICK[@]}" --dtypes bfloat16 --out-dir "$OUT_DIR"

step "summary"
run "$PY" benchmarks/gpu_check_summary.py --out-dir "$OUT_DIR" --since "$STAMP" --junit "$JUNIT" \
  --log "$LOG" $([ "$DRY" -eq 1 ] && echo --dry-run)
if [ "$STATUS" -eq 0 ]; then echo "gpu_check: PASS"; else echo "gpu_check: FAIL (see $LOG)"; fi
exit "$STATUS"

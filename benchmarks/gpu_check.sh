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
#
# Every step has a time limit (seconds; GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S) so one slow
# or hung step still leaves the others' results; the tests stop with SIGINT, which pytest answers with its
# summary and the JUnit file of what ran.
set -uo pipefail
BUILD_S="${GPU_CHECK_BUILD_S:-240}"
TESTS_S="${GPU_CHECK_TESTS_S:-300}"
BENCH_S="${GPU_CHECK_BENCH_S:-180}"

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
  CP_ATTENTION_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" run timeout "$BUILD_S" "$PY" setup.py build_ext --inplace -q \
    || { echo "build failed: see $LOG"; exit 1; }
else
  # The CPU parts of the build that CI already checks; reuse an existing build when there is one.
  "$PY" -c "import cp_attention" 2>/dev/null \
    || CP_ATTENTION_SKIP_CUDA=1 run "$PY" setup.py build_ext --inplace -q || exit 1
fi
run "$PY" -c "import cp_attention, json; print(json.dumps(cp_attention.build_info()))"
{ echo "host compilers: CC=${CC:-unset} CXX=${CXX:-unset}; $(c++ --version 2>/dev/null | head -n 1)";
  command -v nvcc >/dev/null && nvcc --version | tail -n 1; } | tee -a "$LOG"

step "error paths"
# A rejected argument must raise, on every device, in a process of its own so that a crash shows as one.
for dev in cpu $([ "$DRY" -eq 0 ] && echo cuda); do
  run "$PY" -X faulthandler "$ROOT/benchmarks/error_paths.py" "$dev"
done

step "tests"
# The GPU tests run as concurrent shards, one pytest process each with an equal share of the CPU threads:
# compiling Triton variants and the float64 references are CPU-bound, so shards finish several times sooner
# than one process on a many-core host. Each shard writes its own JUnit report and log; the ends of the logs
# are appended to the main log once all have ended, and the whole logs travel in one archive.
SHARD_NAMES=()
SHARD_PIDS=()
if [ "$DRY" -eq 0 ]; then N_SHARDS=9; else N_SHARDS=1; fi
SHARD_THREADS=$(( ($(nproc) + N_SHARDS - 1) / N_SHARDS ))
shard() {  # shard NAME PYTEST_ARGS...: starts one pytest process in the background
  local name="$1"; shift
  local junit="$OUT_DIR/gpu_check-tests-$STAMP-$name.xml"
  ( OMP_NUM_THREADS="$SHARD_THREADS" timeout -s INT -k 30 "$TESTS_S" "$PY" -m pytest -q -rfE \
      -p no:cacheprovider --junitxml="$junit" "$@" >"$OUT_DIR/gpu_check-tests-$STAMP-$name.log" 2>&1 ) &
  SHARD_NAMES+=("$name")
  SHARD_PIDS+=("$!")
}
if [ "$DRY" -eq 0 ]; then
  OURS="cuda-cuda or cuda-triton"
  # This shard once died of a SIGSEGV and took its report with it. Under pytest-xdist (one worker) a crash
  # fails only the test that crashed: the controller writes the report and starts a new worker.
  CRASH_SAFE=()
  "$PY" -c "import xdist" 2>/dev/null && CRASH_SAFE=(-p xdist -n 1)
  shard cuda_ops -m gpu "${CRASH_SAFE[@]}" tests/test_cuda_ops.py
  shard flash_cuda -m gpu tests/test_flash_attn.py -k "cuda-cuda"
  shard flash_triton -m gpu tests/test_flash_attn.py -k "cuda-triton"
  shard flash_torch -m gpu tests/test_flash_attn.py -k "not ($OURS)"
  shard chunking_cuda -m gpu tests/test_chunking.py -k "cuda-cuda"
  shard chunking_triton -m gpu tests/test_chunking.py -k "cuda-triton"
  shard chunking_torch -m gpu tests/test_chunking.py -k "not ($OURS)"
  # test_triton.py compiles a Triton variant for most of its cases (the TMA ones too): a shard of its own.
  shard triton -m gpu tests/test_triton.py
  shard merge_contract -m gpu tests/test_merge.py tests/test_ops_contract.py
else
  # What the GPU run selects, and a small CPU sample of the same tests.
  run "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests/ | tail -n 3
  shard cpu_sample tests/test_flash_attn.py tests/test_chunking.py -k "test_head_dims or (fused and 1chunks)" \
    --maxfail=5
fi
JUNIT_ARGS=()
for i in "${!SHARD_PIDS[@]}"; do
  name="${SHARD_NAMES[$i]}"
  wait "${SHARD_PIDS[$i]}"
  rc=$?
  echo "--- shard $name (exit $rc)" | tee -a "$LOG"
  tail -n 40 "$OUT_DIR/gpu_check-tests-$STAMP-$name.log" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then
    STATUS=1
    case "$rc" in
      1) ;;  # failures, listed above
      2|124|137) echo "shard $name stopped at its ${TESTS_S}s limit" | tee -a "$LOG" ;;
      *) [ "$rc" -gt 128 ] && echo "shard $name CRASHED (signal $((rc - 128)))" | tee -a "$LOG" ;;
    esac
  fi
  JUNIT_ARGS+=(--junit "$name=$OUT_DIR/gpu_check-tests-$STAMP-$name.xml:$rc")
done

step "benchmarks"
if [ "$DRY" -eq 0 ]; then
  DEV=(--device cuda)
  QUICK=(--budget 0.3)
else
  DEV=(--device cpu)
  QUICK=(--quick)
fi
run timeout -k 10 "$BENCH_S" "$PY" benchmarks/bench_flash_fwd.py "${DEV[@]}" "${QUICK[@]}" --out-dir "$OUT_DIR"
run timeout -k 10 "$BENCH_S" "$PY" benchmarks/bench_merge.py "${DEV[@]}" "${QUICK[@]}" --out-dir "$OUT_DIR"
run timeout -k 10 "$BENCH_S" "$PY" benchmarks/bench_a2a_pack.py "${DEV[@]}" "${QUICK[@]}" --dtypes bfloat16 --out-dir "$OUT_DIR"

step "summary"
run "$PY" benchmarks/gpu_check_summary.py --out-dir "$OUT_DIR" --since "$STAMP" "${JUNIT_ARGS[@]}" \
  --log "$LOG" $([ "$DRY" -eq 1 ] && echo --dry-run)
# The shards' whole logs and reports as one archive: fewer files to carry off a machine.
SHARD_FILES=()
for name in "${SHARD_NAMES[@]}"; do
  for ext in log xml; do
    f="gpu_check-tests-$STAMP-$name.$ext"
    [ -f "$OUT_DIR/$f" ] && SHARD_FILES+=("$f")
  done
done
if [ "${#SHARD_FILES[@]}" -gt 0 ] && tar -czf "$OUT_DIR/gpu_check-tests-$STAMP.tar.gz" -C "$OUT_DIR" "${SHARD_FILES[@]}"; then
  (cd "$OUT_DIR" && rm -f "${SHARD_FILES[@]}")
  echo "test logs and reports: $OUT_DIR/gpu_check-tests-$STAMP.tar.gz" | tee -a "$LOG"
fi
if [ "$STATUS" -eq 0 ]; then echo "gpu_check: PASS"; else echo "gpu_check: FAIL (see $LOG)"; fi

exit "$STATUS"

#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (torch with CUDA, triton, nvcc and the pytest-timeout of
# requirements-dev.txt; no network needed) it
#   1. builds the extension for this GPU's architecture,
#   2. checks that rejected arguments raise on the CPU and on the GPU (benchmarks/error_paths.py),
#   3. probes every forward kernel variant of cp_attention/kernel_variants.py once, each in a process of its
#      own under a time limit (benchmarks/kernel_probe.py): one that hangs, faults or computes wrong values
#      fails the check, and the benchmarks leave out whatever would run it,
#   4. runs the GPU-marked tests (every op and backend against the float64 reference, bf16 included) as
#      concurrent pytest shards; test_cuda_ops.py::test_a2a_errors_match_cpu, which once crashed its
#      process (docs/gpu_check.md), runs in a shard of its own,
#   5. benchmarks forward TFLOP/s of our kernels against torch SDPA (cuDNN, flash, efficient), the fused
#      ring step's cost, the merge kernels' GB/s against a plain torch merge and the device copy, and the
#      Ulysses pack/unpack ops,
#   6. prints a short summary table last and writes JSON (benchmarks/results/ unless --out-dir).
# --dry-run does everything but the GPU parts on the CPU (the probe of the CPU op, quick benchmark modes, a
# test subset), so the script itself stays tested where no GPU is at hand.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out-dir DIR] [--python PY]
#
# Each step has a time limit of its own, in seconds: GPU_CHECK_BUILD_S (240) the build, 60 the error
# paths of each device, GPU_CHECK_PROBE_S (90) each probed variant (the probe as a whole 60 more),
# GPU_CHECK_SHARD_S (300) each test shard and GPU_CHECK_TEST_S (120) each test in it (pytest-timeout),
# GPU_CHECK_BENCH_S (120) each benchmark script. A step stopped at its limit fails the check and the steps
# after it still run: a test shard stopped by SIGINT writes its summary and the JUnit report of what ran,
# a benchmark stopped by SIGTERM the rows it measured, marked partial.
set -uo pipefail
BUILD_S="${GPU_CHECK_BUILD_S:-240}"
PROBE_S="${GPU_CHECK_PROBE_S:-90}"
SHARD_S="${GPU_CHECK_SHARD_S:-300}"
TEST_S="${GPU_CHECK_TEST_S:-120}"
BENCH_S="${GPU_CHECK_BENCH_S:-120}"
ERRORS_S=60

DRY=0
OUT_DIR=""
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out-dir) OUT_DIR="$2"; shift ;;
    --out-dir=*) OUT_DIR="${1#*=}" ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;  # the comment block above
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

for knob in BUILD_S PROBE_S SHARD_S TEST_S BENCH_S; do
  if ! [[ "${!knob}" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_$knob must be a whole number of seconds (at least 1), got '${!knob}'" >&2
    exit 2
  fi
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
run_to() {  # run_to FILE CMD...: logs CMD and its output, a copy of the output to FILE too; keeps going on
  local copy="$1"; shift  # failure, remembering that something failed
  echo "+ $*" >>"$LOG"
  "$@" 2>&1 | tee -a "$LOG" "$copy"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "FAILED (exit $rc): $*" | tee -a "$LOG"; STATUS=1; fi
  return "$rc"
}
run() { run_to /dev/null "$@"; }  # run CMD...: the same without the copy

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
  run timeout -k 10 "$ERRORS_S" "$PY" -X faulthandler "$ROOT/benchmarks/error_paths.py" "$dev"
done

step "kernel probe"
# Each forward kernel variant once, in a process of its own with a time limit, before the tests and the
# benchmarks meet it: one that hangs or faults (which poisons a process's whole CUDA context) costs one
# probe, not a test shard's report or the benchmarks. SKIP_BENCH lines name what bench_flash_fwd.py must
# not time because it would run a failed variant. The tests need no such guard: by default they run the
# proven variants (cp_attention/kernel_variants.py), and the others only where a test names them.
SKIP_BENCH=()
PROBE_OUT="$OUT_DIR/kernel_probe-$STAMP.out"
if [ "$DRY" -eq 0 ]; then PROBE_DEV=cuda; else PROBE_DEV=cpu; fi
run_to "$PROBE_OUT" timeout -k 10 $((PROBE_S + 60)) "$PY" benchmarks/kernel_probe.py --device "$PROBE_DEV" \
  --timeout "$PROBE_S" --out-dir "$OUT_DIR"
while read -r _ what reason; do
  SKIP_BENCH+=("$what")
  echo "benchmarks skip $what $reason" | tee -a "$LOG"
done < <(grep -E '^SKIP_BENCH [a-z0-9_]+ ' "$PROBE_OUT" 2>/dev/null)
rm -f "$PROBE_OUT"

step "tests"
# The GPU tests run as concurrent shards, one pytest process each with an equal share of the CPU threads:
# compiling Triton variants and the float64 references are CPU-bound, so shards finish several times sooner
# than one process on a many-core host. Each shard writes its own JUnit report and log; the ends of the logs
# are appended to the main log once all have ended, and the whole logs travel in one archive.
SHARD_NAMES=()
SHARD_PIDS=()
if [ "$DRY" -eq 0 ]; then N_SHARDS=11; else N_SHARDS=1; fi
SHARD_THREADS=$(( ($(nproc) + N_SHARDS - 1) / N_SHARDS ))
shard() {  # shard NAME PYTEST_ARGS...: starts one pytest process in the background
  local name="$1"; shift
  local junit="$OUT_DIR/gpu_check-tests-$STAMP-$name.xml"
  ( OMP_NUM_THREADS="$SHARD_THREADS" timeout -s INT -k 30 "$SHARD_S" "$PY" -m pytest -q -rfE \
      -p no:cacheprovider --timeout="$TEST_S" --junitxml="$junit" "$@" \
      >"$OUT_DIR/gpu_check-tests-$STAMP-$name.log" 2>&1 ) &
  SHARD_NAMES+=("$name")
  SHARD_PIDS+=("$!")
}
if [ "$DRY" -eq 0 ]; then
  OURS="cuda-cuda or cuda-triton"
  # test_a2a_errors_match_cpu died of a SIGSEGV on the H200 and took its shard's report with it; the cause
  # is open (docs/gpu_check.md), so it runs alone, where a crash costs no other test's result.
  A2A_ERRORS="tests/test_cuda_ops.py::test_a2a_errors_match_cpu"
  shard a2a_errors -m gpu "$A2A_ERRORS"
  shard cuda_ops -m gpu tests/test_cuda_ops.py --deselect "$A2A_ERRORS"
  shard flash_cuda -m gpu tests/test_flash_attn.py -k "cuda-cuda"
  shard flash_triton -m gpu tests/test_flash_attn.py -k "cuda-triton"
  shard flash_torch -m gpu tests/test_flash_attn.py -k "not ($OURS)"
  shard chunking_cuda -m gpu tests/test_chunking.py -k "cuda-cuda"
  shard chunking_triton -m gpu tests/test_chunking.py -k "cuda-triton"
  shard chunking_torch -m gpu tests/test_chunking.py -k "not ($OURS)"
  # test_triton.py compiles a Triton variant for most of its cases (the TMA ones too): a shard of its own.
  shard triton -m gpu tests/test_triton.py
  shard merge_contract -m gpu tests/test_merge.py tests/test_ops_contract.py
  # Training on the GPU: "auto" through torch's kernels and autograd (out), and the lse-gradient refusal.
  shard backward -m gpu tests/test_flash_attn_bwd.py
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
      2|124|137) echo "shard $name stopped at its ${SHARD_S}s limit" | tee -a "$LOG" ;;
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
SKIP=()
if [ "${#SKIP_BENCH[@]}" -gt 0 ]; then SKIP=(--skip-backends "$(IFS=,; echo "${SKIP_BENCH[*]}")"); fi
bench() {  # bench NAME ARGS...: one benchmark script, stopped by SIGTERM at its limit (it then writes what
  local name="$1"; shift  # it measured)
  run timeout -k 10 "$BENCH_S" "$PY" "benchmarks/$name.py" "${DEV[@]}" "${QUICK[@]}" "$@" --out-dir "$OUT_DIR"
}
bench bench_flash_fwd "${SKIP[@]}"
bench bench_merge
bench bench_a2a_pack --dtypes bfloat16

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

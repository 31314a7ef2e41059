#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (torch with CUDA, triton, nvcc; no network needed) it
#   1. builds the extension for this GPU's architecture,
#   2. probes every forward kernel variant (the CUDA op's mma, sm90 and sm90_tma kernels, the Triton
#      forward's pointer and TMA tiles and its autotuner) once, each in a process of its own under a time
#      limit (benchmarks/kernel_probe.py): one that hangs, faults or computes wrong values fails the check,
#      and the steps after it are pinned to a kernel that passed, except the test shards that force each
#      kernel themselves (cuda_ops, triton), which still show the failure,
#   3. runs the GPU-marked tests (every op and backend against the float64 reference, bf16 included),
#   4. benchmarks forward TFLOP/s of our kernels against torch SDPA (cuDNN, flash, efficient), the fused
#      ring step's cost, the merge kernels' GB/s against a plain torch merge and the device copy, and the
#      Ulysses pack/unpack ops,
#   5. prints a short summary table last and writes JSON (benchmarks/results/ unless --out-dir).
# --dry-run does everything but the GPU parts on the CPU (the probe of the CPU op, quick benchmark modes, a
# test subset), so the script itself stays tested where no GPU is at hand.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out-dir DIR] [--python PY]
#
# Every step has a time limit (seconds; GPU_CHECK_BUILD_S, GPU_CHECK_PROBE_S per probed variant,
# GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S per benchmark script) so one slow or hung step still leaves the others'
# results; the tests stop with SIGINT, which pytest answers with its summary and the JUnit file of what ran,
# and a benchmark stopped by SIGTERM writes the rows it measured, marked partial. The whole check has a
# budget too, GPU_CHECK_TOTAL_S (default 480 on a GPU, the 8 minutes it is meant to take; none for --dry-run
# unless given; 0 = none): each step's limit is cut to what is left of it once the steps after it have
# kept their share (60 s for the kernel probe, GPU_CHECK_BENCH_KEEP_S, default 150, for the benchmarks, 20 s
# for the summary), and a step left with under 10 s is skipped, which fails the check. So a slow build or
# test run still leaves the probe (which guards the benchmarks against a kernel that hangs), the
# benchmarks and the summary their time.
set -uo pipefail
BUILD_S="${GPU_CHECK_BUILD_S:-240}"
PROBE_S="${GPU_CHECK_PROBE_S:-90}"
TESTS_S="${GPU_CHECK_TESTS_S:-300}"
BENCH_S="${GPU_CHECK_BENCH_S:-180}"
BENCH_KEEP_S="${GPU_CHECK_BENCH_KEEP_S:-150}"
SUMMARY_KEEP_S=20
PROBE_KEEP_S=60
MIN_STEP_S=10

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

if [ "$DRY" -eq 0 ]; then TOTAL_S="${GPU_CHECK_TOTAL_S:-480}"; else TOTAL_S="${GPU_CHECK_TOTAL_S:-0}"; fi
for knob in BUILD_S PROBE_S TESTS_S BENCH_S BENCH_KEEP_S TOTAL_S; do
  if ! [[ "${!knob}" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_$knob must be a whole number of seconds, got '${!knob}'" >&2; exit 2
  fi
done
T0="$(date +%s)"

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
# within LIMIT KEEP: the time limit of a step whose own limit is LIMIT seconds, cut to what is left of
# GPU_CHECK_TOTAL_S once KEEP seconds are kept for the steps after it; 0 when under MIN_STEP_S would be left.
within() {
  local limit="$1"
  if [ "$TOTAL_S" -gt 0 ]; then
    local left=$(( T0 + TOTAL_S - $(date +%s) - $2 ))
    [ "$left" -lt "$limit" ] && limit="$left"
  fi
  if [ "$limit" -lt "$MIN_STEP_S" ]; then echo 0; else echo "$limit"; fi
}
out_of_time() {  # out_of_time WHAT: a step skipped for want of time, which fails the check
  echo "skipped $1: under ${MIN_STEP_S}s left of GPU_CHECK_TOTAL_S=${TOTAL_S}s" | tee -a "$LOG"
  STATUS=1
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
  # Nothing runs without the extension: the build may use all but the shares of the probe, the benchmarks
  # and the summary.
  LIMIT="$(within "$BUILD_S" $((PROBE_KEEP_S + BENCH_KEEP_S + SUMMARY_KEEP_S)))"
  [ "$LIMIT" -gt 0 ] || { out_of_time build; exit 1; }
  CP_ATTENTION_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" run timeout "$LIMIT" "$PY" setup.py build_ext --inplace -q \
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
  LIMIT="$(within 60 $((PROBE_KEEP_S + BENCH_KEEP_S + SUMMARY_KEEP_S)))"
  if [ "$LIMIT" -gt 0 ]; then
    run timeout -k 10 "$LIMIT" "$PY" -X faulthandler "$ROOT/benchmarks/error_paths.py" "$dev"
  else
    out_of_time "error paths on $dev"
  fi
done

step "kernel probe"
# Each forward kernel variant once, in a process of its own with a time limit, before the tests and the
# benchmarks meet it: one that hangs or faults (which poisons a process's whole CUDA context) costs one
# probe, not a test shard's report or the benchmarks. For each failed default the probe names a choice that
# passed (PIN lines); the later steps run with it, except the cuda_ops and triton shards, which force every
# kernel themselves and so report the failure. SKIP_BENCH lines name benchmark variants that force a failed
# kernel whatever the pins say.
PIN_ENV=()
SKIP_BENCH=()
PROBE_OUT="$OUT_DIR/kernel_probe-$STAMP.out"
if [ "$DRY" -eq 0 ]; then PROBE_DEV=cuda; else PROBE_DEV=cpu; fi
# Each variant gets PROBE_S; the probe as a whole 60 s more (starting processes, reporting).
LIMIT="$(within $((PROBE_S + 60)) $((BENCH_KEEP_S + SUMMARY_KEEP_S)))"
if [ "$LIMIT" -gt 0 ]; then
  VARIANT_S=$(( LIMIT - 60 < PROBE_S ? LIMIT - 60 : PROBE_S ))
  [ "$VARIANT_S" -lt "$MIN_STEP_S" ] && VARIANT_S="$MIN_STEP_S"
  run_to "$PROBE_OUT" timeout -k 10 "$LIMIT" "$PY" benchmarks/kernel_probe.py --device "$PROBE_DEV" \
    --timeout "$VARIANT_S" --out-dir "$OUT_DIR"
else
  out_of_time "kernel probe"
fi
while read -r tag what reason; do
  case "$tag" in
    PIN)
      if [[ "$what" =~ ^CP_ATTENTION_[A-Z0-9_]+=[a-z0-9_]+$ ]]; then
        PIN_ENV+=("$what")
        echo "pinned $what $reason" | tee -a "$LOG"
      else
        echo "ignored a malformed probe line: $tag $what $reason" | tee -a "$LOG"
      fi ;;
    SKIP_BENCH)
      SKIP_BENCH+=("$what")
      echo "benchmarks skip $what $reason" | tee -a "$LOG" ;;
  esac
done < <(grep -E '^(PIN|SKIP_BENCH) ' "$PROBE_OUT" 2>/dev/null)
rm -f "$PROBE_OUT"
if [ "${#PIN_ENV[@]}" -gt 0 ]; then
  echo "pins for the tests (except the cuda_ops and triton shards) and the benchmarks: ${PIN_ENV[*]}" \
    | tee -a "$LOG"
fi

step "tests"
# The GPU tests run as concurrent shards, one pytest process each with an equal share of the CPU threads:
# compiling Triton variants and the float64 references are CPU-bound, so shards finish several times sooner
# than one process on a many-core host. Each shard writes its own JUnit report and log; the ends of the logs
# are appended to the main log once all have ended, and the whole logs travel in one archive.
SHARD_NAMES=()
SHARD_PIDS=()
if [ "$DRY" -eq 0 ]; then N_SHARDS=9; else N_SHARDS=1; fi
SHARD_THREADS=$(( ($(nproc) + N_SHARDS - 1) / N_SHARDS ))
# The shards stop at SIGINT, and are killed 30 s later if they have not ended: that margin is kept too.
TESTS_LIMIT="$(within "$TESTS_S" $((BENCH_KEEP_S + SUMMARY_KEEP_S + 30)))"
shard() {  # shard NAME PYTEST_ARGS...: starts one pytest process in the background, with the probe's pins
  local name="$1"; shift
  local junit="$OUT_DIR/gpu_check-tests-$STAMP-$name.xml"
  local pins=("${PIN_ENV[@]}")
  case "$name" in cuda_ops|triton) pins=() ;; esac  # they force each kernel: the failure must show there
  ( env "${pins[@]}" OMP_NUM_THREADS="$SHARD_THREADS" timeout -s INT -k 30 "$TESTS_LIMIT" "$PY" -m pytest -q \
      -rfE -p no:cacheprovider --junitxml="$junit" "$@" >"$OUT_DIR/gpu_check-tests-$STAMP-$name.log" 2>&1 ) &
  SHARD_NAMES+=("$name")
  SHARD_PIDS+=("$!")
}
if [ "$TESTS_LIMIT" -eq 0 ]; then
  out_of_time tests
elif [ "$DRY" -eq 0 ]; then
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
for kv in "${PIN_ENV[@]}"; do export "$kv"; done
SKIP=()
if [ "${#SKIP_BENCH[@]}" -gt 0 ]; then SKIP=(--skip-backends "$(IFS=,; echo "${SKIP_BENCH[*]}")"); fi
# bench NAME KEEP ARGS...: one benchmark script, stopped by SIGTERM at its limit (it then writes what it
# measured); of the benchmarks' share, the forward keeps a third for the two after it, the merge a sixth.
bench() {
  local name="$1" keep="$2"; shift 2
  local limit
  limit="$(within "$BENCH_S" $((keep + SUMMARY_KEEP_S)))"
  if [ "$limit" -gt 0 ]; then
    run timeout -k 10 "$limit" "$PY" "benchmarks/$name.py" "${DEV[@]}" "${QUICK[@]}" "$@" --out-dir "$OUT_DIR"
  else
    out_of_time "$name"
  fi
}
bench bench_flash_fwd $((BENCH_KEEP_S / 3)) "${SKIP[@]}"
bench bench_merge $((BENCH_KEEP_S / 6))
bench bench_a2a_pack 0 --dtypes bfloat16

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

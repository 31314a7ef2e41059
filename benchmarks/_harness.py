"""Shared benchmark helpers: timing, FLOP/byte counts, environment capture, JSON results, tables, CLI flags.

Every benchmark script imports this module from its own folder (``from _harness import ...``), so scripts
run as plain files: ``python benchmarks/bench_x.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_ms: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile of an ascending list (p in [0, 100])."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = (len(sorted_ms) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


# What the GPU sleeps for at the start of each round of time_interleaved (about 5 ms at 2 GHz): long enough
# for the host to queue the whole round behind it.
_ROUND_SLEEP_CYCLES = 10_000_000


_Call = tuple[str, Callable[[], object], Callable[[], contextlib.AbstractContextManager]]


def _cuda_round_ms(calls: list[_Call]) -> dict[str, float]:
    """One call of each function, back to back on the GPU, and each call's GPU time in ms.

    The GPU first sleeps while the host queues the whole round, so a call's start event fires when the
    previous call's work ends, not when the host gets to launch it: the events bracket the call's own GPU
    work, without the host's time to launch it (Python wrappers, argument checks, dispatch). That is what a
    kernel costs a caller that launches asynchronously, as inference does, and how kernel benchmarks are
    usually timed; `launch_overhead=True` in time_interleaved times each call with a sync instead."""
    torch.cuda._sleep(_ROUND_SLEEP_CYCLES)
    events = []
    for name, fn, ctx in calls:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with ctx():
            start.record()
            fn()
            end.record()
        events.append((name, start, end))
    torch.cuda.synchronize()
    return {name: start.elapsed_time(end) for name, start, end in events}


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        # Events read the GPU's own clock; waiting for each call keeps calls from overlapping, so every
        # sample is exactly one call.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(samples_ms: list[float]) -> dict:
    samples = sorted(samples_ms)
    return {
        "median": statistics.median(samples),
        "min": samples[0],
        "p20": _percentile(samples, 20),
        "p80": _percentile(samples, 80),
        "mean": statistics.fmean(samples),
        "iters": len(samples),
    }


def _warm_up(fn: Callable[[], object], device: torch.device, warmup: int, warmup_s: float) -> float:
    """Untimed calls: at least `warmup` and, for fast functions, until `warmup_s` seconds have passed,
    because a millisecond kernel needs more than one or two calls before the thread pool and caches
    settle. Returns the fastest warm-up call in ms (the speed estimate for picking iterations)."""
    warm_ms: list[float] = []
    while len(warm_ms) < max(warmup, 1) or (sum(warm_ms) < warmup_s * 1e3 and len(warm_ms) < 1000):
        warm_ms.append(_one_call_ms(fn, device))
    return min(warm_ms)


def _pick_iters(iters: int | None, est_ms: float, budget_s: float, min_iters: int, max_iters: int) -> int:
    if iters is not None:
        return max(iters, 1)
    return max(min_iters, min(max_iters, int(budget_s * 1e3 / max(est_ms, 1e-3))))


def time_fn(fn: Callable[[], object], *, warmup: int = 2, iters: int | None = None,
            device: torch.device | str = "cpu", budget_s: float = 1.0, min_iters: int = 3,
            max_iters: int = 200, warmup_s: float = 0.0) -> dict:
    """Times `fn()` and returns {"median", "min", "p20", "p80", "mean"} in ms plus "iters".

    Warm-up first (allocator, thread pool, oneDNN/cuBLAS plans, autotuning; see `_warm_up`). With
    `iters=None` the number of timed calls is picked from the warm-up speed so that they take about
    `budget_s` seconds, clamped to [min_iters, max_iters]: small shapes get many samples, big ones few.
    Each call is timed on its own (CUDA events on a GPU) so the spread is visible; the median is the
    number to report because it ignores the odd preempted or throttled call.
    """
    device = torch.device(device)
    _sync(device)
    est_ms = _warm_up(fn, device, warmup, warmup_s)
    n = _pick_iters(iters, est_ms, budget_s, min_iters, max_iters)
    return _stats([_one_call_ms(fn, device) for _ in range(n)])


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, iters: int | None = None,
                     device: torch.device | str = "cpu", budget_s: float = 1.0, min_iters: int = 3,
                     max_iters: int = 200, warmup_s: float = 0.0,
                     contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
                     launch_overhead: bool = False) -> dict[str, dict]:
    """`time_fn` for several functions that are to be compared, returning {name: stats}.

    The functions are called in turn (a, b, c, a, b, c, ...) rather than one after the other, so a slow
    spell of the machine (another process, a clock change) hits all of them alike and their ratios stay
    fair. All get the same number of timed calls: about len(fns) * budget_s seconds in total.
    `contexts[name]()` is entered around each call of that function but outside its timed region (for
    settings such as torch's SDPA backend choice, which must not be timed).

    On a GPU each round runs back to back behind a sleep (`_cuda_round_ms`), so the samples are GPU time
    without the host's launch overhead; with `launch_overhead=True` every call is timed on its own with a
    sync, host overhead included (on CPUs it always is).
    """
    device = torch.device(device)
    contexts = contexts or {}
    ctx = {name: contexts.get(name, contextlib.nullcontext) for name in fns}
    _sync(device)
    est = {}
    for name, fn in fns.items():
        with ctx[name]():
            est[name] = _warm_up(fn, device, warmup, warmup_s)
    n = _pick_iters(iters, sum(est.values()) / len(fns), budget_s, min_iters, max_iters)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        if device.type == "cuda" and not launch_overhead:
            for name, ms in _cuda_round_ms([(name, fn, ctx[name]) for name, fn in fns.items()]).items():
                samples[name].append(ms)
            continue
        for name, fn in fns.items():
            with ctx[name]():
                samples[name].append(_one_call_ms(fn, device))
    return {name: _stats(s) for name, s in samples.items()}


# ------------------------------------------------------------------------------------ work counts
def attn_visible_pairs(Sq: int, Sk: int, causal: bool = False) -> int:
    """Number of (query, key) pairs that attention computes for one (batch, head).

    Causal is bottom-right aligned (query i sees key j iff j <= i + Sk - Sq), so query i sees
    max(0, i + Sk - Sq + 1) keys; that never exceeds Sk, and the sum is an arithmetic series.
    """
    if not causal:
        return Sq * Sk
    a = Sk - Sq + 1              # keys seen by query 0 (<= 0 when Sq > Sk: it sees none)
    i0 = max(0, 1 - a)           # first query that sees at least one key
    count = Sq - i0
    if count <= 0 or Sk <= 0:
        return 0
    first, last = i0 + a, Sk     # keys seen by query i0 and by the last query
    return (first + last) * count // 2


def attn_fwd_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool = False) -> int:
    """FLOPs of an attention forward: two matmuls (QK^T and PV) of 2*D FLOPs per visible pair each,
    i.e. 4*B*H*Sq*Sk*D when nothing is masked. Softmax work is not counted (the usual convention)."""
    return 4 * B * H * D * attn_visible_pairs(Sq, Sk, causal)


def attn_fwd_bytes(B: int, H: int, Hkv: int, Sq: int, Sk: int, D: int, dtype: torch.dtype,
                   lse: bool = True) -> int:
    """Minimum memory traffic of an attention forward: read q, k, v once, write out (and a float32 LSE)."""
    elt = torch.empty((), dtype=dtype).element_size()
    moved = (2 * B * Sq * H * D + 2 * B * Sk * Hkv * D) * elt
    return moved + (4 * B * H * Sq if lse else 0)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by the given tensors' elements (for GB/s of ops that touch each element once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def gflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e6) if ms > 0 else float("nan")


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e6) if ms > 0 else float("nan")


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


# ------------------------------------------------------------------------------------- environment
def _cpuinfo(field: str) -> str | None:
    """The value of the first /proc/cpuinfo line for `field` ("model name", "flags", "cpu MHz"), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "cpu"


def _cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device | str = "cpu") -> str:
    """Filename-safe device name, e.g. 'amd-epyc' or 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "unknown"


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # absent or broken: a CPU-only install is still benchmarkable
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _build_info() -> dict | str | None:
    try:
        import cp_attention
        return dict(cp_attention.build_info())
    except Exception as exc:  # the baselines can still be recorded without our extension
        return f"unavailable: {type(exc).__name__}: {exc}"


def _cpu_mhz() -> float | None:
    try:
        return float(_cpuinfo("cpu MHz"))
    except (TypeError, ValueError):  # no such line, or not a number
        return None


# Per core and cycle, by the ISA copy of our CPU kernels that runs (cp_attention.build_info()["cpu_isa"]):
# float32 FLOPs of two FMA units at the vector width (a "generic" build still gets SSE2's 4 lanes), and for
# 16-bit types the AMX tile unit's 1024 multiply-adds where the "amx" copy runs.
_FP32_FLOPS_PER_CYCLE = {"generic": 2 * 2 * 4, "avx2": 2 * 2 * 8, "avx512": 2 * 2 * 16, "amx": 2 * 2 * 16}
# One AMX unit per core: a 16 x 16 x 32 tile product (2 x 8192 FLOPs) every 16 cycles.
_AMX_FLOPS_PER_CYCLE = 1024


def cpu_peak_gflops(threads: int | None = None) -> dict | None:
    """The CPU's peak GFLOP/s for the threads a benchmark uses: threads x FLOPs per cycle x clock, with the
    clock /proc/cpuinfo reports (the nominal one on most machines: turbo can exceed it). None where the
    clock or our build is unknown."""
    mhz = _cpu_mhz()
    info = _build_info()
    if mhz is None or not isinstance(info, dict) or info.get("cpu_isa") not in _FP32_FLOPS_PER_CYCLE:
        return None
    isa = info["cpu_isa"]
    threads = threads or torch.get_num_threads()
    fp32 = threads * _FP32_FLOPS_PER_CYCLE[isa] * mhz / 1e3
    bf16 = threads * _AMX_FLOPS_PER_CYCLE * mhz / 1e3 if isa == "amx" else fp32
    # float16 reaches the tiles only with AMX-FP16; elsewhere it computes in float32.
    fp16 = bf16 if isa == "amx" and "amx_fp16" in _cpu_flags() else fp32
    return {"float32": fp32, "bfloat16": bf16, "float16": fp16, "threads": threads, "mhz": mhz, "isa": isa,
            "formula": "threads x FLOPs/cycle (2 FMA units x lanes x 2, or AMX 1024) x clock"}


def environment(device: torch.device | str = "cpu") -> dict:
    """What a result depends on: hardware, threads, library versions, our build, source revision, time."""
    device = torch.device(device)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_peak_gflops": cpu_peak_gflops() if device.type == "cpu" else None,
        # Set by --cpu-isa: the run held this CPU to a narrower ISA, standing in for a CPU that has no more.
        "stand_in_cpu_isa": _stand_in_isa,
        # Other work on the machine (a compiler, a second benchmark) skews CPU timings badly.
        "busy_cpus_at_start": _busy_at_start,
        "versions": _versions(),
        "cuda_runtime": torch.version.cuda,
        "build_info": _build_info(),
        "git_commit": commit,
        # Uncommitted changes mean the commit alone does not identify the code that was measured.
        "git_dirty": None if status is None else bool(status),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }


def busy_cpus(window_s: float = 0.3) -> float | None:
    """CPUs kept busy by other processes right now, from /proc/stat over `window_s` seconds (this process
    sleeps meanwhile). None where /proc/stat is missing. Unlike the load average it has no memory of
    the last minutes, so a benchmark run just before does not count."""
    def snapshot():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle                                 # guest time is already in user

    try:
        total0, idle0 = snapshot()
        time.sleep(window_s)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


_busy_at_start: float | None = None


def warn_if_busy() -> float | None:
    """Prints a warning when other processes keep CPUs busy: a parallel kernel whose threads are
    preempted waits at every barrier, so its timings can come out several times too slow."""
    global _busy_at_start
    _busy_at_start = busy = busy_cpus()
    if busy is not None and busy > 0.3:
        print(f"warning: other processes keep {busy:.1f} of {os.cpu_count()} CPUs busy; "
              "timings may be inflated")
    return busy


# ------------------------------------------------------------------------------------- time limits
# The exit status of a benchmark cut short by SIGTERM: the one `timeout` reports for a command it stopped.
TIME_UP_EXIT = 124


class TimeUp(BaseException):
    """SIGTERM arrived while measure_rows was measuring. A BaseException, like KeyboardInterrupt, so that the
    `except Exception` of a benchmark recording one failed call does not swallow it."""


def _raise_time_up(signum, frame):
    raise TimeUp


def measure_rows(name: str, produce: Callable[[list], object]) -> tuple[list, bool]:
    """Runs produce(rows), which appends each result row as soon as it is measured, under inference mode.
    SIGTERM (what `timeout` sends when a step of gpu_check.sh reaches its limit) stops it between Python
    bytecodes instead of ending the process, so a benchmark cut short still prints and writes the rows it
    has. Returns (rows, cut short); a caller that was cut short marks its JSON partial and exits with
    TIME_UP_EXIT. The usual handler is back once this returns: a second SIGTERM ends the process."""
    rows: list = []
    previous = signal.signal(signal.SIGTERM, _raise_time_up)
    try:
        with torch.inference_mode():
            produce(rows)
    except TimeUp:
        print(f"{name}: stopped by SIGTERM (its time limit) with {len(rows)} rows measured; reporting those",
              flush=True)
        return rows, True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rows, False


# ------------------------------------------------------------------------------------------ output
def write_json(name: str, rows: list[dict], extra: dict | None = None, *, device: torch.device | str = "cpu",
               out_dir: str | Path | None = None, tmp: bool = False) -> Path:
    """Writes {"benchmark", "environment", **extra, "rows"} to <out_dir>/<name>-<device-slug>-<date>.json.

    `tmp=True` (smoke runs) writes `*.tmp.json`, which git ignores, so only full runs become results.
    """
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{name}-{device_slug(device)}-{stamp}{'.tmp' if tmp else ''}.json"
    extra = dict(extra or {})
    if isinstance(extra.get("args"), dict):
        # Where the file was written is a path of this machine, and the file's own location says it anyway.
        extra["args"] = {k: v for k, v in extra["args"].items() if k != "out_dir"}
    payload = {"benchmark": name, "environment": env, **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if spec else str(value)


def print_table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints rows as an aligned table. columns: (header, row key, format spec) each; missing values
    print as '-'. Text columns are left-aligned, numbers right-aligned."""
    cells = [[_fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows)
               for _, key, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    print(line([h for h, _, _ in columns]))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print(line(c))


# --------------------------------------------------------------------------------------------- CLI
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The short names of the tables and JSON rows.
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtypes(text: str) -> list[torch.dtype]:
    """Comma-separated dtype names (keys of DTYPES) -> torch dtypes."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}; expected some of {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def timing_from_args(args: argparse.Namespace, *, warmup: int, budget_s: tuple[float, float],
                     min_iters: tuple[int, int], warmup_s: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Keyword arguments for time_fn / time_interleaved from the shared flags; the (quick, full) pairs give
    the defaults of --quick and of full runs."""
    pick = 0 if args.quick else 1
    return {"warmup": args.warmup if args.warmup is not None else warmup, "warmup_s": warmup_s[pick],
            "iters": args.iters, "budget_s": args.budget if args.budget is not None else budget_s[pick],
            "min_iters": min_iters[pick], "launch_overhead": args.launch_overhead}


def make_parser(description: str) -> argparse.ArgumentParser:
    """ArgumentParser with the flags every benchmark shares; scripts add their own on top."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny subset for smoke tests (seconds, not minutes)")
    p.add_argument("--out-dir", default=None, help="where the JSON result goes (default: benchmarks/results)")
    p.add_argument("--no-json", action="store_true", help="print only, write no result file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per measurement (default: adaptive, see --budget)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per measurement when --iters is not given")
    p.add_argument("--launch-overhead", action="store_true",
                   help="on GPUs, time each call with a sync (host launch overhead included) instead of "
                        "GPU time of calls queued back to back")
    p.add_argument("--cpu-isa", choices=sorted(_STAND_IN), default=None,
                   help="time both sides as on a CPU whose widest ISA is this one: our kernels held to that "
                        "copy, torch's, oneDNN's and MKL's to theirs (no AMX, no AVX-512 for avx2). A "
                        "stand-in run on this CPU, recorded as such, not a measurement of such a CPU")
    return p


# --cpu-isa: the environment that holds torch's own kernels, oneDNN's (bf16 GEMMs, brgemm) and MKL's (fp32
# GEMMs) to an ISA, and what torch.backends.cpu.get_cpu_capability() then says.
_STAND_IN = {
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "AVX2"),
    "avx512": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                "MKL_ENABLE_INSTRUCTIONS": "AVX512"}, "AVX512"),
}
_stand_in_isa: str | None = None


def _hold_to_isa(isa: str) -> None:
    """Holds torch, oneDNN, MKL and our dispatch to `isa`. The libraries read their limits once, from the
    environment, so the script runs again under it (os.execv) unless it already is."""
    global _stand_in_isa
    want, aten_name = _STAND_IN[isa]
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.environ.update(want)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    got = torch.backends.cpu.get_cpu_capability()
    if got != aten_name:
        raise SystemExit(f"--cpu-isa {isa}: torch runs its {got} kernels here, expected {aten_name}")
    from cp_attention import _C

    _C._limit_cpu_isa(isa)
    _stand_in_isa = isa


def apply_common(args: argparse.Namespace) -> None:
    """Applies the shared flags that change process state (thread count) and warns about a busy machine."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if getattr(args, "cpu_isa", None):
        _hold_to_isa(args.cpu_isa)
    warn_if_busy()

"""First contact with the forward kernels: each variant runs in a process of its own, all at once, under a
time limit, so that one that hangs or faults is named and cannot take a test shard or a benchmark with it.

    python benchmarks/kernel_probe.py --device cuda [--timeout 120] [--out-dir DIR]
    python benchmarks/kernel_probe.py --device cpu                     # dry run: the CPU op only
    python benchmarks/kernel_probe.py --one cuda_sm90 --device cuda    # one variant, in this process

Variants (VARIANTS): every kernel of cp_attention.kernel_variants, named <engine>_<kernel> and run through
its ops' `variant` argument: the CUDA op's `cuda_mma`, `cuda_sm90`, `cuda_sm90_tma`,
`cuda_sm90_tma_no_pingpong` and `cuda_auto`, and the Triton op's `triton_pointer`, `triton_tma` and
`triton_auto` (which lets the autotuner time every pointer and TMA tile on problems big enough to be
tuned); the table says which the record holds proven. Each runs `flash_attn_fwd` and
the accumulating `flash_attn_fwd_acc_` (or their Triton twins) on bfloat16 and float16 inputs, D 64 and 128,
odd lengths, GQA, causal with rows that see no key, and a key mask that hides every key of one batch, and
checks out and lse against the float64 reference of the tests with their tolerance rule (tests/reference.py).
Outputs start as NaN: the accumulated state is filled with NaN, and on GPUs the blocks the op's own outputs
will be carved from are too.

A child exits 0 (every case right), 1 (a case gave wrong values), 3 (the variant does not exist here, e.g.
the sm_90 kernels on other GPUs: n/a) or 4 (it raised). The parent's verdicts: PASS, FAIL (wrong values),
FAULT (a CUDA error, which leaves the child's CUDA context unusable), CRASH (killed by a signal), HANG (past
the time limit), ERROR (raised something else) and n/a. It prints a table, writes
kernel_probe-<device>-<time>.json, and ends with lines that benchmarks/gpu_check.sh reads:

    SKIP_BENCH cuda_sm90 because cuda_auto (HANG), cuda_sm90_tma (HANG) failed the probe

one for each name bench_flash_fwd.py times (a backend, or one of its OP_VARIANTS) that would run a failed
kernel, so that the benchmarks never meet it. The tests need no such guard: only the tests that name a
kernel run the unproven ones, and the defaults are proven ones. Exit status 1 when a variant that exists
here failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from _harness import REPO_ROOT, print_table, write_json

sys.path.insert(0, str(REPO_ROOT))  # cp_attention, when run as a plain file from anywhere
from cp_attention import kernel_variants as kv  # noqa: E402  (the parent starts no CUDA context)


@dataclass(frozen=True)
class Variant:
    ops: str            # whose ops run: "cuda", "triton" or "cpu"
    kernel: str         # their `variant` argument
    tuned_only: bool = False  # only the cases the Triton autotuner tunes (the others are triton_pointer's)


VARIANTS = {f"{engine}_{kernel}": Variant(engine, kernel, tuned_only=(engine, kernel) == ("triton", "auto"))
            for engine in kv.KERNELS for kernel in kv.kernel_names(engine)[1:]}
VARIANTS["cpu"] = Variant("cpu", "default")
GPU_VARIANTS = [name for name, v in VARIANTS.items() if v.ops != "cpu"]

# Child exit statuses.
EXIT_PASS, EXIT_WRONG, EXIT_NA, EXIT_RAISED = 0, 1, 3, 4

FAILED = ("FAIL", "FAULT", "CRASH", "HANG", "ERROR")
# What torch and the driver print for a fault of a kernel: after one, the process's CUDA context is lost.
_CUDA_FAULT = re.compile(r"CUDA error|cudaError|CUDA_ERROR|CUresult|illegal memory access|"
                         r"illegal instruction|misaligned address|unspecified launch failure|"
                         r"device-side assert|launch timed out", re.IGNORECASE)

# ----------------------------------------------------------------------------------------- verdicts
def verdict_of(returncode: int | None, timed_out: bool, output: str) -> str:
    """The verdict on one child from how it ended and what it printed."""
    if timed_out:
        return "HANG"
    if returncode is None or returncode < 0 or returncode >= 128:
        return "CRASH"
    if returncode == EXIT_PASS:
        return "PASS"
    if returncode == EXIT_NA:
        return "n/a"
    if _CUDA_FAULT.search(output):
        return "FAULT"
    if returncode == EXIT_WRONG:
        return "FAIL"
    return "ERROR"


def bench_variants(name: str) -> list[str]:
    """The probed variants a name of bench_flash_fwd.py (one of our backends, or an OP_VARIANTS entry) may
    run: its kernel, and for a kernel that chooses per call every variant it may choose."""
    from bench_flash_fwd import OP_VARIANTS

    engine, kernel = kv.resolve(name) if name in kv.BACKENDS else ("cuda", OP_VARIANTS[name])
    chosen = [f"{engine}_{v}" for v in kv.variants_of(engine, kernel)]
    return ([f"{engine}_{kernel}"] if f"{engine}_{kernel}" not in chosen else []) + chosen


def decide(verdicts: dict[str, str], names: list[str]) -> dict:
    """What the benchmarks should not time, from the verdicts {variant: verdict}: `skip_bench` [the names of
    `names` that would run a failed variant] and `reasons` {name: the failed variants}."""
    skip, reasons = [], {}
    for name in names:
        failed = [f"{v} ({verdicts[v]})" for v in bench_variants(name) if verdicts.get(v) in FAILED]
        if failed:
            skip.append(name)
            reasons[name] = ", ".join(failed)
    return {"skip_bench": skip, "reasons": reasons}


def decision_lines(decision: dict) -> list[str]:
    """The machine-readable lines the probe ends with (gpu_check.sh reads them)."""
    return [f"SKIP_BENCH {b} because {decision['reasons'][b]} failed the probe"
            for b in decision["skip_bench"]]


# -------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    dtype: str          # "bfloat16" or "float16"
    D: int
    B: int
    H: int
    Hkv: int
    Sq: int
    Sk: int
    causal: bool = False
    masked: bool = False  # a random key mask; with B > 1 the last batch sees no key at all
    chunks: int = 0       # > 0: the accumulating op, K/V in that many chunks into a float32 state
    tuned: bool = False   # big enough for the Triton autotuner

    @property
    def label(self) -> str:
        short = {"bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        flags = [f for f, on in (("causal", self.causal), ("mask", self.masked),
                                 (f"acc{self.chunks}", self.chunks), ("tuned", self.tuned)) if on]
        heads = f"H{self.H}" + (f"/{self.Hkv}" if self.Hkv != self.H else "")
        return "-".join([short, f"D{self.D}", f"B{self.B}", heads, f"{self.Sq}x{self.Sk}", *flags])


def cases_for(device: str, tuned_only: bool = False) -> list[Case]:
    """The probe's cases: odd lengths (ragged blocks everywhere), GQA, causal, a mask, the accumulating op;
    on GPUs also one D 128 case that the Triton autotuner tunes. Small shapes on the CPU."""
    if device == "cpu":
        Sq, Sk = 67, 45
    else:
        Sq, Sk = 1000, 777
    out = []
    for D in (64, 128):
        out += [
            Case("bfloat16", D, 1, 4, 4, Sq, Sk),
            Case("bfloat16", D, 2, 8, 2, Sq, Sk),                               # GQA
            Case("bfloat16", D, 1, 4, 4, Sq, Sk, causal=True),                  # Sq > Sk: rows see nothing
            Case("bfloat16", D, 2, 4, 2, Sq, Sk, masked=True),                  # batch 1 sees nothing
            Case("bfloat16", D, 2, 8, 2, Sq, Sk, masked=True, chunks=3),
            Case("float16", D, 2, 4, 2, Sk, Sq, causal=True, masked=True),
            Case("float16", D, 1, 4, 4, Sq, Sk, chunks=2),
        ]
        if device != "cpu" and D == 128:  # the autotuner compiles every candidate: one D keeps it short
            from cp_attention.triton_kernels.configs import AUTOTUNE_MIN_WORK
            out.append(Case("bfloat16", D, 1, 4, 4, Sq, -(-AUTOTUNE_MIN_WORK // Sq) + 28, tuned=True))
    return [c for c in out if c.tuned or not tuned_only]


# -------------------------------------------------------------------------------------------- child
def _na(reason: str) -> int:
    print(f"n/a: {reason}", flush=True)
    print("RESULT " + json.dumps({"na": reason, "cases": []}), flush=True)
    return EXIT_NA


def _expected_missing(variant: Variant, torch) -> str | None:
    """Why this variant cannot exist on this device and build (None: it should run)."""
    import cp_attention
    major = torch.cuda.get_device_capability()[0]
    if variant.ops == "cuda" and variant.kernel.startswith("sm90"):
        archs = str(dict(cp_attention.build_info()).get("cuda_archs", ""))
        if major != 9 or "9.0a" not in archs:
            return (f"the sm_90 kernels need an sm_90 device and a build with sm_90a code (sm_{major}x, "
                    f"{archs!r})")
    if variant.ops == "triton" and variant.kernel == "tma" and major < 9:
        return f"Triton's TMA tiles need sm_90+ (this GPU: sm_{major}x)"
    return None


def _poison_allocator(torch, shapes_dtypes) -> None:
    """Fills blocks of the CUDA caching allocator with NaN and frees them, so the outputs an op allocates
    next most likely reuse them: elements it never writes then show as NaN, not as stale plausible values."""
    blocks = [torch.full(shape, math.nan, dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def _compare(out, lse, q, k, v, causal, kv_mask) -> tuple[list[str], float, float]:
    """Problems (empty: right) by the tests' own check (tests/reference.py: the contract for empty rows, no
    NaN, the tolerance rule), and the max errors of out and lse against the float64 reference."""
    import torch
    from reference import _max_abs_err, attention_ref, check_attention

    problems = []
    try:
        check_attention(out, lse, q, k, v, None, causal, kv_mask)
    except AssertionError as exc:
        problems.append(str(exc))
    B, Sq, H, D = q.shape
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, kv_mask)
    if tuple(out.shape) != (B, Sq, H, D) or tuple(lse.shape) != (B, H, Sq):
        return problems, math.inf, math.inf
    sees_keys = ~torch.isneginf(ref_lse)
    sees_keys_bshd = sees_keys.transpose(1, 2)[..., None].expand(B, Sq, H, D)
    return problems, _max_abs_err(out, ref_out, sees_keys_bshd)[0], _max_abs_err(lse, ref_lse, sees_keys)[0]


def _run_case(case: Case, variant: Variant, device: str) -> dict:
    import torch
    ops = torch.ops.cp_attention
    fwd, acc = ((ops.triton_flash_attn_fwd, ops.triton_flash_attn_fwd_acc_) if variant.ops == "triton"
                else (ops.flash_attn_fwd, ops.flash_attn_fwd_acc_))
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(case.label.encode()))
    q = torch.randn(case.B, case.Sq, case.H, case.D, generator=gen).to(device, dtype)
    k = torch.randn(case.B, case.Sk, case.Hkv, case.D, generator=gen).to(device, dtype)
    v = torch.randn(case.B, case.Sk, case.Hkv, case.D, generator=gen).to(device, dtype)
    kv_mask = None
    if case.masked:
        kv_mask = torch.rand(case.B, case.Sk, generator=gen) < 0.7
        if case.B > 1:
            kv_mask[-1] = False
        kv_mask = kv_mask.to(device)
    t0 = time.perf_counter()
    if case.chunks:
        # A ring's worth of steps into a NaN-filled empty state: rows whose lse is -inf must never be read.
        out = torch.full((case.B, case.Sq, case.H, case.D), math.nan, dtype=torch.float32, device=device)
        lse = torch.full((case.B, case.H, case.Sq), -math.inf, device=device)
        bounds = [round(i * case.Sk / case.chunks) for i in range(case.chunks + 1)]
        for s, e in zip(bounds, bounds[1:]):
            acc(q, k[:, s:e], v[:, s:e], out, lse, None, False, None if kv_mask is None else kv_mask[:, s:e],
                variant.kernel)
        out = out.to(dtype)
    else:
        if device == "cuda":
            _poison_allocator(torch, [((case.B, case.Sq, case.H, case.D), dtype),
                                      ((case.B, case.H, case.Sq), torch.float32)])
        out, lse = fwd(q, k, v, None, case.causal, kv_mask, variant.kernel)
    if device == "cuda":
        torch.cuda.synchronize()  # a fault of this case's kernels surfaces here, not in a later case
    seconds = time.perf_counter() - t0
    problems, out_err, lse_err = _compare(out, lse, q, k, v, case.causal, kv_mask)
    return {"case": case.label, "ok": not problems, "out_err": out_err, "lse_err": lse_err,
            "seconds": round(seconds, 3), "problems": problems}


def child(name: str, device: str) -> int:
    """Runs one variant's cases in this process; returns the exit status (EXIT_*)."""
    variant = VARIANTS[name]
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the float64 reference and its tolerance rule
    import torch

    import cp_attention  # noqa: F401  (registers the ops)
    from cp_attention import triton_kernels

    if (variant.ops == "cpu") != (device == "cpu"):
        return _na(f"{name} does not run on {device}")
    if device == "cuda" and not torch.cuda.is_available():
        return _na("torch sees no CUDA device")
    if variant.ops == "triton" and not triton_kernels.triton_importable():
        return _na("triton does not import here")
    missing = _expected_missing(variant, torch) if device == "cuda" else None
    proven = "" if variant.ops == "cpu" else " (proven)" if kv.is_proven(variant.ops, variant.kernel) else \
        " (unproven)"
    what = f"{variant.ops} ops, variant={variant.kernel!r}{proven}"
    print(f"{name}: {what} on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""),
          flush=True)
    results = []
    with torch.inference_mode():
        for i, case in enumerate(cases_for(device, variant.tuned_only)):
            print(f"case {case.label}", flush=True)
            try:
                res = _run_case(case, variant, device)
            except ValueError as exc:
                # The op's own refusal of the kernel on the first call: this variant does not exist here.
                # Where it should exist, the refusal is a failure like any other.
                if i == 0 and missing is not None:
                    return _na(f"{missing}; the op said: {str(exc).splitlines()[0]}")
                raise
            results.append(res)
            print(f"  {'ok' if res['ok'] else 'WRONG'}: out err {res['out_err']:.3g}, lse err "
                  f"{res['lse_err']:.3g}, {res['seconds']:.2f} s"
                  + "".join(f"\n  {p}" for p in res["problems"]), flush=True)
    if missing is not None:
        print(f"note: expected n/a ({missing}), but every call ran", flush=True)
    extra = {}
    if variant.ops == "triton" and variant.kernel == "auto" and device == "cuda":
        from cp_attention.triton_kernels import flash_fwd
        extra["tuned_configs"] = flash_fwd.tuned_configs()
        if not extra["tuned_configs"]:
            results.append({"case": "autotuner", "ok": False, "out_err": 0.0, "lse_err": 0.0, "seconds": 0.0,
                            "problems": ["the autotuner never ran: the tuned cases did not reach it"]})
    print("RESULT " + json.dumps({"na": None, "cases": results, **extra}), flush=True)
    return EXIT_PASS if all(r["ok"] for r in results) else EXIT_WRONG


# ------------------------------------------------------------------------------------------- parent
_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _on_signal(signum, frame):
    """Killed from outside (gpu_check.sh's outer time limit): the children live in sessions of their own, so
    take them along rather than leave a hung kernel on the GPU."""
    with _LIVE_LOCK:
        for proc in _LIVE.values():
            _kill_group(proc)
    sys.exit(128 + signum)


def _parse_result(output: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            try:
                return json.loads(line[len("RESULT "):])
            except json.JSONDecodeError:
                return None
    return None


def summarize(name: str, returncode: int | None, timed_out: bool, output: str, seconds: float) -> dict:
    """One row of the probe's table and JSON from a finished (or killed) child."""
    verdict = verdict_of(returncode, timed_out, output)
    result = _parse_result(output) or {}
    cases = result.get("cases", [])
    lines = output.splitlines()
    row = {"variant": name, "verdict": verdict, "returncode": returncode, "seconds": round(seconds, 1),
           "cases": f"{sum(c['ok'] for c in cases)}/{len(cases)}" if cases else "-",
           "out_err": max((c["out_err"] for c in cases), default=None),
           "lse_err": max((c["lse_err"] for c in cases), default=None), "note": ""}
    started = [ln[len("case "):] for ln in lines if ln.startswith("case ")]
    if verdict == "n/a":
        row["note"] = result.get("na") or next((ln[5:] for ln in lines if ln.startswith("n/a: ")), "")
    elif verdict in ("HANG", "CRASH", "FAULT", "ERROR"):
        where = f" in case {started[-1]}" if started else ""
        what = {"HANG": "no end", "CRASH": f"signal {-returncode if returncode and returncode < 0 else '?'}",
                "FAULT": "CUDA error", "ERROR": "raised"}[verdict]
        detail = next((ln.strip() for ln in reversed(lines) if _CUDA_FAULT.search(ln) or "Error" in ln), "")
        row["note"] = f"{what}{where}" + (f": {detail[:160]}" if detail else "")
    elif verdict == "FAIL":
        bad = [c for c in cases if not c["ok"]]
        row["note"] = f"wrong in {', '.join(c['case'] for c in bad[:3])}" + (" ..." if len(bad) > 3 else "")
    row["case_results"] = cases
    if "tuned_configs" in result:
        row["tuned_configs"] = result["tuned_configs"]
    if verdict != "PASS":
        row["output_tail"] = lines[-60:]
    return row


def run_variant(name: str, device: str, timeout: float, threads: int) -> dict:
    """Runs one variant in a child process (its own session, so a timeout kills whatever it started)."""
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--one", name,
           "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO_ROOT, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        output, _ = proc.communicate()
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
    return summarize(name, proc.returncode, timed_out, output or "", time.monotonic() - t0)


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def proven_label(name: str) -> str:
    """"yes" where cp_attention.kernel_variants records the variant proven on a GPU, "no" where not, "-" for
    the CPU op."""
    v = VARIANTS[name]
    return "-" if v.ops == "cpu" else "yes" if kv.is_proven(v.ops, v.kernel) else "no"


# The probe's table (the GPU check's summary prints it again).
TABLE_COLUMNS = [("variant", "variant", ""), ("proven", "proven", ""), ("verdict", "verdict", ""),
                 ("cases ok", "cases", ""), ("max out err", "out_err", ""), ("max lse err", "lse_err", ""),
                 ("s", "seconds", ".1f"), ("note", "note", "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the CUDA and Triton variants; cpu: a dry run of the probe on the CPU op")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds each variant may take (Triton compiles count) before it is a HANG")
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default: benchmarks/results)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--one", default=None, metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # cp_attention, when run as a plain file from anywhere
    if args.one:
        if args.one not in VARIANTS:
            sys.exit(f"kernel_probe: unknown variant {args.one}; expected one of {', '.join(VARIANTS)}")
        try:
            code = child(args.one, args.device)
        except Exception:  # noqa: BLE001  (the parent reads the traceback: a CUDA error is a FAULT)
            traceback.print_exc()
            sys.stdout.flush()
            code = EXIT_RAISED
        sys.exit(code)

    names = args.variants.split(",") if args.variants else GPU_VARIANTS + ["cpu"] * (args.device == "cpu")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"kernel_probe: unknown variants {unknown}; expected some of {', '.join(VARIANTS)}")
    here = [n for n in names if (VARIANTS[n].ops == "cpu") == (args.device == "cpu")]
    elsewhere = [n for n in names if n not in here]
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    threads = max(1, (os.cpu_count() or 1) // max(1, len(here)))
    print(f"kernel_probe: {', '.join(here)} on {args.device}, each in its own process, {args.timeout:.0f} s "
          f"limit, {threads} threads each", flush=True)
    rows = {}
    with ThreadPoolExecutor(max_workers=max(1, len(here))) as pool:
        futures = [pool.submit(run_variant, n, args.device, args.timeout, threads) for n in here]
        for fut in as_completed(futures):
            row = fut.result()
            rows[row["variant"]] = row
            print(f"  {row['variant']}: {row['verdict']} in {row['seconds']:.1f} s", flush=True)
            if row["verdict"] not in ("PASS", "n/a"):
                for line in row.get("output_tail", [])[-40:]:
                    print(f"    | {line}")
    for n in elsewhere:
        rows[n] = {"variant": n, "verdict": "n/a", "returncode": None, "seconds": None, "cases": "-",
                   "out_err": None, "lse_err": None, "note": f"not probed on {args.device}",
                   "case_results": []}
    ordered = [{**rows[n], "proven": proven_label(n)} for n in names]

    print()
    print_table([{**r, "out_err": _fmt_err(r["out_err"]), "lse_err": _fmt_err(r["lse_err"])}
                 for r in ordered], TABLE_COLUMNS)
    from bench_flash_fwd import OP_VARIANTS

    decision = decide({r["variant"]: r["verdict"] for r in ordered}, [*kv.BACKENDS, *OP_VARIANTS])
    if not args.no_json:
        write_json("kernel_probe", ordered, {"timeout_s": args.timeout, **decision,
                                             "cases": [asdict(c) for c in cases_for(args.device)]},
                   device=args.device, out_dir=args.out_dir, tmp=args.device == "cpu")
    bad = [r["variant"] for r in ordered if r["verdict"] in FAILED]
    print(f"kernel_probe: {'FAILED: ' + ', '.join(bad) if bad else 'every variant here passed'}")
    for line in decision_lines(decision):
        print(line)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Attention forward: our kernels against torch's own kernels on the same inputs, in one run.

    python benchmarks/bench_flash_fwd.py                          # CPU sweep (a few minutes on 2 cores)
    python benchmarks/bench_flash_fwd.py --quick                  # smoke run (seconds)
    python benchmarks/bench_flash_fwd.py --device cuda            # GPU sweep: every GPU backend of ours

Ours is `cp_attention.flash_attn(q, k, v, backend=..., return_lse=True)` on BSHD inputs, for each backend
given (`--backends`), and the fused ring step `cp_attention.flash_attn_acc_` of the same backend into a
float32 running state (`acc` rows: its cost over the plain forward). torch's kernels get
the very same tensors viewed as BHSD (`q.transpose(1, 2)`, no copy), which is how a BSHD caller such as
diffusers hands them over. Every shape is checked against torch before it is timed, so a wrong kernel
cannot post a number. Throughput ratios are torch time / our time: above 1.0 means we are faster.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _harness import (
    DTYPES,
    SHORT,
    TIME_UP_EXIT,
    apply_common,
    attn_fwd_flops,
    cpu_peak_gflops,
    geomean,
    gflops,
    make_parser,
    measure_rows,
    parse_dtypes,
    print_table,
    time_interleaved,
    timing_from_args,
    write_json,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_attention
from cp_attention import ops

# Output error allowed relative to max|out| of torch's result. For half types the two kernels may round
# at different points (e.g. P to 16 bits before the PV product); float32 differs by summation order only.
OUT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Absolute LSE error: the LSE is float32 for every input dtype, but half inputs round the scores first.
LSE_ATOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# The ratio threshold of the summary: the sequence lengths where our kernel must match torch.
TARGET_MIN_S = 1024


# ------------------------------------------------------------------------------------ torch baselines
@dataclass(frozen=True)
class Baseline:
    """One torch kernel. `run(q, k, v, scale)` takes BHSD views and returns (out BHSD, lse or None);
    `context` is entered around each call, outside its timed region (backend selection is not timed)."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor | None]]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _sdpa(name: str, backend: SDPBackend) -> Baseline:
    def run(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None

    return Baseline(name, run, lambda: sdpa_kernel(backend))


def _aten_cpu_flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse


def baselines_for(device: torch.device) -> list[Baseline]:
    """torch's kernels to compare against on this device; the first one returning an LSE is the
    reference of the correctness check (else the first one)."""
    if device.type == "cpu":
        return [_sdpa("sdpa", SDPBackend.FLASH_ATTENTION), Baseline("aten", _aten_cpu_flash)]
    if device.type == "cuda":
        return [_sdpa("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                _sdpa("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                _sdpa("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
    raise SystemExit(f"bench_flash_fwd: no torch baselines for device {device}")


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    D: int
    S: int
    note: str = ""


def shapes_for(quick: bool, device: torch.device) -> list[Shape]:
    if quick:
        return [Shape(1, 8, 64, 256), Shape(1, 4, 128, 1024)]
    if device.type == "cuda":
        # About 16k tokens per call (B * S), H = 16: a diffusion transformer layer's share of a GPU. The
        # shapes the targets judge come first (D 128, then S >= 4k), so a run cut short at its time limit
        # has them.
        return [Shape(16384 // S, 16, D, S) for S in (4096, 16384, 1024) for D in (128, 64)]
    # The CPU targets' grid (docs/kernels.md): D 64 and 128, S 1k to 4k, B x H from 8 to 24.
    grid = [Shape(1, H, D, S) for H in (8, 24) for D in (64, 128) for S in (1024, 2048, 4096)]
    # PixArt/SD3-class layer: a head dim that is not a power of two (docs/design.md, "Tensors and layout").
    return grid + [Shape(1, 16, 72, 4096, "pixart")]


# Timed kernels of ours that no backend names: the CUDA ops with their `variant` argument. On sm_90 they run
# beside the backends "cuda" (mma.sync), "cuda_sm90" (the TMA wgmma kernel where the inputs allow it, as
# the benchmark's do, its compute warpgroups taking turns to issue) and "triton_tma": "cuda_sm90_cp" is
# the cp.async wgmma kernel, "cuda_tma_free" the TMA one without the turns (what the turns buy).
OP_VARIANTS = {"cuda_sm90_cp": "sm90", "cuda_tma_free": "sm90_tma_no_pingpong"}
# On the CPU, the two forward kernels that "default" chooses between (csrc/cpu/dispatch.cpp): the panel
# kernel of the CPU's ISA copy and, on CPUs with AVX2 or more, the oneDNN brgemm kernel.
CPU_VARIANTS = {"cpu_panels": "panels", "cpu_brgemm": "brgemm"}


def cpu_variant_runs(variant: str) -> bool:
    """Whether the CPU op takes this variant on this machine (brgemm needs AVX2)."""
    q = torch.zeros(1, 1, 1, 16)
    try:
        ops.flash_attn_fwd(q, q, q, 1.0, False, None, variant)
    except ValueError:
        return False
    return True


def default_backends(device: torch.device) -> list[str]:
    """Our own backends on the device (not the aten wrappers, which are torch's kernels), and on sm_90
    devices the opt-in ones of kernels not yet proven on a GPU beside them (cp_attention.kernel_variants)."""
    names = [b for b in cp_attention.available_backends(device) if not b.startswith("aten")]
    if device.type == "cpu" and "cpu" in names:
        names += [name for name, variant in CPU_VARIANTS.items() if cpu_variant_runs(variant)]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        if "cuda" in names:
            names += ["cuda_sm90", *OP_VARIANTS]
        if "triton" in names:
            names.append("triton_tma")
    return names


def forward_fn(name: str, q, k, v, scale: float) -> Callable[[], tuple]:
    """Our forward of one timed name (a backend or an OP_VARIANTS entry), returning (out, lse)."""
    if name in OP_VARIANTS or name in CPU_VARIANTS:
        variant = OP_VARIANTS.get(name) or CPU_VARIANTS[name]
        return lambda: ops.flash_attn_fwd(q, k, v, scale, False, None, variant)
    return lambda: cp_attention.flash_attn(q, k, v, scale=scale, backend=name, return_lse=True)


def fused_fn(name: str, q, k, v, state, state_lse, scale: float) -> Callable[[], None]:
    """The fused ring step of one timed name into the running state (state, state_lse)."""
    if name in OP_VARIANTS or name in CPU_VARIANTS:
        kernel = OP_VARIANTS.get(name) or CPU_VARIANTS[name]
        return lambda: ops.flash_attn_fwd_acc_(q, k, v, state, state_lse, scale, False, None, kernel)
    return lambda: cp_attention.flash_attn_acc_(q, k, v, state, state_lse, scale=scale, backend=name)


# ---------------------------------------------------------------------------------------------- checks
def check_against(shape: Shape, dtype: torch.dtype, name: str, ours: tuple, ref_name: str,
                  ref: tuple) -> dict:
    """Compares our (out BSHD, lse) with torch's (out BHSD, lse or None). Returns the differences, or on a
    mismatch {f"{name}_failed": reason}: that kernel is then not timed at this shape."""
    out, lse = ours
    ref_out = ref[0].transpose(1, 2).float()
    diff = (out.float() - ref_out).abs().max().item()
    scale = ref_out.abs().max().item()
    rel = diff / max(scale, 1e-30)
    lse_diff = None
    if ref[1] is not None:
        lse_diff = (lse.float() - ref[1].float()).abs().max().item()
    bad = []
    if not torch.isfinite(out).all() or not torch.isfinite(lse).all():
        bad.append("non-finite values in our output or LSE")
    if not rel <= OUT_RTOL[dtype]:
        bad.append(f"out: max|diff| {diff:.3e} is {rel:.3e} of max|out| {scale:.3e} "
                   f"(allowed {OUT_RTOL[dtype]:.0e})")
    if lse_diff is not None and not lse_diff <= LSE_ATOL[dtype]:
        bad.append(f"lse: max|diff| {lse_diff:.3e} (allowed {LSE_ATOL[dtype]:.0e})")
    if bad:
        reason = (f"FAILED correctness check of {name} vs {ref_name} at {SHORT[dtype]} B={shape.B} "
                  f"H={shape.H} D={shape.D} S={shape.S}: " + "; ".join(bad) + ". No timing recorded.")
        print(reason, flush=True)
        return {f"{name}_failed": reason}
    return {f"{name}_max_abs_diff": diff, f"{name}_rel_diff": rel, f"{name}_lse_max_abs_diff": lse_diff,
            "check_ref": ref_name}


# ---------------------------------------------------------------------------------------------- run
def bench_shape(shape: Shape, dtype: torch.dtype, backends: list[str], device: torch.device,
                bases: list[Baseline], timing: dict, acc: bool) -> dict:
    B, H, D, S = shape.B, shape.H, shape.D, shape.S
    gen = torch.Generator(device="cpu").manual_seed(1234 + S + 7 * H + 13 * D)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views of the same data
    scale = 1.0 / math.sqrt(D)

    ours = {b: forward_fn(b, q, k, v, scale) for b in backends}
    if acc:
        # The fused ring step into a float32 state. Calls keep merging the same chunk in: the state stays
        # finite (out unchanged, lse + log 2 per call), and each call does exactly a ring step's work.
        state = torch.zeros(B, S, H, D, dtype=torch.float32, device=device)
        state_lse = torch.full((B, H, S), float("-inf"), device=device)
        for b in backends:
            ours[f"{b}_acc"] = fused_fn(b, q, k, v, state, state_lse, scale)

    # Correctness first, so a wrong kernel never gets timed.
    ref_name, ref = None, None
    supported = {}
    for base in bases:
        with base.context():
            try:
                res = base.run(qt, kt, vt, scale)
            except RuntimeError as exc:  # e.g. a GPU kernel that does not take this dtype or head dim
                supported[base.name] = f"unsupported: {str(exc).splitlines()[0]}"
                continue
        supported[base.name] = True
        if ref is None or (ref[1] is None and res[1] is not None):
            ref_name, ref = base.name, res
    if ref is None:
        sys.exit(f"bench_flash_fwd: no torch baseline runs {SHORT[dtype]} D={D} on {device}")
    row = {"dtype": SHORT[dtype], "B": B, "H": H, "D": D, "S": S, "note": shape.note,
           "flops": attn_fwd_flops(B, H, S, S, D)}
    for b in backends:
        row.update(check_against(shape, dtype, b, ours[b](), ref_name, ref))
    if acc:
        for b in backends:
            state.zero_()
            state_lse.fill_(float("-inf"))
            ours[f"{b}_acc"]()
            row.update(check_against(shape, dtype, f"{b}_acc", (state.to(dtype), state_lse), ref_name, ref))
    del ref
    # A kernel that failed its check is not timed; the others still are, and main() exits non-zero.
    ours = {name: fn for name, fn in ours.items() if f"{name}_failed" not in row}
    backends = [b for b in backends if b in ours]

    # Ours and torch's kernels take turns call by call, so machine noise cannot favour either side.
    timed = [b for b in bases if supported[b.name] is True]
    fns = {**ours, **{b.name: (lambda b=b: b.run(qt, kt, vt, scale)) for b in timed}}
    contexts = {b.name: b.context for b in timed}
    stats = time_interleaved(fns, device=device, contexts=contexts, **timing)
    for name in fns:
        row[name] = stats[name]
        row[f"{name}_ms"] = stats[name]["median"]
        row[f"{name}_gflops"] = gflops(row["flops"], row[f"{name}_ms"])
    for base in bases:
        if base not in timed:
            row[base.name] = supported[base.name]
    torch_ms = [row[f"{b.name}_ms"] for b in timed]
    for b in backends:
        for base in timed:
            row[f"ratio_{b}_{base.name}"] = row[f"{base.name}_ms"] / row[f"{b}_ms"]
        row[f"ratio_{b}_best_torch"] = min(torch_ms) / row[f"{b}_ms"]
        if f"{b}_acc" in ours:
            row[f"acc_overhead_{b}"] = row[f"{b}_acc_ms"] / row[f"{b}_ms"] - 1.0
    return row


def summarize(rows: list[dict], backends: list[str], bases: list[Baseline], device: torch.device) -> dict:
    """Per dtype and backend of ours, over S >= TARGET_MIN_S: geometric-mean and minimum throughput ratio
    against each torch kernel and against the fastest torch kernel of each shape, and the fused step's
    overhead. Targets (docs/kernels.md): on CPUs ours >= 1.0x the fastest torch kernel; on GPUs (bf16)
    triton >= 0.9x cuDNN at D = 128, S >= 4k, cuda >= triton, and the fused step <= 3% over the forward at
    S >= 4k."""
    summary = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        big = [r for r in rows if r["dtype"] == dtype and r["S"] >= TARGET_MIN_S]
        if not big:
            continue
        entry = {"shapes": len(big)}
        for b in backends:
            per = {}
            for key in [f"ratio_{b}_{base.name}" for base in bases] + [f"ratio_{b}_best_torch"]:
                vals = [r[key] for r in big if key in r]
                if vals:
                    per[key[len(f"ratio_{b}_"):]] = {"geomean": geomean(vals), "min": min(vals)}
            over = [r[f"acc_overhead_{b}"] for r in big if f"acc_overhead_{b}" in r and r["S"] >= 4096]
            if over:
                per["acc_overhead_max_s4k"] = max(over)
            entry[b] = per
        targets = {}
        if device.type == "cpu":
            for b in backends:
                targets[f"{b} >= 1.0x best torch"] = entry[b].get("best_torch", {}).get("min", 0.0) >= 1.0
        else:
            d128 = [r for r in big if r["D"] == 128 and r["S"] >= 4096]
            if "triton" in backends and d128 and all("ratio_triton_sdpa_cudnn" in r for r in d128):
                targets["triton >= 0.9x cudnn (D=128, S>=4k)"] = min(r["ratio_triton_sdpa_cudnn"]
                                                                     for r in d128) >= 0.9
            if "triton" in backends and "cuda" in backends:
                targets["cuda >= triton (S>=1k)"] = all(
                    r.get("cuda_ms", math.inf) <= r.get("triton_ms", math.inf) for r in big)
        for b in backends:
            over = entry[b].get("acc_overhead_max_s4k")
            if over is not None:
                targets[f"{b} fused step <= 3% over forward (S>=4k)"] = over <= 0.03
        entry["targets"] = targets
        summary[dtype] = entry
    return summary


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", default=None,
                   help="comma-separated cp_attention.flash_attn backends of ours to time (default: "
                        "every one of ours on the device)")
    p.add_argument("--skip-backends", default=None,
                   help="comma-separated backends or variants not to time (gpu_check.sh passes those whose "
                        "kernels failed benchmarks/kernel_probe.py)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--dtypes", default=None,
                   help=f"comma-separated, from {', '.join(DTYPES)} (default float32,bfloat16 on CPUs, "
                        "bfloat16 on GPUs)")
    p.add_argument("--no-acc", action="store_true", help="skip the fused ring step (flash_attn_acc_)")
    args = p.parse_args()
    apply_common(args)

    device = torch.device(args.device or "cpu")
    backends = args.backends.split(",") if args.backends else default_backends(device)
    skipped = set(args.skip_backends.split(",")) if args.skip_backends else set()
    if skipped & set(backends):
        print(f"bench_flash_fwd: not timing {sorted(skipped & set(backends))} (--skip-backends)")
    backends = [b for b in backends if b not in skipped]
    if not backends:
        sys.exit(f"bench_flash_fwd: none of our backends runs on {device}")
    dtype_names = args.dtypes or ("bfloat16" if device.type == "cuda" else "float32,bfloat16")
    dtypes = parse_dtypes(dtype_names)
    bases = baselines_for(device)
    timing = timing_from_args(args, warmup=1, warmup_s=(0.05, 0.3), budget_s=(0.1, 1.0), min_iters=(2, 3))
    rate, unit = (1e3, "TFLOP/s") if device.type == "cuda" else (1.0, "GFLOP/s")
    print(f"bench_flash_fwd: ours = cp_attention.flash_attn(backend in {backends}) on {device}, "
          f"{torch.get_num_threads()} threads; torch: {', '.join(b.name for b in bases)}")

    def produce(rows: list[dict]) -> None:
        for dtype in dtypes:
            for shape in shapes_for(args.quick, device):
                row = bench_shape(shape, dtype, backends, device, bases, timing, not args.no_acc)
                rows.append(row)
                line = "  ".join(
                    f"{b} FAILED" if f"{b}_ms" not in row else
                    f"{b} {row[f'{b}_ms']:.2f} ms ({row[f'{b}_gflops'] / rate:.1f} {unit}, "
                    f"x{row[f'ratio_{b}_best_torch']:.2f} vs best torch"
                    + (f", fused step {100 * row[f'acc_overhead_{b}']:+.1f}%" if f"acc_overhead_{b}" in row
                       else "") + ")" for b in backends)
                print(f"  {row['dtype']} B={shape.B} H={shape.H} D={shape.D} S={shape.S}: {line}",
                      flush=True)

    rows, cut_short = measure_rows("bench_flash_fwd", produce)
    # Measured in the order that reaches the targets' shapes first; reported by dtype, D and S.
    order = {SHORT[d]: i for i, d in enumerate(dtypes)}
    rows.sort(key=lambda r: (order[r["dtype"]], r["D"], r["S"], r["H"]))

    columns = [("dtype", "dtype", ""), ("B", "B", "d"), ("H", "H", "d"), ("D", "D", "d"), ("S", "S", "d")]
    for name in backends + [b.name for b in bases]:
        for r in rows:
            if f"{name}_gflops" in r:
                r[f"{name}_rate"] = r[f"{name}_gflops"] / rate
        columns.append((f"{name} {unit}", f"{name}_rate", ".1f"))
    columns += [(f"{b}/best", f"ratio_{b}_best_torch", ".2f") for b in backends]
    peak = cpu_peak_gflops() if device.type == "cpu" else None
    if peak:
        # How far from the machine's limit: our default kernel and torch's fastest, as % of peak.
        for r in rows:
            for name in ["cpu", *(b.name for b in bases)]:
                if f"{name}_gflops" in r:
                    long_name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[r["dtype"]]
                    r[f"{name}_pct_peak"] = 100 * r[f"{name}_gflops"] / peak[long_name]
        columns += [(f"{name} %peak", f"{name}_pct_peak", ".0f") for name in ["cpu", *(b.name for b in bases)]
                    if any(f"{name}_pct_peak" in r for r in rows)]
        print(f"peak: {peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} GFLOP/s 16-bit "
              f"({peak['formula']}; {peak['threads']} threads, {peak['mhz']:.0f} MHz, {peak['isa']} kernels)")
    if not args.no_acc:
        for b in backends:
            for r in rows:
                if f"acc_overhead_{b}" in r:
                    r[f"acc_pct_{b}"] = 100 * r[f"acc_overhead_{b}"]
        columns += [(f"{b} fused +%", f"acc_pct_{b}", ".1f") for b in backends]
    print()
    print_table(rows, columns)

    summary = summarize(rows, backends, bases, device)
    print()
    for dtype, entry in summary.items():
        for b in backends:
            parts = [f"vs {key} geomean {v['geomean']:.2f}x min {v['min']:.2f}x"
                     for key, v in entry[b].items() if isinstance(v, dict)]
            print(f"{dtype} {b} (S >= {TARGET_MIN_S}, {entry['shapes']} shapes): " + "; ".join(parts))
        for name, met in entry["targets"].items():
            print(f"{dtype} target {name}: {'met' if met else 'not met'}")

    if not args.no_json:
        extra = {"args": vars(args), "backends": backends, "baselines": [b.name for b in bases],
                 "timing": timing, "summary": summary, "partial": cut_short}
        if "triton" in backends and device.type == "cuda":
            from cp_attention.triton_kernels.flash_fwd import tuned_configs

            extra["triton_tuned_configs"] = tuned_configs()
        write_json("flash_fwd", rows, extra, device=device, out_dir=args.out_dir, tmp=args.quick)
    failures = [r[key] for r in rows for key in r if key.endswith("_failed")]
    if failures:
        sys.exit(f"bench_flash_fwd: {len(failures)} correctness check(s) failed:\n" + "\n".join(failures))
    if cut_short:
        sys.exit(TIME_UP_EXIT)


if __name__ == "__main__":
    main()

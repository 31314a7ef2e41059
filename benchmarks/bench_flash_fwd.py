"""Attention forward: our kernel against torch's own kernels on the same inputs, in one run.

    python benchmarks/bench_flash_fwd.py            # full sweep (a few minutes on 2 cores)
    python benchmarks/bench_flash_fwd.py --quick    # smoke run (seconds)

Ours is `cp_attention.flash_attn(q, k, v, backend=..., return_lse=True)` on BSHD inputs. torch's kernels get
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
    apply_common,
    attn_fwd_flops,
    geomean,
    gflops,
    make_parser,
    print_table,
    time_interleaved,
    write_json,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

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


def device_for_backend(backend: str) -> torch.device:
    if backend in ("cpu", "aten_cpu_flash"):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    D: int
    S: int
    note: str = ""


def shapes_for(quick: bool) -> list[Shape]:
    if quick:
        return [Shape(1, 8, 64, 256), Shape(1, 4, 128, 1024)]
    grid = [Shape(1, H, D, S) for H in (8, 24) for D in (64, 128) for S in (256, 1024, 4096)]
    # PixArt/SD3-class layer: a head dim that is not a power of two (DESIGN section 3).
    return grid + [Shape(1, 16, 72, 4096, "pixart")]


# ---------------------------------------------------------------------------------------------- checks
def check_against(shape: Shape, dtype: torch.dtype, ours: tuple, ref_name: str, ref: tuple) -> dict:
    """Compares our (out BSHD, lse) with torch's (out BHSD, lse or None); exits on a mismatch."""
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
        sys.exit(f"FAILED correctness check vs {ref_name} at {SHORT[dtype]} B={shape.B} H={shape.H} "
                 f"D={shape.D} S={shape.S}: " + "; ".join(bad) + ". No timing recorded.")
    return {"max_abs_diff": diff, "rel_diff": rel, "lse_max_abs_diff": lse_diff, "check_ref": ref_name}


# ---------------------------------------------------------------------------------------------- run
def bench_shape(shape: Shape, dtype: torch.dtype, backend: str, device: torch.device,
                bases: list[Baseline], timing: dict) -> dict:
    B, H, D, S = shape.B, shape.H, shape.D, shape.S
    gen = torch.Generator(device="cpu").manual_seed(1234 + S + 7 * H + 13 * D)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views of the same data
    scale = 1.0 / math.sqrt(D)

    def ours():
        return cp_attention.flash_attn(q, k, v, scale=scale, backend=backend, return_lse=True)

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
    row.update(check_against(shape, dtype, ours(), ref_name, ref))
    del ref

    # Ours and torch's kernels take turns call by call, so machine noise cannot favour either side.
    timed = [b for b in bases if supported[b.name] is True]
    fns = {"ours": ours, **{b.name: (lambda b=b: b.run(qt, kt, vt, scale)) for b in timed}}
    stats = time_interleaved(fns, device=device, contexts={b.name: b.context for b in timed}, **timing)
    row["ours"] = stats["ours"]
    row["ours_ms"] = stats["ours"]["median"]
    row["ours_gflops"] = gflops(row["flops"], row["ours_ms"])
    for base in bases:
        if base not in timed:
            row[base.name] = supported[base.name]
            continue
        row[base.name] = stats[base.name]
        row[f"{base.name}_ms"] = stats[base.name]["median"]
        row[f"{base.name}_gflops"] = gflops(row["flops"], row[f"{base.name}_ms"])
        row[f"ratio_{base.name}"] = row[f"{base.name}_ms"] / row["ours_ms"]
    torch_ms = [row[f"{b.name}_ms"] for b in bases if f"{b.name}_ms" in row]
    row["ratio_best_torch"] = min(torch_ms) / row["ours_ms"]
    return row


def summarize(rows: list[dict], bases: list[Baseline]) -> dict:
    """Per dtype, over S >= TARGET_MIN_S: geometric-mean and minimum throughput ratio against each torch
    kernel and against the fastest torch kernel of each shape; the target is met when even the minimum
    ratio against the fastest torch kernel is at least 1.0."""
    summary = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        big = [r for r in rows if r["dtype"] == dtype and r["S"] >= TARGET_MIN_S]
        if not big:
            continue
        entry = {"shapes": len(big)}
        for key in [f"ratio_{b.name}" for b in bases] + ["ratio_best_torch"]:
            vals = [r[key] for r in big if key in r]
            if vals:
                entry[key] = {"geomean": geomean(vals), "min": min(vals)}
        entry["target_met"] = entry["ratio_best_torch"]["min"] >= 1.0
        summary[dtype] = entry
    return summary


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--backend", default="cpu",
                   help="which of our backends to time (a cp_attention.flash_attn backend name; default cpu)")
    p.add_argument("--device", default=None, help="device of the inputs (default: the backend's device)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help=f"comma-separated, from {', '.join(DTYPES)} (default float32,bfloat16)")
    args = p.parse_args()
    apply_common(args)

    device = torch.device(args.device) if args.device else device_for_backend(args.backend)
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    bases = baselines_for(device)
    timing = {
        "warmup": args.warmup if args.warmup is not None else 1,
        "warmup_s": 0.05 if args.quick else 0.3,
        "iters": args.iters,
        "budget_s": args.budget if args.budget is not None else (0.1 if args.quick else 1.0),
        "min_iters": 2 if args.quick else 3,
    }
    print(f"bench_flash_fwd: ours = cp_attention.flash_attn(backend={args.backend!r}) on {device}, "
          f"{torch.get_num_threads()} threads; torch: {', '.join(b.name for b in bases)}")

    rows = []
    with torch.inference_mode():
        for dtype in dtypes:
            for shape in shapes_for(args.quick):
                row = bench_shape(shape, dtype, args.backend, device, bases, timing)
                rows.append(row)
                ratios = "  ".join(f"x{row[f'ratio_{b.name}']:.2f} vs {b.name}" for b in bases
                                   if f"ratio_{b.name}" in row)
                print(f"  {row['dtype']} H={shape.H} D={shape.D} S={shape.S}: max|diff| "
                      f"{row['max_abs_diff']:.2e} (rel {row['rel_diff']:.1e}) vs {row['check_ref']}; "
                      f"ours {row['ours_ms']:.2f} ms ({row['ours']['iters']} it)  {ratios}", flush=True)

    columns = [("dtype", "dtype", ""), ("H", "H", "d"), ("D", "D", "d"), ("S", "S", "d"),
               ("ours ms", "ours_ms", ".2f"), ("ours GFLOP/s", "ours_gflops", ".1f")]
    columns += [(f"{b.name} ms", f"{b.name}_ms", ".2f") for b in bases]
    columns += [(f"ours/{b.name}", f"ratio_{b.name}", ".2f") for b in bases]
    columns += [("rel err", "rel_diff", ".1e")]
    print()
    print_table(rows, columns)

    summary = summarize(rows, bases)
    print()
    for dtype, entry in summary.items():
        parts = [f"vs {key[len('ratio_'):]} geomean {v['geomean']:.2f}x min {v['min']:.2f}x"
                 for key, v in entry.items() if key.startswith("ratio_")]
        print(f"{dtype} (S >= {TARGET_MIN_S}, {entry['shapes']} shapes): " + "; ".join(parts))
        print(f"{dtype}: target ours >= 1.0x torch at S >= {TARGET_MIN_S}: "
              f"{'met' if entry['target_met'] else 'not met'}")

    if not args.no_json:
        extra = {"args": vars(args), "backend": args.backend, "baselines": [b.name for b in bases],
                 "timing": timing, "summary": summary}
        write_json("flash_fwd", rows, extra, device=device, out_dir=args.out_dir, tmp=args.quick)


if __name__ == "__main__":
    main()

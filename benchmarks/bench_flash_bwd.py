"""Attention backward: our CPU kernel against torch's CPU flash attention on the same inputs, in one run.

    python benchmarks/bench_flash_bwd.py             # CPU sweep (several minutes on 2 cores)
    python benchmarks/bench_flash_bwd.py --quick     # smoke run (seconds)

Two timings per shape, each ours against torch's, interleaved call by call:
- "fwd+bwd": ours is `cp_attention.flash_attn(q, k, v, backend="cpu", return_lse=True)` followed by
  `torch.autograd.grad(out, (q, k, v), dout)` (the op's registered autograd, i.e. `flash_attn_bwd`);
  torch's is `F.scaled_dot_product_attention` under `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` on BHSD views
  of the very same BSHD tensors (`q.transpose(1, 2)`, no copy), then the same autograd call.
- "bwd": the backward ops alone, from a saved forward: `cp_attention.ops.flash_attn_bwd` against
  `aten._scaled_dot_product_flash_attention_for_cpu_backward` (what torch's SDPA backward runs on CPUs).

FLOP counts: forward 4 * B * H * D * (visible query-key pairs) (two matmuls), backward 2.5x that (five
matmuls: Q K^T again, dO V^T, P^T dO, dS^T Q, dS K), so fwd+bwd is 3.5x. Every shape's gradients are
checked against torch's before anything is timed, so a wrong kernel cannot post a number. Ratios are torch
time / our time: above 1.0 means we are faster.

Peak memory: each backward op is run once more with the process's peak resident set reset
(/proc/self/clear_refs) and freed heap memory handed back first (malloc_trim); the growth of the peak over
the resident set before the call is what the call needed, outputs included. A materialised score matrix
would need Sq * Sk * H * 4 bytes; the table prints the growth as a fraction of that.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import (
    DTYPES,
    SHORT,
    TIME_UP_EXIT,
    apply_common,
    attn_fwd_flops,
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

# Gradient error allowed relative to max|grad| of torch's result. Both kernels accumulate in float32; half
# types differ by where each rounds (torch takes Delta from the rounded out, ours recomputes it in float32).
GRAD_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}

# The summary's shapes: the sequence lengths where the target (fwd+bwd >= 1.0x torch) is judged.
TARGET_MIN_S = 1024
BWD_FLOP_FACTOR = 2.5


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    D: int
    S: int
    causal: bool


FULL_SEQS = (1024, 2048, 4096)


def shapes_for(quick: bool, seqs: tuple[int, ...] = FULL_SEQS, heads: int = 8) -> list[Shape]:
    """B = 1, H = 8 by default: one S = 4096, D = 128 fwd+bwd is ~0.24 TFLOP, about a second on 2 cores."""
    if quick:
        return [Shape(1, 2, 64, 256, False), Shape(1, 2, 128, 256, True)]
    return [Shape(1, heads, D, S, causal) for causal in (False, True) for D in (64, 128) for S in seqs]


# ---------------------------------------------------------------------------------------------- memory
_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Growth of the process's peak resident set over its resident set just before `fn()`: memory that the
    call touched and had not before, its outputs included. None where Linux's counters are missing. Freed
    heap pages are returned to the kernel first, so the call cannot hide buffers in memory that is already
    resident (large buffers are mmapped and returned anyway)."""
    if _libc is None or not _CLEAR_REFS.exists():
        return None
    gc.collect()
    _libc.malloc_trim(0)
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return max(0, peak - before) * 1024


# ---------------------------------------------------------------------------------------------- run
def make_inputs(shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v, dout [B, S, H, D] of dtype (BSHD, contiguous), q, k, v requiring gradients."""
    gen = torch.Generator().manual_seed(4321 + shape.S + 7 * shape.H + 13 * shape.D + shape.causal)
    dims = (shape.B, shape.S, shape.H, shape.D)
    q, k, v, dout = (torch.randn(*dims, generator=gen).to(dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def check_grads(shape: Shape, dtype: torch.dtype, ours: tuple, ref: tuple) -> dict:
    """Compares our (dq, dk, dv) with torch's (all BSHD). Returns the relative differences, or on a mismatch
    {"failed": reason}: the shape is then not timed."""
    row, bad = {}, []
    for name, x, r in zip(("dq", "dk", "dv"), ours, ref):
        x, r = x.float(), r.float()
        scale = r.abs().max().item()
        rel = (x - r).abs().max().item() / max(scale, 1e-30)
        row[f"{name}_rel_diff"] = rel
        if not torch.isfinite(x).all():
            bad.append(f"{name} has non-finite values")
        elif not rel <= GRAD_RTOL[dtype]:
            bad.append(f"{name}: max|diff| is {rel:.3e} of max|{name}| {scale:.3e} "
                       f"(allowed {GRAD_RTOL[dtype]:.0e})")
    if bad:
        reason = (f"FAILED gradient check vs torch at {SHORT[dtype]} B={shape.B} H={shape.H} D={shape.D} "
                  f"S={shape.S} causal={shape.causal}: " + "; ".join(bad) + ". No timing recorded.")
        print(reason, flush=True)
        return {"failed": reason}
    return row


def bench_shape(shape: Shape, dtype: torch.dtype, timing: dict) -> dict:
    B, H, D, S, causal = shape.B, shape.H, shape.D, shape.S, shape.causal
    q, k, v, dout = make_inputs(shape, dtype)
    qt, kt, vt, dout_t = (x.transpose(1, 2) for x in (q, k, v, dout))  # BHSD views of the same data
    scale = 1.0 / math.sqrt(D)
    inputs = (q, k, v)
    flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731

    def ours_fwd_bwd():
        out, _ = cp_attention.flash_attn(q, k, v, scale=scale, causal=causal, backend="cpu", return_lse=True)
        return torch.autograd.grad(out, inputs, dout)

    def torch_fwd_bwd():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
        return torch.autograd.grad(out, inputs, dout_t)

    # Saved forwards for the backward-only timings (S == Sk, so torch's top-left causal mask is ours).
    with torch.no_grad():
        out, lse = ops.flash_attn_fwd(q, k, v, scale, causal)
        t_out, t_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=scale)

    def ours_bwd():
        return ops.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal)

    def torch_bwd():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_t, qt, kt, vt, t_out, t_lse, 0.0, causal, scale=scale)

    fwd = attn_fwd_flops(B, H, S, S, D, causal)
    row = {"dtype": SHORT[dtype], "B": B, "H": H, "D": D, "S": S, "causal": causal, "fwd_flops": fwd,
           "bwd_flops": BWD_FLOP_FACTOR * fwd, "fwd_bwd_flops": (1 + BWD_FLOP_FACTOR) * fwd,
           "score_matrix_bytes": S * S * H * 4}

    # Correctness first: both of our paths against torch's autograd result.
    with flash():
        ref = torch_fwd_bwd()
    checked = check_grads(shape, dtype, ours_fwd_bwd(), ref)
    if "failed" not in checked:
        checked = check_grads(shape, dtype, ours_bwd(), tuple(g.transpose(1, 2) for g in torch_bwd()))
    row.update(checked)
    if "failed" in row:
        return row
    del ref

    fns = {"ours_fwd_bwd": ours_fwd_bwd, "torch_fwd_bwd": torch_fwd_bwd, "ours_bwd": ours_bwd,
           "torch_bwd": torch_bwd}
    stats = time_interleaved(fns, contexts={"torch_fwd_bwd": flash}, **timing)
    for name, st in stats.items():
        row[name] = st
        row[f"{name}_ms"] = st["median"]
        row[f"{name}_gflops"] = gflops(row["fwd_bwd_flops" if "fwd" in name else "bwd_flops"], st["median"])
    row["ratio_fwd_bwd"] = row["torch_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
    row["ratio_bwd"] = row["torch_bwd_ms"] / row["ours_bwd_ms"]

    row["ours_bwd_peak_extra_bytes"] = peak_extra_bytes(ours_bwd)
    row["torch_bwd_peak_extra_bytes"] = peak_extra_bytes(torch_bwd)
    row["grad_bytes"] = 3 * q.numel() * q.element_size()
    for side in ("ours", "torch"):
        extra = row[f"{side}_bwd_peak_extra_bytes"]
        row[f"{side}_peak_vs_scores"] = None if extra is None else extra / row["score_matrix_bytes"]
    return row


def summarize(rows: list[dict]) -> dict:
    """Per dtype over S >= TARGET_MIN_S: geometric mean and minimum of both ratios, the target (fwd+bwd >=
    1.0x torch at every shape) and the largest peak extra memory as a fraction of a score matrix."""
    summary = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        big = [r for r in rows if r["dtype"] == dtype and r["S"] >= TARGET_MIN_S and "ratio_fwd_bwd" in r]
        if not big:
            continue
        entry = {"shapes": len(big)}
        for key in ("ratio_fwd_bwd", "ratio_bwd"):
            vals = [r[key] for r in big]
            entry[key] = {"geomean": geomean(vals), "min": min(vals)}
        peaks = [r["ours_peak_vs_scores"] for r in big if r.get("ours_peak_vs_scores") is not None]
        entry["ours_peak_vs_scores_max"] = max(peaks) if peaks else None
        entry["targets"] = {"fwd+bwd >= 1.0x torch": entry["ratio_fwd_bwd"]["min"] >= 1.0}
        summary[dtype] = entry
    return summary


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--seqs", default=",".join(map(str, FULL_SEQS)),
                   help="comma-separated sequence lengths of the full sweep (Sq = Sk)")
    p.add_argument("--heads", type=int, default=8, help="heads H of the full sweep (B = 1)")
    args = p.parse_args()
    apply_common(args)
    dtypes = parse_dtypes(args.dtypes)
    timing = timing_from_args(args, warmup=1, warmup_s=(0.05, 0.3), budget_s=(0.1, 1.0), min_iters=(2, 3))
    print(f"bench_flash_bwd: ours = cp_attention.flash_attn(backend='cpu') + flash_attn_bwd, "
          f"{torch.get_num_threads()} threads; torch: SDPA flash (CPU); backward FLOPs = "
          f"{BWD_FLOP_FACTOR}x forward's")

    def produce(rows: list[dict]) -> None:
        # measure_rows runs this under inference mode; autograd needs it off.
        with torch.inference_mode(False), torch.enable_grad():
            for dtype in dtypes:
                for shape in shapes_for(args.quick, tuple(int(x) for x in args.seqs.split(",")), args.heads):
                    row = bench_shape(shape, dtype, timing)
                    rows.append(row)
                    head = (f"  {row['dtype']} B={shape.B} H={shape.H} D={shape.D} S={shape.S} "
                            f"causal={int(shape.causal)}: ")
                    if "failed" in row:
                        print(head + "FAILED", flush=True)
                        continue
                    print(head + f"fwd+bwd ours {row['ours_fwd_bwd_ms']:.1f} ms torch "
                          f"{row['torch_fwd_bwd_ms']:.1f} ms (x{row['ratio_fwd_bwd']:.2f}); bwd ours "
                          f"{row['ours_bwd_ms']:.1f} ms torch {row['torch_bwd_ms']:.1f} ms "
                          f"(x{row['ratio_bwd']:.2f})", flush=True)

    rows, cut_short = measure_rows("bench_flash_bwd", produce)

    for r in rows:
        for side in ("ours", "torch"):
            extra = r.get(f"{side}_bwd_peak_extra_bytes")
            r[f"{side}_peak_mb"] = None if extra is None else extra / 2**20
        r["scores_mb"] = r["score_matrix_bytes"] / 2**20
        r["causal_int"] = int(r["causal"])
    columns = [("dtype", "dtype", ""), ("H", "H", "d"), ("D", "D", "d"), ("S", "S", "d"),
               ("causal", "causal_int", "d"),
               ("ours f+b ms", "ours_fwd_bwd_ms", ".1f"), ("torch f+b ms", "torch_fwd_bwd_ms", ".1f"),
               ("ours f+b GFLOP/s", "ours_fwd_bwd_gflops", ".1f"),
               ("torch f+b GFLOP/s", "torch_fwd_bwd_gflops", ".1f"), ("ratio f+b", "ratio_fwd_bwd", ".2f"),
               ("ours bwd ms", "ours_bwd_ms", ".1f"), ("torch bwd ms", "torch_bwd_ms", ".1f"),
               ("ours bwd GFLOP/s", "ours_bwd_gflops", ".1f"),
               ("torch bwd GFLOP/s", "torch_bwd_gflops", ".1f"),
               ("ratio bwd", "ratio_bwd", ".2f"),
               ("ours bwd peak MB", "ours_peak_mb", ".1f"), ("torch bwd peak MB", "torch_peak_mb", ".1f"),
               ("scores MB", "scores_mb", ".0f"), ("ours peak/scores", "ours_peak_vs_scores", ".3f")]
    print()
    print_table(rows, columns)

    summary = summarize(rows)
    print()
    for dtype, entry in summary.items():
        fb, bw = entry["ratio_fwd_bwd"], entry["ratio_bwd"]
        print(f"{dtype} (S >= {TARGET_MIN_S}, {entry['shapes']} shapes): "
              f"fwd+bwd geomean {fb['geomean']:.2f}x "
              f"min {fb['min']:.2f}x; bwd geomean {bw['geomean']:.2f}x min {bw['min']:.2f}x; "
              f"ours peak extra <= {entry['ours_peak_vs_scores_max'] or float('nan'):.3f} of a score matrix")
        for name, met in entry["targets"].items():
            print(f"{dtype} target {name}: {'met' if met else 'not met'}")

    if not args.no_json:
        extra = {"args": vars(args), "timing": timing, "bwd_flop_factor": BWD_FLOP_FACTOR, "summary": summary,
                 "partial": cut_short}
        write_json("flash_bwd", rows, extra, out_dir=args.out_dir, tmp=args.quick)
    failures = [r["failed"] for r in rows if "failed" in r]
    if failures:
        sys.exit(f"bench_flash_bwd: {len(failures)} gradient check(s) failed:\n" + "\n".join(failures))
    if cut_short:
        sys.exit(TIME_UP_EXIT)


if __name__ == "__main__":
    main()

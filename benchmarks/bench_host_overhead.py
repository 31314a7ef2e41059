"""Host time per call (microseconds) of our Python API, beside the raw ops and torch's SDPA.

    python benchmarks/bench_host_overhead.py [--device cuda] [--quick]

Inputs are tiny (B=1, S=8, H=2, D=16), so a call's time is the host's: argument checks, backend choice,
dispatch and launch. That matters because a ring step over a small chunk can take less GPU time than the
Python around its launch, and then the GPU waits for the host. On a GPU the calls are not synchronized one
by one (the host runs ahead, as in inference); the loop ends with one sync. Every function runs in turns with
the others, many calls per turn; the median over turns is reported.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import apply_common, make_parser, print_table, write_json  # noqa: E402

import cp_attention  # noqa: E402

OPS = torch.ops.cp_attention


def calls(device: torch.device) -> dict:
    """name -> zero-argument call; "torch sdpa" is the baseline."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=gen).to(device, dtype) for _ in range(3))
    out = torch.zeros(1, 8, 2, 16, device=device)
    lse = torch.full((1, 2, 8), float("-inf"), device=device)
    part_out, part_lse = cp_attention.flash_attn(q, k, v, return_lse=True)
    own = "cuda" if device.type == "cuda" else "cpu"
    fns = {
        "torch sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2)),
        "op flash_attn_fwd": lambda: OPS.flash_attn_fwd(q, k, v, None, False, None),
        f"flash_attn(backend={own!r})": lambda: cp_attention.flash_attn(q, k, v, return_lse=True,
                                                                        backend=own),
        "flash_attn(auto)": lambda: cp_attention.flash_attn(q, k, v, return_lse=True),
        "op flash_attn_fwd_acc_": lambda: OPS.flash_attn_fwd_acc_(q, k, v, out, lse, None, False, None),
        f"flash_attn_acc_(backend={own!r})": lambda: cp_attention.flash_attn_acc_(q, k, v, out, lse,
                                                                                  backend=own),
        "flash_attn_acc_(auto)": lambda: cp_attention.flash_attn_acc_(q, k, v, out, lse),
        "op merge_attn_states_": lambda: OPS.merge_attn_states_(out, lse, part_out, part_lse),
        "merge_attn_states_": lambda: cp_attention.merge_attn_states_(out, lse, part_out, part_lse),
    }
    if "triton" in cp_attention.available_backends(device) and device.type == "cuda":
        fns["flash_attn(backend='triton')"] = lambda: cp_attention.flash_attn(q, k, v, return_lse=True,
                                                                              backend="triton")
        fns["flash_attn_acc_(backend='triton')"] = lambda: cp_attention.flash_attn_acc_(q, k, v, out, lse,
                                                                                        backend="triton")
    return fns


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    apply_common(args)
    device = torch.device(args.device)
    per_turn, turns = (50, 5) if args.quick else (200, 25)
    fns = calls(device)
    samples = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: first-call costs (lookups, Triton compiles) are not overhead
            for _ in range(20):
                fn()
        for _ in range(turns):
            for name, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(per_turn):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples[name].append((time.perf_counter() - t0) / per_turn * 1e6)
    base = statistics.median(samples["torch sdpa"])
    rows = [{"call": name, "us": statistics.median(s), "x_torch": statistics.median(s) / base}
            for name, s in samples.items()]
    print(f"bench_host_overhead: host microseconds per call on {device} (tiny inputs; median of {turns} "
          f"turns of {per_turn} calls)")
    print_table(rows, [("call", "call", ""), ("us/call", "us", ".1f"), ("x torch sdpa", "x_torch", ".2f")])
    if not args.no_json:
        write_json("host_overhead", rows, {"args": vars(args)}, device=device, out_dir=args.out_dir,
                   tmp=args.quick)


if __name__ == "__main__":
    main()

"""Merging partial attention states (GB/s): our merge ops against a plain torch merge and the device's copy.

    python benchmarks/bench_merge.py [--device cuda] [--quick]

Three calls per shape, interleaved: the in-place merge a ring step makes (float32 accumulator (out, lse)
merged with a chunk's (out_b, lse_b) in q's dtype), the functional merge (both sides in q's dtype), and the
same math in plain torch ops. GB/s counts the bytes each merge must move (read both sides, write the result)
once; "copy GB/s" is `dst.copy_(src)` over a tensor of the same size as out, the device's copy bandwidth,
and "% of copy" compares our in-place merge with it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    DTYPES,
    TIME_UP_EXIT,
    apply_common,
    gbps,
    make_parser,
    measure_rows,
    parse_dtypes,
    print_table,
    time_interleaved,
    timing_from_args,
    write_json,
)

import cp_attention  # noqa: E402, F401  (registers the ops)


class Shape(NamedTuple):
    name: str
    B: int
    S: int
    H: int
    D: int


def shapes_for(quick: bool, device: torch.device) -> list[Shape]:
    if quick:
        return [Shape("tiny", 1, 512, 4, 64)]
    shapes = [Shape("flux-1024/4 ranks", 1, 1152, 24, 128), Shape("flux-1024", 1, 4608, 24, 128)]
    if device.type == "cuda":
        shapes += [Shape("wan-720p/8 ranks", 1, 9450, 40, 128), Shape("wan-720p", 1, 75600, 40, 128)]
    return shapes


def torch_merge(out_a, lse_a, out_b, lse_b):
    """The merge of docs/design.md, "Merging partial results", in plain torch ops (float32 math; -inf sides
    guarded)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    ca, cb = (wa * inv).transpose(1, 2)[..., None], (wb * inv).transpose(1, 2)[..., None]
    a = torch.where(ca > 0, out_a.float() * ca, 0.0)
    b = torch.where(cb > 0, out_b.float() * cb, 0.0)
    return (a + b).to(torch.promote_types(out_a.dtype, out_b.dtype)), lse


def our_backends(device: torch.device) -> dict[str, tuple]:
    """{name: (functional merge, in-place merge)} of ours on this device."""
    ops = torch.ops.cp_attention
    found = {"cp": (ops.merge_attn_states, ops.merge_attn_states_)}
    if device.type == "cuda" and hasattr(ops, "triton_merge_attn_states"):
        found["triton"] = (ops.triton_merge_attn_states, ops.triton_merge_attn_states_)
    return found


def bench_shape(shape: Shape, dtype: torch.dtype, device: torch.device, timing: dict) -> dict:
    B, S, H, D = shape.B, shape.S, shape.H, shape.D
    gen = torch.Generator().manual_seed(0)

    def state(out_dtype):
        out = torch.randn(B, S, H, D, generator=gen).to(device=device, dtype=out_dtype)
        lse = (torch.randn(B, H, S, generator=gen) * 3).to(device)
        return out, lse

    acc, acc_lse = state(torch.float32)
    out_a, lse_a = state(dtype)
    out_b, lse_b = state(dtype)
    src, dst = torch.empty_like(out_a), torch.empty_like(out_a)
    fns = {"torch": lambda: torch_merge(out_a, lse_a, out_b, lse_b), "copy": lambda: dst.copy_(src)}
    want = torch_merge(out_a, lse_a, out_b, lse_b)
    for name, (merge, merge_) in our_backends(device).items():
        got = merge(out_a, lse_a, out_b, lse_b)
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        fns[name] = lambda merge=merge: merge(out_a, lse_a, out_b, lse_b)
        # Merging the same chunk again and again keeps the state finite (lse grows by at most log 2).
        fns[f"{name}_inplace"] = lambda merge_=merge_: merge_(acc, acc_lse, out_b, lse_b)
    stats = time_interleaved(fns, device=device, **timing)

    elt = torch.empty((), dtype=dtype).element_size()
    n, n_lse = B * S * H * D, B * H * S
    moved = {"functional": 3 * n * elt + 3 * n_lse * 4,              # out_a, out_b in; out out; 3 lse
             "inplace": (2 * 4 + elt) * n + 3 * n_lse * 4,          # acc read + written, out_b read
             "copy": 2 * n * elt}
    row = {"shape": shape.name, "B": B, "S": S, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
           "MB": n * elt / 1e6}
    for name, st in stats.items():
        kind = "copy" if name == "copy" else ("inplace" if name.endswith("_inplace") else "functional")
        row[name] = st
        row[f"{name}_ms"] = st["median"]
        row[f"{name}_gbps"] = gbps(moved[kind], st["median"])
    for name in our_backends(device):
        row[f"{name}_vs_torch"] = row["torch_ms"] / row[f"{name}_ms"]
        row[f"{name}_inplace_pct_copy"] = 100 * row[f"{name}_inplace_gbps"] / row["copy_gbps"]
    return row


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtypes", default="bfloat16", help=f"comma-separated, from {', '.join(DTYPES)}")
    args = p.parse_args()
    apply_common(args)
    device = torch.device(args.device)
    dtypes = parse_dtypes(args.dtypes)
    timing = timing_from_args(args, warmup=3, budget_s=(0.05, 0.5), min_iters=(3, 10))
    backends = list(our_backends(device))
    print(f"bench_merge: merge ops {backends} vs plain torch on {device}, {torch.get_num_threads()} threads")

    def produce(rows: list[dict]) -> None:
        for dtype in dtypes:
            for shape in shapes_for(args.quick, device):
                row = bench_shape(shape, dtype, device, timing)
                rows.append(row)
                print(f"  {row['dtype']} {shape.name}: " + ", ".join(
                    f"{b} {row[f'{b}_gbps']:.1f} / in place {row[f'{b}_inplace_gbps']:.1f} GB/s "
                    f"({row[f'{b}_inplace_pct_copy']:.0f}% of copy)" for b in backends)
                    + f"; torch {row['torch_gbps']:.1f}, copy {row['copy_gbps']:.1f} GB/s", flush=True)

    rows, cut_short = measure_rows("bench_merge", produce)
    columns = [("dtype", "dtype", ""), ("shape", "shape", ""), ("MB", "MB", ".1f")]
    for b in backends:
        columns += [(f"{b} GB/s", f"{b}_gbps", ".1f"), (f"{b} in-place GB/s", f"{b}_inplace_gbps", ".1f"),
                    (f"{b}/torch", f"{b}_vs_torch", ".2f"),
                    (f"{b} % of copy", f"{b}_inplace_pct_copy", ".0f")]
    columns += [("torch GB/s", "torch_gbps", ".1f"), ("copy GB/s", "copy_gbps", ".1f")]
    print()
    print_table(rows, columns)
    if not args.no_json:
        write_json("merge", rows, {"args": vars(args), "timing": timing, "backends": backends,
                                   "partial": cut_short}, device=device, out_dir=args.out_dir, tmp=args.quick)
    if cut_short:
        sys.exit(TIME_UP_EXIT)


if __name__ == "__main__":
    main()

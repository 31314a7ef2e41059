"""Ulysses pack/unpack ops (GB/s) against the plain torch route (permute + contiguous, split, cat).

Each op moves every element once between the BSHD tensors and the flat all-to-all buffer; the torch route
builds the same buffer from views with permute/contiguous and cat. Both are checked equal (bit for bit)
before timing; GB/s counts the bytes read plus written once (the minimum traffic), for both.
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
    geomean,
    make_parser,
    measure_rows,
    parse_dtypes,
    print_table,
    time_interleaved,
    timing_from_args,
    write_json,
)

import cp_attention  # noqa: E402, F401  (registers the ops)

OPS = torch.ops.cp_attention


class Shape(NamedTuple):
    name: str
    B: int
    S: int  # global sequence length (S / P per rank)
    H: int
    D: int
    P: int  # Ulysses degree


def shapes_for(quick: bool, device: torch.device) -> list[Shape]:
    if quick:
        return [Shape("tiny", 1, 256, 8, 64, 2)]
    shapes = [Shape("flux-1024", 1, 4608, 24, 128, 2), Shape("flux-1024", 1, 4608, 24, 128, 4),
              Shape("flux-1024", 1, 4608, 24, 128, 8), Shape("pixart", 2, 4096, 16, 72, 4)]
    if device.type == "cuda":
        shapes += [Shape("wan-480p", 1, 32760, 40, 128, 8)]
    return shapes


# ------------------------------------------------------------------------------------ the torch route
def torch_pack_seq_to_head(q, k, v, P):
    """[dest][q heads | k heads | v heads], each [B, S_local, h, D]: permute + contiguous, then cat."""
    parts = []
    for t in (q, k, v):
        B, S, Ht, D = t.shape
        parts.append(t.reshape(B, S, P, Ht // P, D).permute(2, 0, 1, 3, 4).contiguous().reshape(P, -1))
    return torch.cat(parts, dim=1).reshape(-1)


def torch_unpack_seq_to_head(recv, P, B, s, h, D):
    """The receive buffer (P equal sources of s positions) -> q, k, v [B, P * s, h, D]."""
    blocks = recv.view(P, -1)
    n = B * s * h * D
    return [blocks[:, i * n:(i + 1) * n].reshape(P, B, s, h, D).permute(1, 0, 2, 3, 4).reshape(B, P * s, h, D)
            for i in range(3)]


def torch_pack_head_to_seq(out, seq_lens):
    return torch.cat([c.reshape(-1) for c in out.split(seq_lens, dim=1)])


def torch_unpack_head_to_seq(recv, P, B, s, h, D):
    return recv.view(P, B, s, h, D).permute(1, 2, 0, 3, 4).reshape(B, s, P * h, D)


# ------------------------------------------------------------------------------------------ benchmark
def bench_shape(shape: Shape, dtype: torch.dtype, device: torch.device, timing: dict) -> list[dict]:
    B, S, H, D, P = shape.B, shape.S, shape.H, shape.D, shape.P
    s, h = S // P, H // P
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(B, s, H, D), rand(B, s, H, D), rand(B, s, H, D)  # this rank's sequence chunk
    recv_seq = rand(P * B * s * 3 * h * D)  # what the seq -> head all-to-all delivers
    out_h = rand(B, S, h, D)                # attention output for this rank's heads
    recv_head = rand(P * B * s * h * D)     # what the head -> seq all-to-all delivers
    lens = [s] * P
    cases = {
        "pack_seq_to_head": (lambda: OPS.a2a_pack_seq_to_head(q, k, v, P),
                             lambda: torch_pack_seq_to_head(q, k, v, P), 3 * q.numel()),
        "unpack_seq_to_head": (lambda: OPS.a2a_unpack_seq_to_head(recv_seq, lens, B, h, h, D),
                               lambda: torch_unpack_seq_to_head(recv_seq, P, B, s, h, D), recv_seq.numel()),
        "pack_head_to_seq": (lambda: OPS.a2a_pack_head_to_seq(out_h, lens),
                             lambda: torch_pack_head_to_seq(out_h, lens), out_h.numel()),
        "unpack_head_to_seq": (lambda: OPS.a2a_unpack_head_to_seq(recv_head, [h] * P, B, s, D),
                               lambda: torch_unpack_head_to_seq(recv_head, P, B, s, h, D), recv_head.numel()),
    }
    rows = []
    for op, (ours, base, elems) in cases.items():
        got, want = ours(), base()
        got = got if isinstance(got, (list, tuple)) else [got]
        want = want if isinstance(want, (list, tuple)) else [want]
        for g, w in zip(got, want, strict=True):
            if not torch.equal(g, w):
                raise AssertionError(f"{op} {shape} {dtype}: our op and the torch route disagree")
        stats = time_interleaved({"ours": ours, "torch": base}, device=device, **timing)
        nbytes = 2 * elems * torch.empty((), dtype=dtype).element_size()  # read once, write once
        row = {"op": op, "shape": shape.name, "B": B, "S": S, "H": H, "D": D, "P": P,
               "dtype": str(dtype).replace("torch.", ""), "MB": nbytes / 2 / 1e6,
               "ours_ms": stats["ours"]["median"], "torch_ms": stats["torch"]["median"],
               "ours": stats["ours"], "torch": stats["torch"]}
        row["ours_gbps"] = gbps(nbytes, row["ours_ms"])
        row["torch_gbps"] = gbps(nbytes, row["torch_ms"])
        row["speedup"] = row["torch_ms"] / row["ours_ms"]
        rows.append(row)
        print(f"  {row['dtype']} {shape.name} P={P} {op}: ours {row['ours_gbps']:.1f} GB/s, torch "
              f"{row['torch_gbps']:.1f} GB/s, x{row['speedup']:.2f}", flush=True)
    return rows


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtypes", default="bfloat16,float32", help=f"comma-separated, from {', '.join(DTYPES)}")
    args = p.parse_args()
    apply_common(args)
    device = torch.device(args.device)
    dtypes = parse_dtypes(args.dtypes)
    timing = timing_from_args(args, warmup=2, budget_s=(0.05, 0.5), min_iters=(3, 10))
    print(f"bench_a2a_pack: Ulysses pack/unpack ops vs permute+contiguous on {device}, "
          f"{torch.get_num_threads()} threads")

    def produce(rows: list[dict]) -> None:
        for dtype in dtypes:
            for shape in shapes_for(args.quick, device):
                rows += bench_shape(shape, dtype, device, timing)

    rows, cut_short = measure_rows("bench_a2a_pack", produce)
    print()
    print_table(rows, [("dtype", "dtype", ""), ("shape", "shape", ""), ("P", "P", "d"), ("op", "op", ""),
                       ("MB", "MB", ".1f"), ("ours GB/s", "ours_gbps", ".1f"),
                       ("torch GB/s", "torch_gbps", ".1f"), ("ours/torch", "speedup", ".2f")])
    summary = {op: geomean([r["speedup"] for r in rows if r["op"] == op]) for op in dict.fromkeys(
        r["op"] for r in rows)}
    print()
    print("speedup over the torch route (geomean): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    if not args.no_json:
        extra = {"args": vars(args), "timing": timing, "summary": summary, "partial": cut_short}
        write_json("a2a_pack", rows, extra, device=device, out_dir=args.out_dir, tmp=args.quick)
    if cut_short:
        sys.exit(TIME_UP_EXIT)


if __name__ == "__main__":
    main()

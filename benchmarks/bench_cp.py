"""Context-parallel attention per call: ring, Ulysses and Unified beside single-process attention over the
whole sequence and the all-gather baseline (gather K/V, then torch SDPA: what diffusers' ring does).

Launch with torchrun (gloo on CPUs, NCCL on GPUs), for example
    torchrun --nproc_per_node 4 benchmarks/bench_cp.py
Every rank holds its torch.tensor_split chunk of one global problem. A call's time is the slowest rank's
median (each timed call starts after a barrier). Peak memory per rank is the growth over the rank's
memory before the mode ran: torch.cuda.max_memory_allocated on GPUs; on CPUs the peak resident set
(VmHWM, reset through /proc/self/clear_refs), which counts large tensors (they are mmapped) but is coarser.
Each mode's output is checked against single-process attention before timing.

--train times a training call instead: forward, then backward of a fixed random output gradient, with
q, k, v requiring gradients; the baseline's all-gather then reduce-scatters the K/V gradients back to their
owners (gloo has no reduce-scatter: an all-to-all and a sum). Each mode's output and its q, k, v gradients
(the full gradients of this rank's shards) are checked against single-process attention's before timing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DTYPES, apply_common, make_parser, print_table, write_json  # noqa: E402

import cp_attention  # noqa: E402


class Problem(NamedTuple):
    name: str
    B: int
    S: int
    H: int
    D: int


def problems_for(quick: bool, device: torch.device) -> list[Problem]:
    if quick:
        return [Problem("tiny", 1, 96, 4, 32)]
    if device.type == "cuda":
        return [Problem("flux-1024", 1, 4608, 24, 128), Problem("wan-480p", 1, 32760, 40, 128)]
    return [Problem("flux-256", 1, 1024, 24, 64), Problem("flux-512-h8", 1, 4096, 8, 64)]


# --------------------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak bytes above the starting point while the block runs (see the module docstring)."""

    def __init__(self, device):
        self.device, self.peak_mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.start = (_rss_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _rss_kb("VmHWM")
            peak = None if hwm is None else hwm * 1024
        self.peak_mb = None if peak is None else max(0, peak - self.start) / 2**20
        return False


def time_collective(fn, device, warmup: int, iters: int) -> float:
    """Median ms of one call on this rank, every call started together after a barrier."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def slowest(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ------------------------------------------------------------------------------------------- modes
class _GatherSeq(torch.autograd.Function):
    """[B, S_r, H, D] shards of equal length -> the whole [B, S, H, D] on every rank; backward: the
    reduce-scatter of the gradient (each rank's chunk summed over the ranks), as an all-to-all and a sum
    where the backend has no reduce-scatter (gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        P = dist.get_world_size(ctx.group)
        chunks = torch.stack(grad.chunk(P, dim=1)).contiguous()  # [P, B, S_r, H, D]: chunk j goes to rank j
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter_tensor(out, chunks.flatten(0, 1), group=ctx.group)
            return out, None
        received = torch.empty_like(chunks)
        dist.all_to_all_single(received, chunks, group=ctx.group)
        return received.sum(0), None


def allgather_sdpa(q, k, v, group):
    """The baseline: every rank gathers the whole K/V, then runs torch SDPA for its queries. Differentiable
    (the gradients of K/V are reduce-scattered to their owners) when an input requires grad."""
    if k.requires_grad or v.requires_grad:
        k_all, v_all = _GatherSeq.apply(k, group), _GatherSeq.apply(v, group)
    else:
        P = dist.get_world_size(group)
        ks, vs = [torch.empty_like(k) for _ in range(P)], [torch.empty_like(v) for _ in range(P)]
        dist.all_gather(ks, k.contiguous(), group=group)
        dist.all_gather(vs, v.contiguous(), group=group)
        k_all, v_all = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2))
    return out.transpose(1, 2)


def train_call(attn, q, k, v, dout):
    """A call that runs out = attn(q, k, v) on leaves that require grad and backpropagates dout; it returns
    [out, dq, dk, dv]."""
    def fn():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves)
        out.backward(dout)
        return [out.detach(), *(t.grad for t in leaves)]
    return fn


def meshes(P: int) -> list[tuple[str, int, int]]:
    """(mode, ring_degree, ulysses_degree) for world size P."""
    out = [("ring", P, 1), ("ulysses", 1, P)]
    out += [("unified", r, P // r) for r in range(2, P) if P % r == 0]
    return out


def run_problem(prob: Problem, dtype, device, args, cps) -> list[dict]:
    rank, P = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(prob.B, prob.S, prob.H, prob.D, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))
    chunk = torch.tensor_split(torch.arange(prob.S), P)[rank]
    mine = slice(int(chunk[0]), int(chunk[-1]) + 1)
    q_r, k_r, v_r = (t[:, mine].contiguous() for t in (q, k, v))
    if args.train:
        dout = torch.randn(prob.B, prob.S, prob.H, prob.D, generator=gen).to(device=device, dtype=dtype)
        dout_r = dout[:, mine].contiguous()
        # The check: torch's SDPA forward and backward over the whole sequence, this rank's rows of out and
        # of the gradients.
        full = train_call(lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2), q, k, v, dout)()
        want = [t[:, mine] for t in full]
    else:
        want = [cp_attention.flash_attn(q, k, v)[:, mine]]
    rows = []

    def call(attn, full_sequence=False):
        """The timed call of one mode: attn(q, k, v) on this rank's shards (the whole sequence for
        full_sequence), forward only or, with --train, forward and backward."""
        args_ = (q, k, v) if full_sequence else (q_r, k_r, v_r)
        if not args.train:
            return lambda: [attn(*args_)]
        return train_call(attn, *args_, dout if full_sequence else dout_r)

    def add(mode, mesh, fn, check=True):
        err = max((got.float() - w.float()).abs().max().item() for got, w in zip(fn(), want)) if check \
            else 0.0
        err = slowest(err, device)
        with PeakMemory(device) as mem:
            fn()
        ms = slowest(time_collective(fn, device, args.warmup_calls, args.calls), device)
        peak = slowest(mem.peak_mb if mem.peak_mb is not None else float("nan"), device)
        rows.append({"problem": prob.name, "B": prob.B, "S": prob.S, "H": prob.H, "D": prob.D,
                     "dtype": str(dtype).replace("torch.", ""), "world_size": P, "mode": mode, "mesh": mesh,
                     "ms": ms, "peak_mb": peak, "max_err": err, "train": bool(args.train)})
        if rank == 0:
            print(f"  {prob.name} {rows[-1]['dtype']} {mode:<16} {mesh:<5} {ms:9.2f} ms  peak {peak:8.1f} MB"
                  f"  max err {err:.2e}", flush=True)

    # Single-process attention over the whole sequence: rank 0 alone, the others wait.
    whole = call(cp_attention.flash_attn, full_sequence=True)

    def single():
        if rank == 0:
            whole()
    add("single-process", "1", single, check=False)
    world = dist.group.WORLD
    add("allgather+sdpa", f"{P}", call(lambda q_, k_, v_: allgather_sdpa(q_, k_, v_, world)))
    for mode, r, u in meshes(P):
        cp = cps[(r, u)]
        # The global length is stated, as a model that shards its own inputs knows it: after the first call
        # a call moves only its data (no metadata exchange, no host sync). "+exchange": the lengths left
        # unstated, so every call exchanges them first.
        add(mode, f"{r}x{u}", call(lambda q_, k_, v_, cp=cp: cp.attention(q_, k_, v_, seq_lens=prob.S)))
        add(f"{mode}+exchange", f"{r}x{u}", call(lambda q_, k_, v_, cp=cp: cp.attention(q_, k_, v_)))
    base = next(row["ms"] for row in rows if row["mode"] == "allgather+sdpa")
    for row in rows:
        row["speedup_vs_allgather"] = base / row["ms"]
    return rows


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPUs, "
                                                 "float32 on CPUs)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per mode (default 20, quick 3)")
    p.add_argument("--warmup-calls", type=int, default=2, help="untimed calls per mode (default 2)")
    p.add_argument("--train", action="store_true",
                   help="time forward + backward (a training call) instead of the forward alone")
    args = p.parse_args()
    if "RANK" not in os.environ:
        sys.exit("bench_cp.py runs under torchrun, e.g.: torchrun --nproc_per_node 4 benchmarks/bench_cp.py")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if args.threads is None and not use_cuda:
        # The ranks share the machine's cores.
        args.threads = max(1, (os.cpu_count() or 1) // dist.get_world_size())
    apply_common(args)
    args.calls = args.calls or (3 if args.quick else 20)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    P = dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"bench_cp: {P} ranks ({dist.get_backend()}) on {device.type}, {torch.get_num_threads()} "
              f"threads per rank, {dtype}, {'forward + backward' if args.train else 'forward'}")
    cps = {(r, u): cp_attention.ContextParallel(r, u) for _, r, u in meshes(P)}
    rows = []
    with torch.inference_mode(not args.train):
        for prob in problems_for(args.quick, device):
            rows += run_problem(prob, dtype, device, args, cps)
    if dist.get_rank() == 0:
        print()
        print_table(rows, [("problem", "problem", ""), ("S", "S", "d"), ("H", "H", "d"), ("D", "D", "d"),
                           ("mode", "mode", ""), ("mesh", "mesh", ""),
                           ("ms/fwd+bwd" if args.train else "ms/call", "ms", ".2f"),
                           ("vs allgather", "speedup_vs_allgather", ".2f"),
                           ("peak MB/rank", "peak_mb", ".1f"), ("max err", "max_err", ".1e")])
        if not args.no_json:
            name = f"cp-train-ws{P}" if args.train else f"cp-ws{P}"
            write_json(name, rows, {"args": vars(args), "backend": dist.get_backend()}, device=device,
                       out_dir=args.out_dir, tmp=args.quick)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

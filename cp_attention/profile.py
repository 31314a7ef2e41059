"""Measures this machine and writes a HardwareProfile (cp_attention/planner/hardware.py) as JSON for the
planner.

    python -m cp_attention.profile --out profile.json                    # launches torchrun itself (2 ranks)
    python -m cp_attention.profile --out p.json --world-size 4 --quick   # a smaller, faster measurement
    torchrun --standalone --nproc_per_node 2 -m cp_attention.profile --out p.json

Without torchrun the tool checks its arguments (a bad one exits with code 2 and a message naming the option,
before anything is launched) and runs itself under torchrun with --world-size processes. Under torchrun every
rank takes part: gloo ("cpu:gloo") on the CPU, NCCL with one GPU per rank on CUDA. On the CPU each rank gets
cores // world_size threads (as cp_attention.demo does), and every kernel measurement runs on all ranks AT
ONCE (a barrier before each timed call), so the rates are those of ranks that share the machine, as the
planner's runs do; a measurement's time is the slowest rank's median (all_reduce MAX of the per-rank medians).
The CUDA path (NCCL, torch.cuda.synchronize around host timers, bigger shapes) has NOT run on a GPU yet.

What is measured and how it is fitted (times are medians of several timed calls after warm-up):

1. attention_tflops[dtype][head_dim], head_dim 64 and 128: `flash_attn(q, k, v, backend="auto")` forward,
   non-causal, q, k, v [B, S, H, D] (CPU: B*H = 8, S = 1024; --quick: B*H = 4, S = 512), 4*B*H*S*S*D flops
   divided by the slowest rank's time.
2. kernel_half_len h and kernel_overhead_us o: the kernel (first --dtypes dtype, head_dim 128, fixed B*H) at
   Sq = Sk = S for S in 64 ... 2048 (CPU), fitted to the model of HardwareProfile
       time(S) = o + flops(S) / (peak * (S / (S + h))**2),   flops(S) = 4*B*H*S*S*D,
   with peak the step-1 rate of that dtype and head dim. For each h of a log-spaced grid (and 0), o is the
   least-squares value in relative error (weights 1 / time**2, clamped at >= 0); the (h, o) with the least
   sum of squared relative errors wins. The points and the worst point's ratio go to measured.kernel_sweep.
3. gemm_tflops[dtype]: torch.matmul of N x N by N x N (CPU: N = 1024; --quick 512), 2*N**3 flops.
4. links: over the real process group, dist.all_to_all_single at buffers of 4 KiB ... 8 MiB per rank
   (--quick: fewer sizes), fitted to time = latency + bytes / bandwidth by least squares in relative error
   (weights 1 / time**2, so that small and large messages count alike). bytes is what one rank sends to the
   OTHER ranks: buffer * (P - 1) / P (its own chunk stays put), the bytes that leave the device, as the
   Link docstring's per-device one-direction bandwidth counts them. A P2P ring hop (each rank sends the
   whole buffer to rank + 1 and receives one from rank - 1, dist.batch_isend_irecv) is fitted the same way
   with bytes = buffer. One machine is one link level: links = [Link("gloo-local" or "nccl-local",
   span=inf, <all-to-all fit>)]; the P2P fit and every measured point are in the JSON's extra "measured"
   key, which HardwareProfile.from_dict ignores (it reads only the keys it needs). bandwidth_gbs is in
   GB/s = 1e9 bytes/s, latency_us in microseconds.
5. overlap: how much of a ring hop hides behind the step's kernel, in cost.py's terms (a hop costs
   max(0, hop - overlap * step)). At each of two ring-step shapes (first float32 kernel of B*H heads, head
   dim 128, Sq = Sk = S; CPU: S = 256 and 1024) every rank times (a) the kernel alone, (b) the hop alone:
   K and V (each [1, S, B*H, 128] float32) to rank + 1 and from rank - 1 (dist.batch_isend_irecv), and
   (c) the overlapped step: the hop started, the kernel, then the hop waited for. hidden = a + b - c;
   overlap_step = clamp(hidden / a, 0, 1) (hidden time per step time: cost.py's overlap) and overlap_hop =
   clamp(hidden / b, 0, 1) (the fraction of the hop hidden). The profile's overlap is overlap_step at the
   shape whose kernel and hop times are closest (least |log(a / b)|): where the hop is much shorter than
   the kernel, hidden / a is at most b / a however well the two overlap, so such a shape says little.
   Both shapes are in measured.overlap.
6. copy_gbs: dst.copy_(x.transpose(1, 2)) of x [1, S, B*H, 128] float32 (CPU: 32 MiB; --quick 8 MiB) into
   a contiguous [1, B*H, S, 128], the permute that packs and unpacks Ulysses' all-to-all buffers, on every
   rank at once; copy_gbs = bytes read + written (2 * x's bytes) / the slowest rank's median time / 1e9,
   GB/s per rank. Raw: measured.copy.
7. sync_us: the extra cost of one synchronisation point when ranks compute between collectives (on an
   oversubscribed CPU a collective waits for a descheduled rank). Every rank times loops of N iterations
   of t1: the kernel alone, t2: the kernel and then an all_reduce of one element, t3: the all_reduce alone
   (the kernel: float32, B*H heads, head dim 128, Sq = Sk = sync_seq, a few ms: CPU 256, as S = 1024 takes
   over 100 ms at one thread per rank); sync_us = max(0, (t2 - t1 - t3) / N) in microseconds. Raw:
   measured.sync.
Steps 5-7 use the same timing as the rest (all ranks at once, torch.cuda.synchronize around the host
timers on CUDA, the slowest rank's median) but have NOT run on a GPU yet.

Also written: devices_per_node = the world size measured, memory_gb (1e9 bytes; CUDA: the device's memory,
CPU: MemTotal of /proc/meminfo / world size), device (the CPU model or the GPU name), overlap, copy_gbs and
sync_us (steps 5-7, top-level keys) and sources. Rank 0 prints a summary and the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from cp_attention.demo import run_ranks, use_cuda

PROG = "cp_attention.profile"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_DIMS = (64, 128)
# The head dim and dtype of steps 5-7 (overlap, copy, sync).
STEP_HEAD_DIM = 128
STEP_DTYPE = torch.float32
# How long a collective may wait for a peer before the rank raises (a failed rank must not hang the rest).
COLLECTIVE_TIMEOUT_S = 120.0


def _sizes(kib_from: int, kib_to: int, factor: int) -> tuple[int, ...]:
    out, s = [], kib_from
    while s < kib_to:
        out.append(s * 1024)
        s *= factor
    return (*out, kib_to * 1024)


# The measurement's shapes: (device type, quick) -> settings.
#   bh: B*H of the attention shapes (B = 1); seq: step-1 sequence length; sweep: step-2 sequence lengths;
#   gemm: N of the N x N x N matmul; msgs: per-rank buffer bytes of the link measurements;
#   warmup / iters: untimed and timed calls per kernel measurement; comm_iters: timed calls per message size;
#   overlap_seqs: the ring-step shapes of the overlap measurement; copy_mib: the copy's source bytes per rank;
#   sync_seq / sync_n / sync_iters: the sync measurement's kernel, loop length and timed loops.
PLANS = {
    ("cpu", False): dict(bh=8, seq=1024, sweep=(64, 128, 256, 512, 1024, 2048), gemm=1024,
                         msgs=_sizes(4, 8192, 4), warmup=2, iters=9, comm_iters=20,
                         overlap_seqs=(256, 1024), copy_mib=32, sync_seq=256, sync_n=20, sync_iters=5),
    ("cpu", True): dict(bh=4, seq=512, sweep=(64, 128, 256, 512), gemm=512,
                        msgs=(4096, 65536, 1 << 20, 4 << 20), warmup=1, iters=7, comm_iters=15,
                        overlap_seqs=(256, 512), copy_mib=8, sync_seq=256, sync_n=10, sync_iters=3),
    ("cuda", False): dict(bh=16, seq=8192, sweep=(128, 256, 512, 1024, 2048, 4096, 8192, 16384), gemm=8192,
                          msgs=_sizes(4, 256 * 1024, 4), warmup=3, iters=10, comm_iters=20,
                          overlap_seqs=(2048, 8192), copy_mib=256, sync_seq=4096, sync_n=50, sync_iters=5),
    ("cuda", True): dict(bh=16, seq=2048, sweep=(128, 512, 2048, 4096), gemm=4096,
                         msgs=(4096, 1 << 20, 16 << 20, 64 << 20), warmup=2, iters=5, comm_iters=5,
                         overlap_seqs=(2048, 4096), copy_mib=64, sync_seq=2048, sync_n=20, sync_iters=3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="where the profile JSON goes (its folder must exist)")
    p.add_argument("--name", default=None, help="the profile's name (default: measured-<device>-x<world>)")
    p.add_argument("--world-size", type=int, default=2,
                   help="ranks (>= 2: the links are measured between them); without torchrun the tool "
                        "launches torchrun with this many")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one CUDA GPU per rank with NCCL when available, else the CPU with gloo")
    p.add_argument("--dtypes", default="bfloat16,float32",
                   help=f"comma-separated dtypes to measure, some of {','.join(DTYPES)}; the first is the "
                        "one of the kernel_half_len / kernel_overhead_us sweep")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer sizes and calls (a smoke run)")
    return p.parse_args(argv)


def dtype_names(args) -> list[str]:
    return [n.strip() for n in args.dtypes.split(",") if n.strip()]


def problem(args, world: int) -> str | None:
    """Why these arguments cannot run (a message naming the option), or None."""
    names = dtype_names(args)
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        return (f"--dtypes: unknown dtype(s) {', '.join(map(repr, unknown)) or '(none given)'}; expected "
                f"some of {', '.join(DTYPES)}")
    if len(set(names)) != len(names):
        return f"--dtypes: a dtype is named twice in {args.dtypes!r}"
    if world < 2:
        return (f"--world-size must be >= 2 (the all-to-all and ring-hop measurements need peers), "
                f"got {world}")
    out = os.path.abspath(args.out)
    folder = os.path.dirname(out)
    if os.path.isdir(out):
        return f"--out {args.out!r} is a folder; give a file path such as {os.path.join(args.out, 'p.json')}"
    if not os.path.isdir(folder):
        return f"--out: the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK):
        return f"--out: the folder {folder!r} is not writable"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device on this machine"
    if use_cuda(args) and world > torch.cuda.device_count():
        return f"--world-size {world} is more than the {torch.cuda.device_count()} CUDA devices here"
    return None


def _launch(args, argv) -> int:
    """Not under torchrun: run this module under torchrun with --world-size processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.world_size}", "-m", PROG, *argv]
    return subprocess.call(cmd)


# ---------------------------------------------------------------------------------------------------------
# Fits.

def fit_line(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """(a, b) of t = a + b * x by least squares in relative error (weights 1 / t**2). Where the free fit
    gives a <= 0 (noise; a latency too small to see), a is half the smallest t and b is refitted; where b
    still is <= 0 (times that do not grow with x), b is the slope of the largest x's point over a. Both
    come out positive."""
    w = [1.0 / t ** 2 for t in ts]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    st = sum(wi * t for wi, t in zip(w, ts))
    sxt = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    det = sw * sxx - sx * sx
    a, b = ((sxx * st - sx * sxt) / det, (sw * sxt - sx * st) / det) if det > 0 else (0.0, 0.0)
    if a <= 0:
        a = 0.5 * min(ts)
        b = sum(wi * x * (t - a) for wi, x, t in zip(w, xs, ts)) / sxx
    if b <= 0:  # time does not grow with x: the slope that the largest x's point gives over a
        i = max(range(len(xs)), key=lambda j: xs[j])
        b = max(ts[i] - a, 0.5 * ts[i]) / xs[i]
    return a, b


def worst_ratio(pred: list[float], ts: list[float]) -> float:
    """The largest factor between a prediction and its measurement (>= 1)."""
    return max(max(p / t, t / p) for p, t in zip(pred, ts))


def kernel_model(seq: int, flops: float, peak_flops: float, half_len: float, overhead_s: float) -> float:
    """Seconds of one attention call of Sq = Sk = seq under the HardwareProfile model."""
    return overhead_s + flops / (peak_flops * (seq / (seq + half_len)) ** 2)


def clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def overlap_fractions(kernel_s: float, hop_s: float, overlapped_s: float) -> tuple[float, float]:
    """(overlap_step, overlap_hop) from the kernel alone, the hop alone and the two together: the hidden
    time kernel + hop - overlapped over the kernel's time (cost.py's overlap: a hop costs
    max(0, hop - overlap * step)) and over the hop's time, each clamped to [0, 1]."""
    hidden = kernel_s + hop_s - overlapped_s
    return clamp01(hidden / kernel_s), clamp01(hidden / hop_s)


def closest_shape(shapes: list[dict]) -> dict:
    """The overlap shape whose kernel and hop times are closest (least |log(kernel / hop)|)."""
    return min(shapes, key=lambda sh: abs(math.log(sh["kernel_us"] / sh["hop_us"])))


def profile_overlap(shapes: list[dict]) -> tuple[dict, float]:
    """(the chosen shape, the profile's overlap): the shape of closest kernel and hop times, and its
    overlap_step (hidden time / kernel time, cost.py's definition)."""
    chosen = closest_shape(shapes)
    return chosen, chosen["overlap_step"]


def sync_cost_us(kernel_loop_us: float, both_loop_us: float, reduce_loop_us: float, n: int) -> float:
    """The extra microseconds per synchronisation point: max(0, (t2 - t1 - t3) / N)."""
    return max(0.0, (both_loop_us - kernel_loop_us - reduce_loop_us) / n)


def fit_kernel(seqs: list[int], flops: list[float], ts: list[float],
               peak_flops: float) -> tuple[float, float]:
    """(half_len, overhead seconds) of time(S) = o + flops / (peak * (S / (S + h))**2): grid search over h
    (0 and 281 log-spaced values from 0.1 to 1e6, then 200 between the best one's neighbours), with o for
    each h the least-squares value in relative error (weights 1 / time**2), clamped at >= 0."""
    w = [1.0 / t ** 2 for t in ts]

    def err_and_overhead(h):
        compute = [f / (peak_flops * (s / (s + h)) ** 2) for s, f in zip(seqs, flops)]
        o = max(0.0, sum(wi * (t - c) for wi, t, c in zip(w, ts, compute)) / sum(w))
        return sum(((o + c - t) / t) ** 2 for c, t in zip(compute, ts)), o

    grid = [0.0] + [10 ** (-1 + i / 40) for i in range(281)]
    errs = [err_and_overhead(h)[0] for h in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = [lo + (hi - lo) * j / 200 for j in range(201)]
    h = min(fine, key=lambda x: err_and_overhead(x)[0])
    return h, err_and_overhead(h)[1]


# ---------------------------------------------------------------------------------------------------------
# Machine facts.

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def total_ram_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------------------
# One rank.

class RankProfiler:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = use_cuda(args)
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.cuda else \
            torch.device("cpu")
        self.plan = PLANS[(self.device.type, bool(args.quick))]
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = max(1, self.cores // self.world)
        torch.set_num_threads(self.threads)

    def log(self, *a):
        if self.rank == 0:
            print(f"[{PROG}]", *a, flush=True)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def slowest(self, seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def time_all(self, fn, warmup: int, iters: int) -> float:
        """The slowest rank's median seconds of fn(), every rank calling it at the same time (a barrier
        before each timed call)."""
        for _ in range(warmup):
            fn()
        self._sync()
        ts = []
        for _ in range(max(1, iters)):
            dist.barrier()
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            ts.append(time.perf_counter() - t0)
        return self.slowest(statistics.median(ts))

    # -- kernels ------------------------------------------------------------------------------------------
    def qkv(self, dtype, head_dim: int, seq: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device=self.device).manual_seed(1234 + self.rank)
        return tuple(torch.randn(1, seq, self.plan["bh"], head_dim, generator=g, device=self.device).to(dtype)
                     for _ in range(3))

    def attention_seconds(self, dtype, head_dim: int, seq: int) -> float:
        from .attention import flash_attn

        q, k, v = self.qkv(dtype, head_dim, seq)
        plan = self.plan
        return self.time_all(lambda: flash_attn(q, k, v, backend="auto"), plan["warmup"], plan["iters"])

    # -- overlap, copy, sync (steps 5-7) ------------------------------------------------------------------
    def overlap_shape(self, seq: int) -> dict:
        """Kernel alone, hop (K and V to rank + 1, from rank - 1) alone, and the hop started before the
        kernel and waited for after it, at Sq = Sk = seq; the slowest rank's medians in us."""
        from .attention import flash_attn

        q, k, v = self.qkv(STEP_DTYPE, STEP_HEAD_DIM, seq)
        k_in, v_in = torch.empty_like(k), torch.empty_like(v)
        plan = self.plan

        def kernel():
            flash_attn(q, k, v, backend="auto")

        def hop():
            for req in self.start_hop((k, v), (k_in, v_in)):
                req.wait()

        def step():
            reqs = self.start_hop((k, v), (k_in, v_in))
            flash_attn(q, k, v, backend="auto")
            for req in reqs:
                req.wait()

        t_kernel = self.time_all(kernel, plan["warmup"], plan["iters"])
        t_hop = self.time_all(hop, plan["warmup"], plan["iters"])
        t_step = self.time_all(step, plan["warmup"], plan["iters"])
        overlap_step, overlap_hop = overlap_fractions(t_kernel, t_hop, t_step)
        return {"seq": seq, "hop_bytes": k.nbytes + v.nbytes, "kernel_us": t_kernel * 1e6,
                "hop_us": t_hop * 1e6, "overlapped_us": t_step * 1e6, "overlap_step": overlap_step,
                "overlap_hop": overlap_hop}

    def copy_point(self) -> dict:
        """dst.copy_(x.transpose(1, 2)): x [1, S, B*H, D] float32 of copy_mib MiB into a contiguous
        [1, B*H, S, D]; the slowest rank's median in us and the bytes read + written."""
        bh, d = self.plan["bh"], STEP_HEAD_DIM
        seq = self.plan["copy_mib"] * (1 << 20) // (bh * d * 4)
        g = torch.Generator(device=self.device).manual_seed(7 + self.rank)
        x = torch.randn(1, seq, bh, d, generator=g, device=self.device, dtype=torch.float32)
        dst = torch.empty(1, bh, seq, d, device=self.device, dtype=torch.float32)
        t = self.time_all(lambda: dst.copy_(x.transpose(1, 2)), self.plan["warmup"], self.plan["iters"])
        return {"shape": [1, seq, bh, d], "dtype": "float32", "bytes": 2 * x.nbytes, "time_us": t * 1e6,
                "bytes_counted": "read + written: 2 * the source's bytes"}

    def sync_point(self) -> dict:
        """Loops of N: the kernel, the kernel + an all_reduce of one element, the all_reduce alone; the
        slowest rank's median loop times in us."""
        from .attention import flash_attn

        plan = self.plan
        n, seq = plan["sync_n"], plan["sync_seq"]
        q, k, v = self.qkv(STEP_DTYPE, STEP_HEAD_DIM, seq)
        one = torch.zeros(1, device=self.device)

        def kernels():
            for _ in range(n):
                flash_attn(q, k, v, backend="auto")

        def both():
            for _ in range(n):
                flash_attn(q, k, v, backend="auto")
                dist.all_reduce(one)

        def reduces():
            for _ in range(n):
                dist.all_reduce(one)

        t1, t2, t3 = (self.time_all(fn, 1, plan["sync_iters"]) for fn in (kernels, both, reduces))
        return {"n": n, "seq": seq, "kernel_loop_us": t1 * 1e6, "kernel_allreduce_loop_us": t2 * 1e6,
                "allreduce_loop_us": t3 * 1e6}

    def attn_flops(self, head_dim: int, seq: int) -> float:
        return 4.0 * self.plan["bh"] * seq * seq * head_dim

    def gemm_seconds(self, dtype) -> float:
        n = self.plan["gemm"]
        g = torch.Generator(device=self.device).manual_seed(99 + self.rank)
        a, b = (torch.randn(n, n, generator=g, device=self.device).to(dtype) for _ in range(2))
        return self.time_all(lambda: torch.matmul(a, b), self.plan["warmup"], self.plan["iters"])

    # -- links --------------------------------------------------------------------------------------------
    def link_points(self, kind: str) -> list[dict]:
        """[{buffer_bytes, bytes, time_us}] per message size: the slowest rank's median time of one
        all-to-all ("all_to_all", bytes = buffer * (P-1)/P sent to the others) or one ring hop ("p2p",
        bytes = buffer)."""
        p, points = self.world, []
        for size in self.plan["msgs"]:
            n = max(p, size // 4 // p * p)  # float32 elements, divisible by the world size
            x = torch.ones(n, device=self.device)
            y = torch.empty(n, device=self.device)
            if kind == "all_to_all":
                fn = functools.partial(dist.all_to_all_single, y, x)
                sent = 4 * n * (p - 1) // p
            else:
                fn = functools.partial(self.ring_hop, x, y)
                sent = 4 * n
            t = self.time_all(fn, 2, self.plan["comm_iters"])
            points.append({"buffer_bytes": 4 * n, "bytes": sent, "time_us": t * 1e6})
        return points

    def ring_hop(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x to rank + 1, y from rank - 1 (batched, so NCCL pairs the two without a deadlock)."""
        for req in self.start_hop((x,), (y,)):
            req.wait()

    def start_hop(self, sends, recvs) -> list:
        """Starts sends to rank + 1 and receives from rank - 1 (batched); returns the requests to wait on."""
        p = self.world
        return dist.batch_isend_irecv([*(dist.P2POp(dist.isend, x, (self.rank + 1) % p) for x in sends),
                                       *(dist.P2POp(dist.irecv, y, (self.rank - 1) % p) for y in recvs)])

    @staticmethod
    def fit_link(points: list[dict]) -> dict:
        xs = [float(pt["bytes"]) for pt in points]
        ts = [pt["time_us"] * 1e-6 for pt in points]
        lat_s, s_per_byte = fit_line(xs, ts)
        fit = {"latency_us": lat_s * 1e6, "bandwidth_gbs": 1.0 / s_per_byte / 1e9}
        pred = [lat_s + x * s_per_byte for x in xs]
        return dict(fit, worst_point_ratio=worst_ratio(pred, ts), points=points)

    # -- all of it ----------------------------------------------------------------------------------------
    def run(self) -> dict | None:
        t_start = time.perf_counter()
        from .attention import auto_backend
        from .planner.hardware import HardwareProfile, Link  # first: a broken import fails before measuring

        names = dtype_names(self.args)
        plan = self.plan
        self.log(f"{self.world} ranks on {self.device.type}, {self.threads} threads per rank"
                 f"{' (--quick)' if self.args.quick else ''}; attention backend 'auto' = "
                 + ", ".join(f"{n}: {auto_backend(self.device, getattr(torch, n))}" for n in names))
        with torch.inference_mode():
            attn = {}
            for name in names:
                attn[name] = {}
                for d in HEAD_DIMS:
                    t = self.attention_seconds(DTYPES[name], d, plan["seq"])
                    attn[name][d] = self.attn_flops(d, plan["seq"]) / t / 1e12
            self.log("attention rates measured")

            sweep_dtype, sweep_dim = names[0], max(HEAD_DIMS)
            sweep_t = [self.attention_seconds(DTYPES[sweep_dtype], sweep_dim, s) for s in plan["sweep"]]
            sweep_f = [self.attn_flops(sweep_dim, s) for s in plan["sweep"]]
            peak = attn[sweep_dtype][sweep_dim] * 1e12
            half_len, overhead_s = fit_kernel(list(plan["sweep"]), sweep_f, sweep_t, peak)
            sweep_pred = [kernel_model(s, f, peak, half_len, overhead_s)
                          for s, f in zip(plan["sweep"], sweep_f)]
            self.log("kernel sweep measured")

            gemm = {name: 2.0 * plan["gemm"] ** 3 / self.gemm_seconds(DTYPES[name]) / 1e12 for name in names}
            self.log("gemm rates measured")

            a2a = self.fit_link(self.link_points("all_to_all"))
            p2p = self.fit_link(self.link_points("p2p"))
            self.log("links measured")

            shapes = [self.overlap_shape(s) for s in plan["overlap_seqs"]]
            chosen, overlap = profile_overlap(shapes)
            self.log("overlap measured")
            copy = self.copy_point()
            copy_gbs = copy["bytes"] / (copy["time_us"] * 1e-6) / 1e9
            sync = self.sync_point()
            sync_us = sync_cost_us(sync["kernel_loop_us"], sync["kernel_allreduce_loop_us"],
                                   sync["allreduce_loop_us"], sync["n"])
            self.log("copy and sync measured")
        if self.rank != 0:
            return None

        if self.cuda:
            device_name = torch.cuda.get_device_name(self.device)
            memory_gb = torch.cuda.get_device_properties(self.device).total_memory / 1e9
        else:
            device_name = cpu_model()
            memory_gb = total_ram_bytes() / self.world / 1e9
        backend = "nccl" if self.cuda else "gloo"
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        new_fields = {"copy_gbs": copy_gbs, "sync_us": sync_us}  # passed where HardwareProfile has them
        known = {f.name for f in dataclasses.fields(HardwareProfile)}
        profile = HardwareProfile(
            name=self.args.name or f"measured-{slug(device_name)}-x{self.world}",
            device=device_name,
            attention_tflops=attn,
            kernel_half_len=half_len,
            kernel_overhead_us=overhead_s * 1e6,
            gemm_tflops=gemm,
            memory_gb=memory_gb,
            devices_per_node=self.world,
            links=(Link(name=f"{backend}-local", span=math.inf, bandwidth_gbs=a2a["bandwidth_gbs"],
                        latency_us=a2a["latency_us"]),),
            overlap=overlap,
            sources=(f"measured by python -m {PROG} on {today}",),
            **{k: v for k, v in new_fields.items() if k in known},
        )
        measured = {
            "world_size": self.world, "device": self.device.type, "backend": backend,
            "torch": torch.__version__, "threads_per_rank": self.threads, "cores": self.cores,
            "quick": bool(self.args.quick),
            "attention_backend": {n: auto_backend(self.device, getattr(torch, n))
                                  for n in dtype_names(self.args)},
            "attention": {"batch_heads": plan["bh"], "seq": plan["seq"], "head_dims": list(HEAD_DIMS),
                          "flops": "4*B*H*S*S*D, non-causal"},
            "kernel_sweep": {"dtype": sweep_dtype, "head_dim": sweep_dim, "batch_heads": plan["bh"],
                             "peak_tflops": peak / 1e12,
                             "model": "time = overhead + flops / (peak * (S / (S + half_len))**2)",
                             "worst_point_ratio": worst_ratio(sweep_pred, sweep_t),
                             "points": [{"seq": s, "flops": f, "time_us": t * 1e6}
                                        for s, f, t in zip(plan["sweep"], sweep_f, sweep_t)]},
            "gemm": {"n": plan["gemm"], "flops": "2*N**3"},
            "all_to_all": dict(a2a, bytes="per rank, sent to the other ranks: buffer * (P - 1) / P"),
            "p2p": dict(p2p, bytes="per rank, the whole buffer to rank + 1"),
            "overlap": {"dtype": "float32", "head_dim": STEP_HEAD_DIM, "batch_heads": plan["bh"],
                        "chosen_seq": chosen["seq"], "shapes": shapes,
                        "formula": "hidden = kernel + hop - overlapped; overlap_step = clamp(hidden / "
                                   "kernel) (the profile's overlap, at chosen_seq: least |log(kernel / "
                                   "hop)|); overlap_hop = clamp(hidden / hop)"},
            "copy": dict(copy, formula="copy_gbs = bytes / time / 1e9"),
            "sync": dict(sync, dtype="float32", head_dim=STEP_HEAD_DIM, batch_heads=plan["bh"],
                         formula="sync_us = max(0, (kernel_allreduce_loop - kernel_loop - "
                                 "allreduce_loop) / n)"),
            "runtime_s": time.perf_counter() - t_start,
        }
        data = dict(profile.to_dict(), overlap=overlap, copy_gbs=copy_gbs, sync_us=sync_us, measured=measured)
        HardwareProfile.from_dict(data, where="the profile about to be written")  # it must load back
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.args.out)
        self.summary(profile, measured, data)
        return data

    def summary(self, profile, m: dict, data: dict) -> None:
        overlap, copy_gbs, sync_us = data["overlap"], data["copy_gbs"], data["sync_us"]
        print(f"\n{profile.name}: {profile.device}, {m['world_size']} ranks ({m['backend']}, "
              f"{m['threads_per_rank']} threads/rank), torch {m['torch']}")
        a = m["attention"]
        print(f"attention TFLOP/s (flash_attn auto={m['attention_backend']}, B*H={a['batch_heads']}, "
              f"S={a['seq']}, slowest rank):")
        print("  " + "dtype".ljust(10) + "".join(f"D={d}".rjust(10) for d in HEAD_DIMS))
        for name, row in profile.attention_tflops.items():
            print("  " + name.ljust(10) + "".join(f"{row[d]:10.4f}" for d in HEAD_DIMS))
        ks = m["kernel_sweep"]
        seqs = [p["seq"] for p in ks["points"]]
        print(f"kernel: half_len {profile.kernel_half_len:.1f} tokens, overhead "
              f"{profile.kernel_overhead_us:.1f} us (fit on {ks['dtype']} D={ks['head_dim']}, "
              f"S {seqs[0]}..{seqs[-1]}; worst point "
              f"x{ks['worst_point_ratio']:.2f})")
        print(f"gemm TFLOP/s ({m['gemm']['n']}^3): "
              + ", ".join(f"{k} {v:.4f}" for k, v in profile.gemm_tflops.items()))
        for key, label in (("all_to_all", "all-to-all"), ("p2p", "ring hop  ")):
            f = m[key]
            sizes = [p["buffer_bytes"] for p in f["points"]]
            print(f"{label}: latency {f['latency_us']:8.1f} us, bandwidth {f['bandwidth_gbs']:7.3f} GB/s "
                  f"({len(sizes)} buffers {_kib(sizes[0])}..{_kib(sizes[-1])}/rank; worst point "
                  f"x{f['worst_point_ratio']:.2f})")
        ov = m["overlap"]
        for sh in ov["shapes"]:
            print(f"overlap at S={sh['seq']:<5}: kernel {sh['kernel_us']:9.1f} us, hop "
                  f"{sh['hop_us']:8.1f} us ({_kib(sh['hop_bytes'])} K+V), both "
                  f"{sh['overlapped_us']:9.1f} us -> overlap_step "
                  f"{sh['overlap_step']:.3f}, overlap_hop {sh['overlap_hop']:.3f}"
                  f"{'  (chosen)' if sh['seq'] == ov['chosen_seq'] else ''}")
        c, s = m["copy"], m["sync"]
        print(f"copy: {copy_gbs:.3f} GB/s per rank (transpose-copy of {_kib(c['bytes'] // 2)}, "
              f"{c['time_us']:.1f} us, read + written)")
        print(f"sync: {sync_us:.1f} us per sync point (N={s['n']} x kernel S={s['seq']}: "
              f"{s['kernel_loop_us'] / 1e3:.1f} ms; with all_reduce: "
              f"{s['kernel_allreduce_loop_us'] / 1e3:.1f} ms; "
              f"all_reduce alone: {s['allreduce_loop_us'] / 1e3:.2f} ms)")
        print(f"memory {profile.memory_gb:.1f} GB/rank, overlap {overlap:.3f}, copy_gbs {copy_gbs:.3f}, "
              f"sync_us {sync_us:.1f}, measured in {m['runtime_s']:.1f} s")
        print(f"wrote {self.args.out}", flush=True)


def _kib(n: int) -> str:
    return f"{n / 1048576:.3g} MiB" if n >= 1048576 else f"{n / 1024:.3g} KiB"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.timeout = COLLECTIVE_TIMEOUT_S
    return run_ranks(argv, args, problem, RankProfiler, lambda a, v: _launch(a, v), PROG, verdict=False)


if __name__ == "__main__":
    sys.exit(main())

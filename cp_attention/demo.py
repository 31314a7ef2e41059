"""One denoising step of a FLUX-shaped transformer, single-process and context-parallel, checked and timed.

    torchrun --standalone --nproc_per_node 4 -m cp_attention.demo      # what `make demo` runs
    python -m cp_attention.demo --world-size 2 --layers 1              # launches torchrun itself
    python -m cp_attention.demo --train                                # one training step instead

Every rank builds the same diffusers FluxTransformer2DModel (random weights from --seed, no download) and the
same inputs. Rank 0 runs the step single-process with diffusers' native attention (torch SDPA) in float64
(the reference), in the working dtype (the baseline) and with the cp_attention backend; then all ranks run
it under context parallelism: ring, Ulysses and Unified through the cp_attention diffusers backend, and
diffusers' own Ulysses (native backend) for comparison. A mode passes when its error against the float64
reference is at most twice the single-process native error plus a small floor (the tolerance rule of
tests/reference.py). Rank 0 prints progress, a table and a final PASS/FAIL line; the exit code is 0 on PASS.

--train runs one training step per mode instead: forward and backward of loss = sum(output * W), W a fixed
random tensor of the output's shape, from zeroed gradients. Every rank computes the loss of the whole
(gathered) output; diffusers' gather keeps this rank's part of the output gradient in backward, so each
rank's parameter gradients are its tokens' share and their sum over the ranks (all_reduce SUM, in float32)
is the full gradient, which is compared with the single-process step's. The tolerance applies to each
parameter's gradient: twice the single-process native gradient's error against float64, plus one rounding
step of the dtype at the gradient's rms and 16 float32 epsilons at its largest entry (tests/reference.py).

CPU runs use gloo ("cpu:gloo") and give each rank cores // world_size threads, so with more ranks than
cores the ranks share cores and context-parallel timings are slower than single-process ones: on a CPU the
table shows correctness and relative memory; timings mean something on GPUs (NCCL, one GPU per rank).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Floor of the tolerance rule, relative to 1 + max|reference| (tests/reference.py uses the same numbers).
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The gradients' floor (--train), tests/reference.py's: the dtype's unit roundoff at the gradient's rms, plus
# F32_NOISE at its largest entry.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_NOISE = 2.0**-19
ALL_MODES = ("ring", "ulysses", "unified", "native-ulysses")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cp_attention.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model size (FLUX-shaped, random weights)")
    g.add_argument("--layers", type=int, default=2, help="double-stream (joint) blocks")
    g.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    g.add_argument("--heads", type=int, default=8, help="attention heads")
    g.add_argument("--head-dim", type=int, default=64, help="head dim (FLUX.1: 24 heads x 128)")
    g = p.add_argument_group("resolution")
    g.add_argument("--height", type=int, default=512, help="image height in pixels (tokens: height/16 rows)")
    g.add_argument("--width", type=int, default=512, help="image width in pixels (tokens: width/16 columns)")
    g.add_argument("--text-tokens", type=int, default=128, help="text tokens (FLUX.1: 512)")
    g.add_argument("--batch", type=int, default=1, help="images per step")
    g = p.add_argument_group("parallelism")
    g.add_argument("--world-size", type=int, default=4,
                   help="ranks; without torchrun the demo launches torchrun with this many")
    g.add_argument("--modes", default=",".join(ALL_MODES),
                   help=f"comma-separated subset of {','.join(ALL_MODES)}")
    g.add_argument("--unified", default="auto", metavar="RxU",
                   help="ring x ulysses mesh of the unified mode; auto: the squarest factorization")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one CUDA GPU per rank with NCCL when available, else CPU with gloo")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="working dtype; auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    g.add_argument("--iters", type=int, default=2, help="timed steps per mode (the median is shown)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train", action="store_true",
                   help="one training step (forward and backward) per mode; the table shows gradient errors")
    g.add_argument("--timeout", type=float, default=900.0, help="seconds a collective may wait")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The model and its inputs: identical on every rank for one seed.

def flux_config(layers=2, single_layers=4, heads=8, head_dim=64) -> dict:
    """A FluxTransformer2DModel config of FLUX.1's shape, scaled down. RoPE axes split head_dim like
    FLUX.1's (16, 56, 56) of 128, rounded to even sizes."""
    if head_dim < 8 or head_dim % 4:
        raise ValueError(f"cp_attention.demo: head_dim must be a multiple of 4 and >= 8, got {head_dim}")
    t = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - t
    a = rest // 2 // 2 * 2
    inner = heads * head_dim
    return dict(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=inner,
                pooled_projection_dim=inner // 2, guidance_embeds=False, axes_dims_rope=(t, a, rest - a))


def make_flux(config: dict, seed: int):
    """FluxTransformer2DModel(**config), weights drawn after torch.manual_seed(seed); float32, CPU, eval."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config).eval()


def flux_inputs(config: dict, height: int, width: int, text_tokens: int, batch: int, seed: int) -> dict:
    """Keyword arguments of one FluxTransformer2DModel step, float32 on the CPU: hidden_states
    [B, (height/16) * (width/16), in_channels] (packed latents), encoder_hidden_states [B, text_tokens,
    joint_attention_dim], pooled_projections [B, pooled_projection_dim], timestep [B], img_ids
    [(height/16) * (width/16), 3] (0, row, column as FLUX pipelines make them), txt_ids [text_tokens, 3]."""
    rows, cols = height // 16, width // 16
    if rows < 1 or cols < 1 or text_tokens < 1:
        raise ValueError(f"cp_attention.demo: height and width must be >= 16 and text_tokens >= 1, got "
                         f"{height}x{width}, {text_tokens}")
    g = torch.Generator().manual_seed(seed + 1)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(cols)[None, :]
    return dict(
        hidden_states=torch.randn(batch, rows * cols, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(rows * cols, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )


def cast_inputs(inputs: dict, device, dtype) -> dict:
    """Floating inputs to dtype (ids stay float32 unless dtype is float64), all to device."""
    out = {}
    for name, t in inputs.items():
        to = dtype if (name not in ("img_ids", "txt_ids") or dtype == torch.float64) else t.dtype
        out[name] = t.to(device=device, dtype=to)
    return out


# ---------------------------------------------------------------------------------------------------------
# Peak memory of one step on one rank.

class PeakMemory:
    """Peak memory a step adds on this rank: on CUDA torch.cuda.max_memory_allocated above the allocation
    before it; on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
    resident set before it, with freed memory handed back to the OS first (malloc_trim) and large blocks
    mmapped, so that the resident set follows live tensors. Where clear_refs is not writable, the
    process-lifetime peak (getrusage) is used, which only shows growth beyond earlier peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic raise)
            except OSError:
                self._libc = None

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base, self._hwm = self._status_kib("VmRSS") * 1024, True
        except OSError:
            self._base, self._hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False

    def stop(self) -> int:
        """Bytes above the start."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        peak = (self._status_kib("VmHWM") * 1024 if self._hwm
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return max(0, peak - self._base)


# ---------------------------------------------------------------------------------------------------------

class RankDemo:
    """What every demo rank knows: its rank, device (one CUDA GPU per rank, else the CPU), working dtype,
    cores and threads, and a PeakMemory."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda(args) else \
            torch.device("cpu")
        auto = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[auto if args.dtype == "auto" else args.dtype]
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.rank_threads = max(1, self.cores // self.world)
        self.mem = PeakMemory(self.device)

    def log(self, *a):
        if self.rank == 0:
            print("[demo]", *a, flush=True)


class Demo(RankDemo):
    def __init__(self, args):
        super().__init__(args)
        self.train = bool(getattr(args, "train", False))
        self._weights: dict = {}

    def loss_weight(self, out: torch.Tensor) -> torch.Tensor:
        """W of the training loss sum(out * W): standard normal of out's shape drawn from --seed in float64
        on the CPU (the same on every rank and in every dtype), then cast to out's dtype and device."""
        key = (tuple(out.shape), out.dtype, out.device)
        if key not in self._weights:
            g = torch.Generator().manual_seed(self.args.seed + 2)
            w = torch.randn(tuple(out.shape), generator=g, dtype=torch.float64)
            self._weights[key] = w.to(device=out.device, dtype=out.dtype)
        return self._weights[key]

    def step(self, model, inputs):
        if self.train:
            model.zero_grad(set_to_none=True)
            out = model(**inputs, return_dict=False)[0]
            (out * self.loss_weight(out)).sum().backward()
            return out.detach()
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
            # Under parallelism diffusers gathers the output with a functional collective that completes at
            # the tensor's first use: use it here, so that the gather counts in the step's time.
            return out.clone()

    def grads(self, model, parallel: bool) -> list[torch.Tensor]:
        """The last step's parameter gradients, one float64 CPU tensor per parameter (named_parameters order,
        zeros where the loss does not reach). Parallel: summed over the ranks, in float32 (float64 for a
        float64 model), the full gradient (see the module docstring)."""
        gs = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for _, p in model.named_parameters()]
        acc = torch.float64 if self.dtype == torch.float64 or gs[0].dtype == torch.float64 else torch.float32
        flat = torch.cat([g.to(acc).reshape(-1) for g in gs])
        if parallel:
            dist.all_reduce(flat)
        return list(flat.to("cpu", torch.float64).split([g.numel() for g in gs]))

    def timed(self, model, inputs, parallel: bool):
        """(result, median seconds per step, peak bytes above the start). The result is the output float64
        on the CPU, or with --train the gradients of grads()."""
        for _ in range(self.args.warmup):
            self.step(model, inputs)
        model.zero_grad(set_to_none=True)  # a training step's peak counts the gradients it makes
        self.mem.start()
        times, out = [], None
        for _ in range(max(1, self.args.iters)):
            if parallel:
                dist.barrier()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            out = self.step(model, inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        peak = self.mem.stop()
        result = self.grads(model, parallel) if self.train else out.detach().to("cpu", torch.float64)
        model.zero_grad(set_to_none=True)
        return result, statistics.median(times), peak

    def set_tolerance(self, ref, base):
        """The tolerance from the float64 reference and the single-process native baseline (rank 0)."""
        if not self.train:
            ref_max = float(ref.abs().max())
            base_err = float((base - ref).abs().max())
            self.tol = 2 * base_err + EPS[self.dtype] * (1 + ref_max)
            self.log(f"tolerance: 2 x {base_err:.3g} (single-process native vs float64) + "
                     f"{EPS[self.dtype]:g} x (1 + {ref_max:.3g}) = {self.tol:.3g}")
            return
        self.tols = []
        for r, b in zip(ref, base):
            rms = float(r.square().mean().sqrt()) if r.numel() else 0.0
            peak = float(r.abs().max()) if r.numel() else 0.0
            base_err = float((b - r).abs().max())
            self.tols.append(2 * base_err + UNIT_ROUNDOFF[self.dtype] * rms + F32_NOISE * peak)
        self.log(f"tolerance per parameter gradient: 2 x its single-process native error against float64 + "
                 f"{UNIT_ROUNDOFF[self.dtype]:.3g} x its rms + {F32_NOISE:.3g} x its max; {len(self.tols)} "
                 f"parameters, gradient max {max(float(r.abs().max()) for r in ref):.3g}")

    def compare(self, result, ref, single) -> tuple[float, float, float, bool]:
        """(max |result - single-process native|, max |result - float64 reference|, worst error / tolerance,
        passed). With --train the errors are the largest over all parameter gradients and the ratio the
        largest over the parameters of each one's error over its own tolerance."""
        if not self.train:
            err_ref = float((result - ref).abs().max())
            return float((result - single).abs().max()), err_ref, err_ref / self.tol, err_ref <= self.tol
        err_single = max(float((g - s).abs().max()) for g, s in zip(result, single))
        errs = [float((g - r).abs().max()) for g, r in zip(result, ref)]
        ok = all(e <= t for e, t in zip(errs, self.tols))
        ratio = max((e / t if t > 0 else (0.0 if e == 0 else math.inf)) for e, t in zip(errs, self.tols))
        return err_single, max(errs), ratio, ok

    def modes(self) -> list[tuple[str, str, int, int]]:
        """(mode, attention backend, ring degree, ulysses degree) to run at this world size."""
        P, a = self.world, self.args
        out = []
        for m in wanted_modes(a) if P > 1 else ():
            backend = "native" if m.startswith("native") else "cp_attention"
            R, U = {"ring": (P, 1), "unified": unified_mesh(P, a.unified)}.get(m, (1, P))
            if m == "unified" and (R == 1 or U == 1):
                self.log(f"skipping unified: world size {P} has no R x U mesh with R, U > 1")
            elif a.heads % U:
                self.log(f"skipping {m}: {a.heads} heads do not split over ulysses degree {U}")
            else:
                out.append((m, backend, R, U))
        return out

    def run(self) -> bool:
        import diffusers
        from diffusers import ContextParallelConfig

        import cp_attention.integrations.diffusers as cpd

        a = self.args
        diffusers.utils.logging.set_verbosity_error()  # its "experimental feature" notices, once per model
        # torch's deprecation notice for the collective diffusers' gather hook uses, once per step otherwise
        warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated")
        cpd.register()
        cfg = flux_config(a.layers, a.single_layers, a.heads, a.head_dim)
        inputs = flux_inputs(cfg, a.height, a.width, a.text_tokens, a.batch, a.seed)
        img, txt = inputs["hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1]
        what = "training step (forward + backward)" if self.train else "denoising step (forward)"
        self.log(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {self.world} rank(s) on "
                 f"{self.device.type} ({dist.get_backend()}), {self.dtype}, {self.cores} cores; one {what}")
        self.log(f"FLUX-shaped transformer: {a.layers} joint + {a.single_layers} single blocks, "
                 f"{a.heads} heads x {a.head_dim}, {a.height}x{a.width} image = {img} image + {txt} text "
                 f"tokens, batch {a.batch}")
        base = make_flux(cfg, a.seed)
        n_params = sum(p.numel() for p in base.parameters())
        self.log(f"{n_params / 1e6:.1f} M parameters (random, seed {a.seed})")
        work = cast_inputs(inputs, self.device, self.dtype)
        rows, ok = [], True

        # Single-process runs, on rank 0 with every core while the others wait.
        if self.rank == 0:
            torch.set_num_threads(self.cores)
            self.log("single process, native attention, float64 (reference) ...")
            m = copy.deepcopy(base).to(self.device, torch.float64)
            m.set_attention_backend("native")
            ref_out = self.step(m, cast_inputs(inputs, self.device, torch.float64))
            ref = self.grads(m, False) if self.train else ref_out.to("cpu", torch.float64)
            del m
            single = []
            for backend in ("native", "cp_attention"):
                self.log(f"single process, {backend} attention ...")
                m = copy.deepcopy(base).to(self.device, self.dtype)
                m.set_attention_backend(backend)
                result, t, peak = self.timed(m, work, parallel=False)
                single.append((backend, result, t, peak))
                del m
            native = single[0][1]
            self.set_tolerance(ref, native)
            for backend, result, t, peak in single:
                err_single, err_ref, ratio, passed = self.compare(result, ref, native)
                ok &= passed
                rows.append(("single", backend, "1", err_single, err_ref, ratio, t, [peak], passed))
        dist.barrier()
        torch.set_num_threads(self.rank_threads)

        for mode, backend, R, U in self.modes():
            self.log(f"{mode} ({backend} attention, ring {R} x ulysses {U}) ...")
            m = copy.deepcopy(base).to(self.device, self.dtype)
            m.set_attention_backend(backend)
            cpd.enable_parallelism(m, ContextParallelConfig(ring_degree=R, ulysses_degree=U))
            result, t, peak = self.timed(m, work, parallel=True)
            del m
            peaks = [None] * self.world
            dist.all_gather_object(peaks, peak)
            times = [None] * self.world
            dist.all_gather_object(times, t)
            if self.rank == 0:
                err_single, err_ref, ratio, passed = self.compare(result, ref, native)
                ok &= passed
                rows.append((mode, backend, f"{R}x{U}", err_single, err_ref, ratio, max(times), peaks,
                             passed))
                what = "grad" if self.train else "out"
                self.log(f"  max |{what} - single-process native| = {err_single:.3g}, "
                         f"{'ok' if passed else 'FAILED'}, {max(times) * 1e3:.0f} ms/step")
        verdict = torch.tensor([1 if ok else 0], dtype=torch.int64,
                               device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(verdict, src=0)
        if self.rank == 0:
            print_table(rows, self)
        return bool(verdict.item())


def unified_mesh(P: int, spec: str | None) -> tuple[int, int]:
    if spec and spec != "auto":
        try:
            R, U = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise ValueError(f"cp_attention.demo: --unified must look like 2x2, got {spec!r}") from None
        if R * U != P:
            raise ValueError(f"cp_attention.demo: --unified {spec} does not multiply to the world size {P}")
        return R, U
    R = max(r for r in range(1, int(P ** 0.5) + 1) if P % r == 0)
    return R, P // R


def print_markdown_table(head, lines) -> None:
    """head and each line (tuples of cells) as a Markdown table on stdout, after a blank line."""
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print()
    print(fmt.format(*head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in lines:
        print(fmt.format(*r))


def print_table(rows, demo):
    mib = 1 << 20
    if demo.train:
        errs = ("grad err vs single", "grad err vs fp64", "worst err/tol")
    else:
        errs = ("max err vs single", "err vs fp64")
    head = ("mode", "attention", "mesh", *errs, "ms/step", "peak MiB/rank", "")
    lines = []
    for mode, backend, mesh, err_single, err_ref, ratio, t, peaks, passed in rows:
        peak = f"{max(peaks) / mib:.0f}" + ("" if len(peaks) == 1 else f" (max of {len(peaks)})")
        cells = [f"{err_single:.2e}", f"{err_ref:.2e}"] + ([f"{ratio:.2f}"] if demo.train else [])
        lines.append((mode, backend, mesh, *cells, f"{t * 1e3:.0f}", peak, "ok" if passed else "FAIL"))
    print_markdown_table(head, lines)
    if demo.train:
        check = ("grad err: the largest |gradient - single-process native (or float64) gradient| over all "
                 "parameters, context-parallel gradients summed over the ranks; worst err/tol: the largest "
                 "over the parameters of each gradient's error against float64 over its own tolerance (ok: "
                 "every one <= 1). ms/step: forward + backward")
    else:
        check = f"tolerance on err vs fp64: {demo.tol:.2e}. ms/step"
    print(f"\n{check}: median of {demo.args.iters} step(s) after "
          f"{demo.args.warmup} warm-up, slowest rank; single-process rows use {demo.cores} threads, "
          f"parallel rows {demo.rank_threads} per rank. peak MiB: memory a step adds above the model and "
          f"inputs "
          f"({'CUDA max_memory_allocated' if demo.device.type == 'cuda' else 'peak RSS'}), largest rank.",
          flush=True)


def wanted_modes(args) -> list[str]:
    return [m.strip() for m in args.modes.split(",") if m.strip()]


def problem(args, world: int) -> str | None:
    """Why these arguments cannot run on `world` ranks, or None."""
    bad = [m for m in wanted_modes(args) if m not in ALL_MODES]
    if bad:
        return f"--modes has unknown mode(s) {bad}; choose from {', '.join(ALL_MODES)}"
    try:
        unified_mesh(world, args.unified)
    except ValueError as e:
        return str(e).removeprefix("cp_attention.demo: ")
    if min(args.layers + args.single_layers, args.heads, args.batch, args.iters, args.text_tokens) < 1 \
            or args.layers < 0 or args.single_layers < 0 or args.warmup < 0:
        return "sizes must be >= 1 (--layers and --single-layers >= 0, at least one block; --warmup >= 0)"
    img = (args.height // 16) * (args.width // 16)
    if img < 1:
        return f"--height and --width must be >= 16, got {args.height}x{args.width}"
    if img % world or args.text_tokens % world:
        # diffusers' default sharding asserts divisibility; its uneven modes (ring_anything,
        # ulysses_anything) end in an all_gather of unequal chunks, which gloo does not support.
        return (f"{img} image and {args.text_tokens} text tokens must both divide by the world size {world} "
                f"(diffusers shards sequences evenly); choose another --height/--width/--text-tokens")
    return None


def use_cuda(args) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def _launch(args, argv) -> int:
    """Not under torchrun: run this module under torchrun with --world-size processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.world_size}", "-m", "cp_attention.demo", *argv]
    return subprocess.call(cmd)


def run_ranks(argv: list[str], args, problem_of, runner, launch, name: str, verdict: bool = True) -> int:
    """The main of a module that runs on every rank. Not under torchrun: checks the arguments
    (problem_of(args, world) -> why not, or None) and calls launch(args, argv) to start torchrun. Under
    torchrun: one rank of runner(args).run() over a gloo (CPU) or NCCL (CUDA) group with args.timeout
    seconds per collective. verdict: run() returns pass or fail and rank 0 prints PASS or FAIL; otherwise
    a run that returns has passed. Returns the exit code: 0 on PASS, 1 on FAIL or an exception, 2 for bad
    arguments."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if launched else args.world_size
    why = "--world-size must be >= 1" if world < 1 else problem_of(args, world)
    if why is not None:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{name}: {why}", file=sys.stderr, flush=True)
        return 2
    if not launched:
        return launch(args, argv)
    cuda = use_cuda(args)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "cpu:gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = int(os.environ["RANK"])
    try:
        ok = runner(args).run()
        ok = bool(ok) if verdict else True
    except Exception:  # noqa: BLE001 (reported, then the run fails as a whole)
        print(f"[{name}] rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        ok = False
    finally:
        dist.destroy_process_group()
    if rank == 0 and verdict:
        print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_ranks(argv, parse_args(argv), problem, Demo, lambda a, v: _launch(a, v), "cp_attention.demo")


if __name__ == "__main__":
    sys.exit(main())

"""Whole diffusers pipelines, single-process and parallel, checked against each other, timed, saved as PNG.

    torchrun --standalone --nproc_per_node 4 -m cp_attention.pipeline_demo    # what `make demo` runs
    python -m cp_attention.pipeline_demo --world-size 2                       # launches torchrun itself

Two text-to-image pipelines of random weights (cp_attention.pipelines_tiny; prompts given as embeddings,
nothing downloaded), each over two prompts, are run on rank 0 single-process with diffusers' native
attention in float64 (the reference) and in the working dtype (the baseline), then on all ranks through
`cp_attention.integrations.diffusers.parallelize_pipeline` in each mode:

- FLUX (FluxPipeline): context parallelism, ring, Ulysses (6 heads: an uneven split on 4 ranks) and
  Unified, and data parallelism over the two prompts, each replica context-parallel inside;
- Qwen-Image (QwenImagePipeline, true CFG with negative prompts, prompts of different text lengths): CFG
  parallelism (the conditional and unconditional passes of each step on two halves of the ranks), with
  Ulysses inside or with data parallelism over the two prompts.

A mode passes when every rank's final images are within the tolerance rule of tests/reference.py of the
float64 reference: at most twice the baseline's error plus EPS[dtype] * (1 + max|reference|). Rank 0 prints
the pipeline's progress bar, a table (error, ms per denoising step, peak memory per rank) and PASS/FAIL
(exit code 0 on PASS), and writes one PNG per pipeline: a row per prompt, a column per mode, the
single-process images first.

On CPUs the ranks share the machine's cores (gloo), so parallel timings are slower than single-process
ones: the table shows correctness and memory; timings mean something on GPUs (NCCL, one GPU per rank).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist

from cp_attention.demo import DTYPES, EPS, RankDemo, print_markdown_table, run_ranks

# (mode name, degrees): the modes each pipeline runs at a world size; degrees multiply to the world size.
FLUX_MODES = {
    2: [("ring", dict(ring_degree=2)), ("ulysses", dict(ulysses_degree=2)), ("data", dict(data_degree=2))],
    4: [("ring", dict(ring_degree=4)), ("ulysses", dict(ulysses_degree=4)),
        ("unified", dict(ring_degree=2, ulysses_degree=2)),
        ("data+ulysses", dict(data_degree=2, ulysses_degree=2))],
}
QWEN_MODES = {
    2: [("cfg", dict(cfg_degree=2)), ("data", dict(data_degree=2))],
    4: [("cfg+ulysses", dict(cfg_degree=2, ulysses_degree=2)),
        ("cfg+data", dict(cfg_degree=2, data_degree=2)),
        ("cfg+ring", dict(cfg_degree=2, ring_degree=2))],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cp_attention.pipeline_demo",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, choices=sorted(FLUX_MODES),
                   help="ranks; without torchrun the demo launches torchrun with this many")
    p.add_argument("--pipelines", default="flux,qwen", help="comma-separated subset of flux,qwen")
    p.add_argument("--height", type=int, default=512, help="image height in pixels (a multiple of 16)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (a multiple of 16)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--heads", type=int, default=6, help="attention heads of both transformers")
    p.add_argument("--head-dim", type=int, default=32, help="head dim of both transformers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one CUDA GPU per rank with NCCL when available, else CPU with gloo")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="working dtype; auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out-dir", default="demo_out", help="where the PNGs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    return p.parse_args(argv)


def problem(args, world: int) -> str | None:
    """Why these arguments cannot run on `world` ranks, or None."""
    if world not in FLUX_MODES:
        return f"the world size must be one of {sorted(FLUX_MODES)}, got {world}"
    bad = [p for p in pipelines(args) if p not in ("flux", "qwen")]
    if bad or not pipelines(args):
        return f"--pipelines must name flux and/or qwen, got {args.pipelines!r}"
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        return f"--height and --width must be positive multiples of 16, got {args.height}x{args.width}"
    tokens = (args.height // 16) * (args.width // 16)
    if tokens % world:
        return f"{tokens} image tokens must divide by the world size {world} (diffusers shards evenly)"
    if args.steps < 2:
        return "--steps must be >= 2 (ms/step is the median interval between steps)"
    if args.heads < world or args.head_dim % 8 or args.head_dim < 16:
        return (f"--heads must be >= the world size {world} and --head-dim a multiple of 8 >= 16, got "
                f"{args.heads} x {args.head_dim}")
    return None


def pipelines(args) -> list[str]:
    return [p.strip() for p in args.pipelines.split(",") if p.strip()]


class StepClock:
    """callback_on_step_end that records when each denoising step ends; `per_step()` is the median interval
    between consecutive steps (the first step, which includes the pipeline's set-up, is left out)."""

    def __init__(self, device: torch.device):
        self.device, self.ends = device, []

    def __call__(self, pipe, step, timestep, kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        return kwargs

    def per_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.ends, self.ends[1:]))


class PipelineDemo(RankDemo):
    def __init__(self, args):
        super().__init__(args)
        self.rows, self.ok = [], True

    def build(self, name: str):
        """(pipeline in float32 on the CPU, its inputs, its modes at this world size)."""
        from cp_attention import pipelines_tiny as tiny

        a = self.args
        size = dict(height=a.height, width=a.width, steps=a.steps, seed=a.seed)
        if name == "flux":
            pipe = tiny.flux_pipeline(a.seed, heads=a.heads, head_dim=a.head_dim)
            return pipe, tiny.flux_inputs(pipe, **size), FLUX_MODES[self.world]
        pipe = tiny.qwen_pipeline(a.seed, heads=a.heads, head_dim=a.head_dim)
        return pipe, tiny.qwen_inputs(pipe, **size), QWEN_MODES[self.world]

    def timed_run(self, pipe, inputs, desc: str, parallel: bool):
        """(images float64 on the CPU, seconds per step, peak bytes above the start) of one pipeline call."""
        from cp_attention import pipelines_tiny as tiny

        pipe.set_progress_bar_config(disable=self.rank != 0, desc=desc, leave=False)
        clock = StepClock(self.device)
        if parallel:
            dist.barrier()
        self.mem.start()
        images = tiny.run(pipe, dict(inputs, callback_on_step_end=clock))
        peak = self.mem.stop()
        return images.to("cpu", torch.float64).contiguous(), clock.per_step(), peak

    def on_device(self, pipe, inputs, dtype, backend=None):
        """pipe and inputs moved to this rank's device and dtype; backend: the transformer's attention
        backend (diffusers' set_attention_backend also makes it the default of models that set none)."""
        from cp_attention import pipelines_tiny as tiny

        if backend is not None:
            pipe.transformer.set_attention_backend(backend)
        pipe, inputs = tiny.to_dtype(pipe.to(self.device), inputs, dtype)
        return pipe, {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def run_pipeline(self, name: str):
        import cp_attention.integrations.diffusers as cpd

        base, inputs, modes = self.build(name)
        t = base.transformer
        n_params = sum(p.numel() for p in t.parameters())
        self.log(f"{name}: {type(base).__name__}, {type(t).__name__} ({n_params / 1e6:.1f} M "
                 f"parameters, {t.config.num_attention_heads} heads x {t.config.attention_head_dim}), "
                 f"{self.args.height}x{self.args.width}, {inputs['latents'].shape[1]} image tokens, "
                 f"{inputs['latents'].shape[0]} prompts, {self.args.steps} steps"
                 + (", true CFG (negative prompts)" if "true_cfg_scale" in inputs else ""))
        ref = torch.empty(0)
        columns = []
        if self.rank == 0:
            torch.set_num_threads(self.cores)
            self.log("single process, native attention, float64 (reference) ...")
            pipe, work = self.on_device(copy.deepcopy(base), inputs, torch.float64, "native")
            ref, _, _ = self.timed_run(pipe, work, "float64", parallel=False)
            self.log(f"single process, native attention, {str(self.dtype).removeprefix('torch.')} ...")
            pipe, work = self.on_device(copy.deepcopy(base), inputs, self.dtype, "native")
            single, t_single, peak = self.timed_run(pipe, work, "single", parallel=False)
            del pipe
            base_err = float((single - ref).abs().max())
            self.tol = 2 * base_err + EPS[self.dtype] * (1 + float(ref.abs().max()))
            self.rows.append((name, "single", "1", 0.0, base_err, self.tol, t_single, [peak], True))
            columns.append(("single", single))
        dist.barrier()
        torch.set_num_threads(self.rank_threads)
        # Every rank checks its own images: rank 0 sends the reference and the tolerance.
        dev = self.device  # NCCL moves CUDA tensors only
        shape = torch.tensor(list(ref.shape) if self.rank == 0 else [0] * 4, dtype=torch.int64, device=dev)
        dist.broadcast(shape, src=0)
        ref = ref.to(dev) if self.rank == 0 else torch.empty(shape.tolist(), dtype=torch.float64, device=dev)
        dist.broadcast(ref, src=0)
        ref = ref.cpu()
        tol = torch.tensor([getattr(self, "tol", 0.0)], dtype=torch.float64, device=dev)
        dist.broadcast(tol, src=0)
        tol = tol.cpu()
        for mode, degrees in modes:
            mesh = "x".join(str(degrees.get(f"{d}_degree", 1)) for d in ("cfg", "data", "ring", "ulysses"))
            self.log(f"{mode} (cfg x data x ring x ulysses = {mesh}) ...")
            pipe, work = self.on_device(copy.deepcopy(base), inputs, self.dtype)
            cpd.parallelize_pipeline(pipe, **degrees)
            images, t_step, peak = self.timed_run(pipe, work, mode, parallel=True)
            del pipe
            err = float((images - ref).abs().max())
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (err, t_step, peak))
            worst = max(g[0] for g in gathered)
            passed = worst <= float(tol)
            self.ok &= passed
            if self.rank == 0:
                err_single = float((images - columns[0][1]).abs().max())
                self.rows.append((name, mode, mesh, err_single, worst, float(tol),
                                  max(g[1] for g in gathered), [g[2] for g in gathered], passed))
                columns.append((mode, images))
                self.log(f"  max |image - float64| over the ranks = {worst:.3g} "
                         f"{'<=' if passed else '>'} {float(tol):.3g}: {'ok' if passed else 'FAILED'}")
        if self.rank == 0:
            path = save_grid(columns, os.path.join(self.args.out_dir, f"{name}.png"))
            self.log(f"images: {path} (a row per prompt; columns: {', '.join(c for c, _ in columns)})")

    def run(self) -> bool:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated")
        self.log(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {self.world} ranks on "
                 f"{self.device.type} ({dist.get_backend()}), {self.dtype}, {self.cores} cores")
        for name in pipelines(self.args):
            self.run_pipeline(name)
        verdict = torch.tensor([int(self.ok)], dtype=torch.int64, device=self.device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        if self.rank == 0:
            print_table(self.rows, self)
        return bool(verdict.item())


def save_grid(columns, path: str) -> str:
    """The images of each column ([prompts, 3, H, W] in [0, 1]) side by side, a row per prompt, as one PNG."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid = torch.cat([torch.cat(list(images), dim=1) for _, images in columns], dim=2)  # [3, P*H, C*W]
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(pixels).save(path)
    return path


def print_table(rows, demo):
    mib = 1 << 20
    head = ("pipeline", "mode", "cfg x data x ring x ulysses", "max err vs single", "err vs fp64",
            "tolerance", "ms/step", "peak MiB/rank", "")
    lines = []
    for name, mode, mesh, err_single, err_ref, tol, t, peaks, passed in rows:
        peak = f"{max(peaks) / mib:.0f}" + ("" if len(peaks) == 1 else f" (max of {len(peaks)})")
        lines.append((name, mode, mesh, f"{err_single:.2e}", f"{err_ref:.2e}", f"{tol:.2e}", f"{t * 1e3:.1f}",
                      peak, "ok" if passed else "FAIL"))
    print_markdown_table(head, lines)
    print(f"\nerrors: max |pixel difference| of the final images (in [0, 1]), the worst rank; ok: err vs "
          f"fp64 <= tolerance. ms/step: median interval between denoising steps, slowest rank; the "
          f"single-process row uses {demo.cores} threads, parallel rows {demo.rank_threads} per rank. "
          f"peak MiB: memory the "
          f"pipeline call adds above the loaded pipeline "
          f"({'CUDA max_memory_allocated' if demo.device.type == 'cuda' else 'peak RSS'}), largest rank.",
          flush=True)


def _launch(args, argv) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.world_size}", "-m", "cp_attention.pipeline_demo", *argv]
    return subprocess.call(cmd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_ranks(argv, parse_args(argv), problem, PipelineDemo, lambda a, v: _launch(a, v),
                     "cp_attention.pipeline_demo")


if __name__ == "__main__":
    sys.exit(main())

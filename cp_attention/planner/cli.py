"""`python -m cp_attention.plan`: the ranked layouts for a model, a resolution and a machine.

    python -m cp_attention.plan --model flux --height 1024 --width 1024 --gpus 8 --hardware l20-pcie
    python -m cp_attention.plan --model wan2.1-14b --frames 81 --height 720 --width 1280 --gpus 16 --cfg
    python -m cp_attention.plan --seq-len 4608 --heads 24 --head-dim 128 --gpus 4 --plot layouts.png

Prints one row per layout, best first: the attention call's predicted time, compute and communication,
memory per rank, the links its groups use, and per denoising step the attention over every layer plus an
estimate of the rest of the model (its matmuls, 2 flops per parameter a token passes through, split over
the ranks); with --steps also a whole pipeline call (the model's fixed cost per image plus the steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from .cost import IMPLEMENTATIONS, plan
from .profiles import PROFILE_NAMES

# FLUX.1-dev's time outside the denoising steps at 1024 x 1024 on an H100 SXM, per image, ms: fitted with
# the h100-sxm profile on xDiT's 4 x H100 table (benchmarks/calibrate_planner.py, docs/planner.md).
FLUX_FIXED_MS = 402.0


@dataclasses.dataclass(frozen=True)
class Model:
    """A DiT's attention shape: attention layers per step, heads x head_dim, text tokens in the joint
    sequence, pixels per token side (VAE downsampling x patch size), frames per latent frame (video), and
    parameters (billions): all of them (params_b), and those whose matmuls every token runs through
    (token_params_b: one stream of a dual-stream block, without the per-sample adaLN modulation), for the
    estimate of the non-attention work. fixed_ms: a pipeline call's time outside the denoising steps, per
    image (text encoders, VAE decode, scheduling), ms on an H100 SXM; 0 where not calibrated."""
    layers: int
    heads: int
    head_dim: int
    text_tokens: int
    pixels_per_token: int
    params_b: float
    token_params_b: float
    temporal: int = 0  # 0: an image model; else latent frames = 1 + (frames - 1) // temporal
    fixed_ms: float = 0.0

    def seq_len(self, height: int, width: int, frames: int) -> int:
        latent_frames = 1 + (frames - 1) // self.temporal if self.temporal else 1
        image = latent_frames * (height // self.pixels_per_token) * (width // self.pixels_per_token)
        return image + self.text_tokens


def _block_params_b(width: int, mlp: int, blocks: int) -> float:
    """Billions of per-token matmul parameters of `blocks` blocks of q, k, v, out (4 width^2) and a two-layer
    MLP (2 width mlp); a FLUX-style single-stream block (fused q, k, v, MLP in; out of [attention, MLP])
    has the same count."""
    return blocks * (4 * width * width + 2 * width * mlp) / 1e9


# Shapes from the models' published configs (diffusers' transformer config.json of each checkpoint): FLUX
# and HunyuanVideo 3072 wide with 4x MLPs, dual- then single-stream blocks; Qwen-Image 60 dual-stream blocks
# of 3072; Wan 2.1 14B 40 blocks of 5120 with a 13824 MLP and cross-attention (its q and out count; its k, v
# run over the text only). FLUX's 6.46 B per token give 59.5 TFLOP of matmuls per 1024 x 1024 step, beside
# 14.9 of attention.
MODELS = {
    "flux": Model(layers=19 + 38, heads=24, head_dim=128, text_tokens=512, pixels_per_token=16,
                  params_b=11.9, token_params_b=_block_params_b(3072, 12288, 57), fixed_ms=FLUX_FIXED_MS),
    "qwen-image": Model(layers=60, heads=24, head_dim=128, text_tokens=256, pixels_per_token=16,
                        params_b=20.4, token_params_b=_block_params_b(3072, 12288, 60)),
    "wan2.1-14b": Model(layers=40, heads=40, head_dim=128, text_tokens=0, pixels_per_token=16, params_b=14.0,
                        token_params_b=_block_params_b(5120, 13824, 40) + 40 * 2 * 5120 ** 2 / 1e9,
                        temporal=4),
    "hunyuanvideo": Model(layers=20 + 40, heads=24, head_dim=128, text_tokens=256, pixels_per_token=16,
                          params_b=12.8, token_params_b=_block_params_b(3072, 12288, 60), temporal=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cp_attention.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), help="a DiT; or give --seq-len, --heads, --head-dim")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=1, help="video frames (video models)")
    p.add_argument("--seq-len", type=int, help="the global sequence, instead of --model")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--gpus", type=int, required=True, help="the world size")
    p.add_argument("--hardware", default="h100-sxm",
                   help=f"a built-in profile ({', '.join(PROFILE_NAMES)}) or a .json profile file")
    p.add_argument("--batch", type=int, default=1, help="images or videos per call")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance: two passes per step")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--train", action="store_true", help="forward and backward")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="cp_attention",
                   help="whose context-parallel attention runs the layouts")
    p.add_argument("--compiled", action="store_true", help="the model runs under torch.compile")
    p.add_argument("--steps", type=int, default=0,
                   help="with --model: also print a whole pipeline call of this many steps, in seconds")
    p.add_argument("--top", type=int, default=0, help="rows to print (0: all)")
    p.add_argument("--plot", help="write a bar plot of the layouts (compute and communication) here")
    return p.parse_args(argv)


def workload(args) -> tuple[dict, Model | None]:
    """plan()'s keyword arguments from the command line, and the model (None with --seq-len)."""
    if args.model:
        m = MODELS[args.model]
        seq = m.seq_len(args.height, args.width, args.frames)
        return dict(seq_len=seq, heads=m.heads, head_dim=m.head_dim, kv_heads=None), m
    missing = [f"--{n}" for n in ("seq-len", "heads", "head-dim")
               if getattr(args, n.replace("-", "_")) is None]
    if missing:
        raise ValueError(f"give --model, or {', '.join(missing)}")
    return dict(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, kv_heads=args.kv_heads), None


def step_ms(p, model: Model | None, seq_len: int, batch: int, world: int, profile,
            dtype: str) -> float | None:
    """Attention over every layer plus the model's matmuls (2 flops per per-token parameter per token, each
    rank its share of the tokens, at the profile's gemm rate), per denoising step; None without a model."""
    if model is None:
        return None
    tokens = batch * seq_len / world
    gemm_ms = 2 * model.token_params_b * 1e9 * tokens / (profile.gemm_rate(dtype) * 1e12) * 1e3
    return model.layers * p.time_ms + gemm_ms


def pipeline_ms(p, model: Model, seq_len: int, batch: int, world: int, profile, dtype: str,
                steps: int) -> float:
    """One pipeline call of one image: the model's fixed cost (fixed_ms) plus `steps` denoising steps
    (step_ms), ms."""
    return model.fixed_ms + steps * step_ms(p, model, seq_len, batch, world, profile, dtype)


def main(argv=None) -> int:
    from .profiles import get_profile

    args = parse_args(argv)
    try:
        kw, model = workload(args)
        profile = get_profile(args.hardware)
        plans = plan(args.gpus, batch=args.batch, causal=args.causal, dtype=getattr(torch, args.dtype),
                     hardware=profile, train=args.train, cfg=args.cfg, implementation=args.implementation,
                     compiled=args.compiled, **kw)
    except ValueError as e:
        message = str(e)
        print(message if message.startswith("cp_attention.") else f"cp_attention.plan: {message}",
              file=sys.stderr)
        return 2
    batch = args.batch * (2 if args.cfg else 1)
    what = f"{args.model} {args.width}x{args.height}" + (f"x{args.frames}" if args.frames > 1 else "") \
        if model else "attention"
    print(f"{what}: sequence {kw['seq_len']}, {kw['heads']} heads x {kw['head_dim']}, batch {batch}, "
          f"{args.dtype}{', causal' if args.causal else ''}{', training' if args.train else ''}; "
          f"{args.gpus} x {profile.device} ({profile.name})")
    calls = bool(model and args.steps)
    head = ("#", "data x ring x ulysses", "placement", "attn ms/call", "compute", "comm", "MiB/rank",
            "ulysses link", "ring link", "step ms" if model else "")
    head += (f"{args.steps} steps s",) if calls else ()
    rows = []
    for i, p in enumerate(plans[:args.top or None], 1):
        step = step_ms(p, model, kw["seq_len"], batch, args.gpus, profile, args.dtype)
        row = (str(i), p.layout, p.placement, f"{p.time_ms:.3f}", f"{p.compute_ms:.3f}", f"{p.comm_ms:.3f}",
               f"{p.memory_bytes / 2**20:.0f}", p.ulysses_link or "-", p.ring_link or "-",
               f"{step:.1f}" if step is not None else "")
        if calls:
            whole = pipeline_ms(p, model, kw["seq_len"], batch, args.gpus, profile, args.dtype, args.steps)
            row += (f"{whole / 1e3:.2f}",)
        rows.append(row)
    from cp_attention.demo import print_markdown_table

    print_markdown_table(head, rows)
    if model:
        print(f"\nstep ms: {model.layers} attention layers plus the matmuls of {model.token_params_b:.2f} B "
              f"parameters per token at {profile.gemm_rate(args.dtype):g} TFLOP/s, split over the ranks (an "
              f"estimate).")
        if calls:
            print(f"{args.steps} steps s: {model.fixed_ms / 1e3:g} s per image outside the steps (text "
                  f"encoders, VAE; calibrated on an H100 SXM, 0 where not) plus {args.steps} steps.")
    if args.plot:
        plot(plans[:args.top or None], args.plot, f"{what} on {args.gpus} x {profile.name}")
        print(f"plot: {args.plot}")
    return 0


def plot(plans, path: str, title: str) -> None:
    """Stacked bars, one per layout: compute and exposed communication of one attention call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p.layout}\n{p.placement.split('-')[0]}" for p in plans]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(plans)), 4))
    ax.bar(labels, [p.compute_ms for p in plans], label="compute")
    ax.bar(labels, [p.comm_ms for p in plans], bottom=[p.compute_ms for p in plans], label="communication")
    ax.set_ylabel("ms per attention call")
    ax.set_xlabel("data x ring x ulysses (placement: which group is innermost)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Small diffusers pipelines with random weights, built from configs (nothing is downloaded), and their
inputs: what `make demo` and the pipeline tests run.

- FLUX: FluxPipeline with a FLUX-shaped FluxTransformer2DModel, a small AutoencoderKL (16 latent channels,
  8x downsampling, FLUX.1's scaling and shift) and FlowMatchEulerDiscreteScheduler.
- Qwen-Image: QwenImagePipeline with a QwenImageTransformer2DModel, a small AutoencoderKLQwenImage and the
  same scheduler; its prompts carry a text mask, and it runs true CFG (a negative prompt).

No text encoder is built: the prompts are given as embeddings (random, of the encoders' output widths), as
`pipe(prompt_embeds=...)` accepts them. The same seed gives the same pipeline and inputs on every rank.
"""

from __future__ import annotations

import torch

from cp_attention.demo import flux_config, make_flux

SCHEDULER_SHIFT = 3.0  # FLUX.1's and Qwen-Image's flow-matching shift


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)


def flux_pipeline(seed: int = 0, heads: int = 6, head_dim: int = 32, layers: int = 1, single_layers: int = 2):
    """A FluxPipeline of random weights (float32, CPU, eval) whose transformer is flux_config(layers,
    single_layers, heads, head_dim): in_channels 64 (16 latent channels packed 2x2), text width heads *
    head_dim."""
    from diffusers import AutoencoderKL, FluxPipeline

    transformer = make_flux(flux_config(layers, single_layers, heads, head_dim), seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=4,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    return FluxPipeline(scheduler=_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def qwen_pipeline(seed: int = 0, heads: int = 6, head_dim: int = 32, layers: int = 2):
    """A QwenImagePipeline of random weights (float32, CPU, eval): transformer with in_channels 64 (16 latent
    channels packed 2x2), text width 64."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    rope = head_dim // 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=64,
        axes_dims_rope=(head_dim - 2 * (3 * rope // 2), 3 * rope // 2, 3 * rope // 2)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    return QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def initial_latents(prompts: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The starting noise of both pipelines, packed as they pack it: [prompts, (height/16) * (width/16), 64]
    float32 (16 latent channels, 8x VAE downsampling, 2x2 patches). Passed as `latents=` so that every run,
    float64 included, starts from the same noise."""
    if height % 16 or width % 16 or height < 16 or width < 16:
        raise ValueError(f"height and width must be positive multiples of 16, got {height}x{width}")
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randn(prompts, (height // 16) * (width // 16), 64, generator=g)


def flux_inputs(pipe, prompts: int = 2, height: int = 128, width: int = 128, steps: int = 4,
                text_tokens: int = 16, negative: bool = False, seed: int = 0) -> dict:
    """Keyword arguments of `pipe(**inputs)` for flux_pipeline: prompt embeddings [prompts, text_tokens,
    width] and pooled [prompts, width / 2] (random stand-ins for the text encoders' outputs), the initial
    latents, output_type "pt". negative: also negative embeddings and true_cfg_scale=4 (true CFG: two
    transformer calls per step)."""
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed + 5)

    def embeds():
        return (torch.randn(prompts, text_tokens, cfg.joint_attention_dim, generator=g),
                torch.randn(prompts, cfg.pooled_projection_dim, generator=g))

    inputs = dict(height=height, width=width, num_inference_steps=steps, output_type="pt",
                  latents=initial_latents(prompts, height, width, seed))
    inputs["prompt_embeds"], inputs["pooled_prompt_embeds"] = embeds()
    if negative:
        inputs["negative_prompt_embeds"], inputs["negative_pooled_prompt_embeds"] = embeds()
        inputs["true_cfg_scale"] = 4.0
    return inputs


def qwen_inputs(pipe, prompts: int = 2, height: int = 128, width: int = 128, steps: int = 4,
                text_tokens: int = 12, negative_tokens: int = 6, seed: int = 0) -> dict:
    """Keyword arguments of `pipe(**inputs)` for qwen_pipeline, with true CFG (true_cfg_scale=4): prompt
    embeddings [prompts, text_tokens, 64] with a text mask in which prompt i > 0 pads its last i tokens (a
    batch of prompts of different lengths), negative embeddings [prompts, negative_tokens, 64] unpadded, the
    initial latents, output_type "pt"."""
    width_txt = pipe.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.ones(prompts, text_tokens, dtype=torch.long)
    for i in range(1, prompts):
        mask[i, text_tokens - min(i, text_tokens - 1):] = 0
    return dict(height=height, width=width, num_inference_steps=steps, output_type="pt",
                latents=initial_latents(prompts, height, width, seed), true_cfg_scale=4.0,
                prompt_embeds=torch.randn(prompts, text_tokens, width_txt, generator=g),
                prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.randn(prompts, negative_tokens, width_txt, generator=g),
                negative_prompt_embeds_mask=torch.ones(prompts, negative_tokens, dtype=torch.long))


def to_dtype(pipe, inputs: dict, dtype: torch.dtype):
    """The pipeline's modules and the inputs' floating tensors in dtype (in place for the pipeline; the
    inputs are copied). Returns (pipe, inputs)."""
    pipe.to(dtype=dtype)
    return pipe, {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}


def run(pipe, inputs: dict) -> torch.Tensor:
    """The pipeline's images, [prompts, 3, height, width] float in [0, 1], as the pipeline returns them with
    output_type "pt"; diffusers' progress bar shows unless disabled on the pipeline."""
    with torch.no_grad():
        return pipe(**inputs).images

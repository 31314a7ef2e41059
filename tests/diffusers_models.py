"""Tiny diffusers transformers with random weights (no download) and their inputs, for the integration tests.
Same seed, same model and inputs on every rank. FLUX comes from cp_attention.demo (the demo's own builder);
Qwen-Image is built here: its processor hands the backend a [B, 1, 1, S] boolean key mask."""

from __future__ import annotations

import copy

import torch

from cp_attention.demo import flux_config, flux_inputs, make_flux

TINY_FLUX = flux_config(layers=1, single_layers=1, heads=4, head_dim=16)


def _tiny_flux_config(heads: int) -> dict:
    return TINY_FLUX if heads == 4 else flux_config(layers=1, single_layers=1, heads=heads, head_dim=16)


def tiny_flux(seed: int = 0, heads: int = 4):
    return make_flux(_tiny_flux_config(heads), seed)


def tiny_flux_inputs(img_rows: int, img_cols: int, text_tokens: int, batch: int = 2, seed: int = 0,
                     heads: int = 4) -> dict:
    """img_rows * img_cols image tokens, text_tokens text tokens, for tiny_flux(heads=heads) (whose text
    width is heads * head_dim)."""
    return flux_inputs(_tiny_flux_config(heads), 16 * img_rows, 16 * img_cols, text_tokens, batch, seed)


def tiny_qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6)).eval()


def tiny_qwen_inputs(rows: int = 4, cols: int = 6, text_tokens: int = 8, batch: int = 2,
                     seed: int = 0) -> dict:
    """Batch entry 1 pads its last 3 text tokens (mask False), so the key mask matters."""
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    mask[-1, text_tokens - 3:] = False
    return dict(hidden_states=torch.randn(batch, rows * cols, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=g),
                encoder_hidden_states_mask=mask, timestep=torch.full((batch,), 0.5),
                img_shapes=[[(1, rows, cols)]] * batch)


def to_double(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def references(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 output: the reference, float32 output: the baseline), both single-process with diffusers'
    native attention backend (torch SDPA)."""
    ref_model = copy.deepcopy(model).double()
    ref_model.set_attention_backend("native")
    base_model = copy.deepcopy(model)
    base_model.set_attention_backend("native")
    return run(ref_model, to_double(inputs)), run(base_model, inputs)


# ---------------------------------------------------------------------------------------------------------
# One training step (forward and backward) and its gradients.

def loss_weight(out_shape, seed: int = 123) -> torch.Tensor:
    """The fixed random tensor W of loss = sum(output * W): every output entry counts, each with its own
    weight, so a gradient that misses or misplaces part of the output shows. float64; cast to the output's."""
    return torch.randn(*out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def input_grad_names(inputs: dict) -> list[str]:
    """The inputs that get a gradient in a training step: the token sequences."""
    return [n for n in ("hidden_states", "encoder_hidden_states") if n in inputs]


def train_step(model, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Forward and backward of loss = sum(model(**inputs) * weight) from zeroed gradients. Returns (output
    detached, {parameter name: gradient}, {input name: gradient}); gradients detached clones, zeros where
    autograd left None (a parameter the loss does not reach)."""
    model.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    leaves = {}
    for name in input_grad_names(inputs):
        leaves[name] = inputs[name] = inputs[name].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(**inputs, return_dict=False)[0]
        loss = (out * weight.to(out.dtype)).sum()
        loss.backward()
    params = {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
              for n, p in model.named_parameters()}
    grads_in = {n: (torch.zeros_like(t) if t.grad is None else t.grad.detach().clone())
                for n, t in leaves.items()}
    model.zero_grad(set_to_none=True)
    return out.detach(), params, grads_in


def grad_references(model, inputs: dict, weight: torch.Tensor) -> tuple[tuple, tuple]:
    """(float64 step: the reference, float32 step: the baseline), each train_step's (output, parameter
    gradients, input gradients), both single-process with diffusers' native attention backend (torch
    SDPA)."""
    ref_model = copy.deepcopy(model).double()
    ref_model.set_attention_backend("native")
    base_model = copy.deepcopy(model)
    base_model.set_attention_backend("native")
    return train_step(ref_model, to_double(inputs), weight), train_step(base_model, inputs, weight)

"""One training step of diffusers models under context parallelism with the cp_attention backend, on spawned
gloo ranks: forward and backward of loss = sum(output * W), W a fixed random tensor of the output's shape.

What is compared: the parameter gradients (and the gradients of the input sequences) summed over the
context-parallel group (all_reduce SUM) against the same step of the same model on the same inputs run
single-process. The tolerance rule of tests/reference.py, per gradient tensor: the reference is the
single-process step in float64 with diffusers' native backend (torch SDPA), the baseline the same step in
float32; a float32 gradient passes when max|grad - reference| <= 2 * max|baseline - reference| + one
float32 rounding step at the reference's rms + 16 float32 epsilons at max|reference|.

Why the sum over ranks is the full gradient: diffusers' hooks split the sequences with `chunk` (whose
backward puts a shard's gradient at its place in the full tensor, zeros elsewhere) and gather the output with
an autograd function whose backward keeps this rank's chunk of the output gradient (no reduction). Every
rank computes the same loss of the whole gathered output, so each rank backpropagates exactly the gradient of
its own shard of the output; context-parallel attention's backward carries gradients across ranks (K/V of
other ranks' shards); what each rank then accumulates in a parameter is the contribution of its own tokens,
and the contributions add up over the ranks. Parameters used before the split on replicated inputs (FLUX's
time embedding, Qwen-Image's input projections) get the same treatment: each rank's share is its tokens'.
The "shard-loss" items check the other way to write it, without diffusers' gather: the model's output stays
sharded and each rank's loss covers its own shard only (the losses add up to the full loss).

Covered at world sizes 2 and 4: tiny FLUX and tiny Qwen-Image (whose processor passes a [B, 1, 1, S_local]
boolean key mask; one batch entry pads text tokens) under ring (P x 1), Ulysses (1 x P) and Unified (2 x 2),
and diffusers' own Ulysses on its native backend for comparison; at world size 1 the cp_attention backend
single-process. Each parallel item also checks that the rule rejects wrong gradients: the ranks' own
gradients without the sum, and one attention projection's gradient 1% off.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("diffusers")

from dist_harness import SpawnedItems, run_items  # noqa: E402
from reference import assert_close_to_ref  # noqa: E402

SPAWN_TIMEOUT_S = 240.0
WORLD_SIZES = [1, 2, 4]
FAMILIES = ("flux", "qwen")
# The gradient the mutation check puts 1% off: an attention input projection of the first joint block.
MUTATED = "transformer_blocks.0.attn.to_k.weight"


def _meshes(P: int) -> dict[str, tuple[int, int]]:
    if P == 1:
        return {}
    meshes = {"ring": (P, 1), "ulysses": (1, P)}
    if P == 4:
        meshes["unified"] = (2, 2)
    return meshes


@functools.cache
def _case(family: str):
    """(model, inputs, W, reference step, baseline step) of one family; the same on every rank."""
    from diffusers_models import (
        grad_references,
        loss_weight,
        run,
        tiny_flux,
        tiny_flux_inputs,
        tiny_qwen,
        tiny_qwen_inputs,
    )

    if family == "flux":
        model, inputs = tiny_flux(), tiny_flux_inputs(4, 6, 8)
    else:
        model, inputs = tiny_qwen(), tiny_qwen_inputs()
    weight = loss_weight(run(model, inputs).shape)
    ref, base = grad_references(model, inputs, weight)
    return model, inputs, weight, ref, base


def _grad_failures(name: str, grads: dict, ref: dict, base: dict) -> list[str]:
    """The tolerance rule on every gradient tensor; the failures' messages (empty: all pass)."""
    assert grads.keys() == ref.keys(), f"{name}: gradients of {sorted(grads.keys() ^ ref.keys())} missing"
    failures = []
    for key in ref:
        try:
            assert_close_to_ref(f"{name}: grad {key}", grads[key].double(), ref[key], base[key],
                                torch.float32)
        except AssertionError as e:
            failures.append(str(e))
    return failures


def _assert_step(name: str, step: tuple, ref: tuple, base: tuple):
    """The output and every parameter and input gradient of a step within the rule."""
    out, params, inputs = step
    assert_close_to_ref(f"{name}: output", out.double(), ref[0], base[0], torch.float32)
    failures = _grad_failures(name, params, ref[1], base[1]) + _grad_failures(name, inputs, ref[2], base[2])
    assert not failures, f"{len(failures)} gradient(s) outside the tolerance:\n" + "\n".join(failures)


def _assert_rejects(name: str, grads: dict, ref: dict, base: dict):
    assert _grad_failures(name, grads, ref, base), f"{name}: wrong gradients passed the tolerance rule"


def _all_reduce_sum(grads: dict) -> dict:
    """Every gradient summed over the ranks (the context-parallel group is the whole world here)."""
    out = {}
    for key, g in grads.items():
        g = g.clone()
        torch.distributed.all_reduce(g)
        out[key] = g
    return out


def _parallel(model, backend, R, U, cp_plan=None):
    """A copy of model with `backend` under enable_parallelism (through the CPU workaround)."""
    from diffusers import ContextParallelConfig

    import cp_attention.integrations.diffusers as cpd

    m = copy.deepcopy(model)
    m.set_attention_backend(backend)
    cpd.enable_parallelism(m, ContextParallelConfig(ring_degree=R, ulysses_degree=U), cp_plan)
    return m


def _check_single(family):
    from diffusers_models import train_step

    model, inputs, weight, ref, base = _case(family)
    m = copy.deepcopy(model)
    m.set_attention_backend("cp_attention")
    _assert_step(f"{family} single-process cp_attention", train_step(m, inputs, weight), ref, base)


def _check_parallel(family, backend, R, U):
    """Gathered output, the same full loss on every rank, gradients summed over the ranks."""
    from diffusers_models import train_step

    model, inputs, weight, ref, base = _case(family)
    name = f"{family} {backend} {R}x{U}"
    out, params, grads_in = train_step(_parallel(model, backend, R, U), inputs, weight)
    summed = (out, _all_reduce_sum(params), _all_reduce_sum(grads_in))
    _assert_step(name, summed, ref, base)
    # The rule bites: this rank's gradients alone, and one gradient 1% off, fail it.
    _assert_rejects(f"{name} (rank-local)", params, ref[1], base[1])
    _assert_rejects(f"{name} ({MUTATED} x 1.01)", {**summed[1], MUTATED: summed[1][MUTATED] * 1.01}, ref[1],
                    base[1])


def _check_shard_loss(R, U):
    """FLUX with its output left sharded (the cp_plan without the gather): rank r's loss is sum(out_r * W_r)
    over its own shard of the output; the parameter gradients summed over the ranks are the full ones."""
    from diffusers_models import train_step

    model, inputs, weight, ref, base = _case("flux")
    plan = {k: v for k, v in model._cp_plan.items() if k != "proj_out"}
    m = _parallel(model, "cp_attention", R, U, cp_plan=plan)
    # The shards in the order of diffusers' sharder: chunks of dim 1 by rank in its flattened mesh.
    group = m._parallel_config.context_parallel_config._flattened_mesh.get_group()
    P, r = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    out, params, grads_in = train_step(m, inputs, weight.chunk(P, dim=1)[r])
    assert out.shape[1] * P == weight.shape[1], f"output rows {out.shape[1]}: not this rank's shard"
    chunks = [torch.empty_like(out) for _ in range(P)]
    torch.distributed.all_gather(chunks, out.contiguous(), group=group)
    summed = (torch.cat(chunks, dim=1), _all_reduce_sum(params), _all_reduce_sum(grads_in))
    _assert_step(f"flux shard-loss {R}x{U}", summed, ref, base)


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    import cp_attention.integrations.diffusers as cpd

    cpd.register()
    items = []
    if world_size == 1:
        items += [(f"{f}-single", functools.partial(_check_single, f)) for f in FAMILIES]
    for mode, (R, U) in _meshes(world_size).items():
        for family in FAMILIES:
            check = functools.partial(_check_parallel, family, "cp_attention", R, U)
            items.append((f"{family}-{mode}", check))
    if world_size > 1:
        R, U = (2, 2) if world_size == 4 else (world_size, 1)
        items.append(("flux-shard-loss", functools.partial(_check_shard_loss, R, U)))
        items.append(("flux-native-ulysses",
                      functools.partial(_check_parallel, "flux", "native", 1, world_size)))
    return run_items(items)


def _items(P: int) -> list[str]:
    keys = [f"{f}-single" for f in FAMILIES] if P == 1 else []
    keys += [f"{f}-{mode}" for mode in _meshes(P) for f in FAMILIES]
    if P > 1:
        keys += ["flux-shard-loss", "flux-native-ulysses"]
    return keys


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S, backend="cpu:gloo")


ITEMS = [(P, key) for P in WORLD_SIZES for key in _items(P)]


@pytest.mark.parametrize("world_size,key", ITEMS, ids=[f"ws{P}-{k}" for P, k in ITEMS])
def test_training_step_gradients(runs, world_size, key):
    runs.assert_ok(world_size, key)

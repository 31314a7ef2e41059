"""diffusers models under context parallelism with the cp_attention backend, on spawned gloo ranks.

Tolerance rule (tests/reference.py, applied to whole models): the reference is the model run single-process
in float64 with diffusers' native backend; the baseline is the same run in float32. A parallel float32 output
passes when max|out - reference| <= 2 * max|baseline - reference| + 1e-5 * (1 + max|reference|).

Covered, at world sizes 1, 2 and 4: FLUX (FluxTransformer2DModel) and Qwen-Image (whose processor passes a
[B, 1, 1, S_local] boolean key mask; one batch entry pads text tokens) through set_attention_backend
("cp_attention") and enable_parallelism: ring (P x 1), Ulysses (1 x P), Unified (2 x 2); diffusers' own
Ulysses through the CPU workaround; the backend called the way diffusers' dispatcher calls it with
return_lse=True, LSE in [B, S, H], uneven shards and a key mask; sequences that do not split evenly; and head
counts that the Ulysses degree does not divide (3 heads on 2 ranks, on a 2x2 mesh; 5 on 4), with and without
ulysses_anything.

Uneven sequences: diffusers' default sharding asserts divisibility; its ring_anything / ulysses_anything
modes split with tensor_split, but their final all_gather of unequal chunks is not supported by gloo. So
here the model's cp_plan leaves out the output gather and the test gathers (cp_attention's uneven gather);
Unified has no uneven mode in diffusers, so it is tested through use_as_sdpa(ContextParallel(2, 2)), with the
model's inputs sharded the way its cp_plan would.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("diffusers")

from dist_harness import SpawnedItems, run_items  # noqa: E402
from reference import assert_close_to_ref, check_attention  # noqa: E402

SPAWN_TIMEOUT_S = 240.0
WORLD_SIZES = [1, 2, 4]


def _meshes(P: int) -> dict[str, tuple[int, int]]:
    if P == 1:
        return {}
    meshes = {"ring": (P, 1), "ulysses": (1, P)}
    if P == 4:
        meshes["unified"] = (2, 2)
    return meshes


def _close(name, got, ref, base):
    assert_close_to_ref(name, got.double(), ref, base, torch.float32)


def _parallel(model, backend, R, U, cp_plan=None, **config_kw):
    """A copy of model with `backend` under enable_parallelism (through the CPU workaround)."""
    from diffusers import ContextParallelConfig

    import cp_attention.integrations.diffusers as cpd

    m = copy.deepcopy(model)
    m.set_attention_backend(backend)
    cpd.enable_parallelism(m, ContextParallelConfig(ring_degree=R, ulysses_degree=U, **config_kw), cp_plan)
    return m


def _check_model(family, backend, R, U):
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs, tiny_qwen, tiny_qwen_inputs

    if family == "flux":
        model, inputs = tiny_flux(), tiny_flux_inputs(4, 6, 8)
    else:
        model, inputs = tiny_qwen(), tiny_qwen_inputs()
    ref, base = references(model, inputs)
    out = run(_parallel(model, backend, R, U), inputs)
    _close(f"{family} {backend} {R}x{U}", out, ref, base)


def _check_single(family):
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs, tiny_qwen, tiny_qwen_inputs

    if family == "flux":
        model, inputs = tiny_flux(), tiny_flux_inputs(4, 6, 8)
    else:
        model, inputs = tiny_qwen(), tiny_qwen_inputs()
    ref, base = references(model, inputs)
    m = copy.deepcopy(model)
    m.set_attention_backend("cp_attention")
    _close(f"{family} single-process cp_attention", run(m, inputs), ref, base)


def _flux_sharded_run(model, inputs, cp):
    """The FLUX cp_plan by hand: sequences (dim 1) and ids (dim 0) sharded, the output gathered."""
    from diffusers_models import run

    local = dict(inputs)
    for name in ("hidden_states", "encoder_hidden_states"):
        local[name] = cp.shard(inputs[name], dim=1)
    for name in ("img_ids", "txt_ids"):
        local[name] = cp.shard(inputs[name], dim=0)
    return cp.gather(run(model, local), dim=1)


def _check_use_as_sdpa(R, U, rows, cols, text):
    """The model keeps diffusers' native backend; use_as_sdpa(cp) turns its SDPA calls into cp.attention."""
    from diffusers_models import references, tiny_flux, tiny_flux_inputs

    import cp_attention

    model, inputs = tiny_flux(), tiny_flux_inputs(rows, cols, text)
    ref, base = references(model, inputs)
    m = copy.deepcopy(model)
    m.set_attention_backend("native")
    cp = cp_attention.ContextParallel(ring_degree=R, ulysses_degree=U)
    with cp_attention.use_as_sdpa(cp):
        out = _flux_sharded_run(m, inputs, cp)
    _close(f"flux use_as_sdpa {R}x{U}", out, ref, base)


def _check_uneven_anything(mode, P):
    """diffusers' tensor_split sharding (ring_anything / ulysses_anything) of 35 image + 7 text tokens."""
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs

    import cp_attention

    model, inputs = tiny_flux(), tiny_flux_inputs(7, 5, 7)
    ref, base = references(model, inputs)
    R, U = (P, 1) if mode == "ring" else (1, P)
    kw = {"ring_anything": True} if mode == "ring" else {"ulysses_anything": True}
    plan = {k: v for k, v in model._cp_plan.items() if k != "proj_out"}  # gloo cannot gather unequal chunks
    local = run(_parallel(model, "cp_attention", R, U, cp_plan=plan, **kw), inputs)
    expected_len = torch.tensor_split(torch.empty(35), P)[torch.distributed.get_rank()].numel()
    assert local.shape[1] == expected_len, f"local output rows {local.shape[1]}, expected {expected_len}"
    cp = cp_attention.ContextParallel(ring_degree=R, ulysses_degree=U)
    _close(f"flux uneven {mode}_anything P={P}", cp.gather(local, dim=1), ref, base)


def _check_uneven_heads(heads, R, U, anything):
    """FLUX with a head count the Ulysses degree does not divide: the backend splits the heads unevenly
    (diffusers' own Ulysses cannot: without ulysses_anything its reshape fails, with it it pads heads where
    the padding is less than a rank's share). anything: ulysses_anything with a sequence that does not split
    evenly (gathered by the test, as in _check_uneven_anything); else diffusers' even sharding."""
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs

    import cp_attention

    model = tiny_flux(heads=heads)
    inputs = tiny_flux_inputs(*((7, 5, 7) if anything else (4, 6, 8)), heads=heads)
    ref, base = references(model, inputs)
    name = f"flux {heads} heads {R}x{U}" + (" ulysses_anything" if anything else "")
    if not anything:
        _close(name, run(_parallel(model, "cp_attention", R, U), inputs), ref, base)
        return
    plan = {k: v for k, v in model._cp_plan.items() if k != "proj_out"}  # gloo cannot gather unequal chunks
    local = run(_parallel(model, "cp_attention", R, U, cp_plan=plan, ulysses_anything=True), inputs)
    cp = cp_attention.ContextParallel(ring_degree=R, ulysses_degree=U)
    _close(name, cp.gather(local, dim=1), ref, base)


def _check_dispatch_lse(R, U):
    """dispatch_attention_fn -> cp_attention backend with return_lse under diffusers' ParallelConfig: out and
    lse ([B, S_local, H], diffusers' layout) with a [B, 1, 1, S_local] key mask; then causal GQA (global
    causal order: the shards must sit in diffusers' flattened-mesh order). Uneven shards under a ring or
    Ulysses mesh, with diffusers' "anything" flag that allows them (the lengths are then exchanged); even
    shards on a 2D mesh, where diffusers has no such mode. Uneven shards without the flag raise ValueError
    on every rank, naming the flag, when the backend checks every call (register(check="always"))."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from torch.distributed.device_mesh import init_device_mesh

    import cp_attention
    import cp_attention.integrations.diffusers as cpd

    member = cpd.register()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    anything = {"ring_anything": True} if U == 1 else {"ulysses_anything": True} if R == 1 else {}
    mesh = init_device_mesh("cpu", (R, U), mesh_dim_names=("ring", "ulysses"))

    def parallel_config(**flags):
        config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=R, ulysses_degree=U,
                                                                              **flags))
        config.setup(rank, world, torch.device("cpu"), mesh=mesh)
        return config

    config = parallel_config(**anything)
    cp = cp_attention.ContextParallel(mesh=mesh)  # diffusers' mesh, for shard/gather

    # S = 29 splits unevenly (28: evenly); B, S, H differ so a wrong lse layout shows.
    B, S, H, D = 2, 29 if anything else 28, 4, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    mask = torch.rand(B, S, generator=g) < 0.7
    mask[:, 0] = True
    out, lse = dispatch_attention_fn(cp.shard(q), cp.shard(k), cp.shard(v),
                                     attn_mask=cp.shard(mask)[:, None, None, :],
                                     attention_kwargs={"return_lse": True}, backend=member,
                                     parallel_config=config)
    S_local = cp.shard(q).shape[1]
    assert lse.shape == (B, S_local, H), f"lse shape {list(lse.shape)}, expected [B, S_local, H]"
    assert lse.is_contiguous()
    check_attention(cp.gather(out), cp.gather(lse).transpose(1, 2), q, k, v, kv_mask=mask)

    k2, v2 = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()  # 2 kv heads for 4 query heads
    out, lse = dispatch_attention_fn(cp.shard(q), cp.shard(k2), cp.shard(v2), is_causal=True, enable_gqa=True,
                                     attention_kwargs={"return_lse": True}, backend=member,
                                     parallel_config=config)
    check_attention(cp.gather(out), cp.gather(lse).transpose(1, 2), q, k2, v2, causal=True)
    if anything:
        # Outside diffusers' contract, so checked on every call: with the default check a rank whose
        # signature was agreed before (from another model's calls) would not exchange, and could wait.
        cpd.register(check="always")
        try:
            with pytest.raises(ValueError, match=f"{next(iter(anything))}=True"):
                dispatch_attention_fn(cp.shard(q), cp.shard(k), cp.shard(v), backend=member,
                                      parallel_config=parallel_config())
        finally:
            cpd.register()


def _check_cpu_enable_parallelism():
    """Why the workaround exists: diffusers' own enable_parallelism divides by zero without an accelerator;
    the workaround leaves torch.accelerator.device_count as it was."""
    from diffusers import ContextParallelConfig
    from diffusers_models import tiny_flux

    import cp_attention.integrations.diffusers as cpd

    world = torch.distributed.get_world_size()
    original = torch.accelerator.device_count
    if original() == 0:
        with pytest.raises(ZeroDivisionError):
            tiny_flux().enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    cpd.enable_parallelism(tiny_flux(), ContextParallelConfig(ring_degree=world))
    assert torch.accelerator.device_count is original


def _check_from_pretrained(R, U):
    """A tiny FLUX saved with save_pretrained and loaded context-parallel by cpd.from_pretrained (diffusers'
    from_pretrained(..., parallel_config=...)) gives the single-process output."""
    import os
    import shutil
    import tempfile

    import torch.distributed as dist
    from diffusers import ContextParallelConfig, FluxTransformer2DModel
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs

    import cp_attention.integrations.diffusers as cpd

    model, inputs = tiny_flux(), tiny_flux_inputs(4, 6, 8)
    # The ranks are children of one process: one folder for all of them.
    path = os.path.join(tempfile.gettempdir(), f"cp_attention_from_pretrained_{os.getppid()}_{R}x{U}")
    if dist.get_rank() == 0:
        model.save_pretrained(path)
    dist.barrier()
    try:
        loaded = cpd.from_pretrained(FluxTransformer2DModel, path, ContextParallelConfig(ring_degree=R,
                                                                                          ulysses_degree=U))
        backends = {str(getattr(m.processor, "_attention_backend", None)) for m in loaded.modules()
                    if hasattr(m, "processor")}
        assert backends == {str(cpd.register())}, f"attention backends after loading: {backends}"
        ref, base = references(model, inputs)
        _close(f"flux from_pretrained {R}x{U}", run(loaded, inputs), ref, base)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    import cp_attention.integrations.diffusers as cpd

    cpd.register()
    items = []
    if world_size == 1:
        items += [(f"{f}-single", functools.partial(_check_single, f)) for f in ("flux", "qwen")]
        items.append(("flux-use_as_sdpa-1x1", functools.partial(_check_use_as_sdpa, 1, 1, 4, 6, 8)))
    for mode, (R, U) in _meshes(world_size).items():
        for family in ("flux", "qwen"):
            items.append((f"{family}-{mode}", functools.partial(_check_model, family, "cp_attention", R, U)))
        items.append((f"dispatch-lse-{mode}", functools.partial(_check_dispatch_lse, R, U)))
    if world_size > 1:
        native = functools.partial(_check_model, "flux", "native", 1, world_size)
        items.append(("flux-native-ulysses", native))
        items += [(f"flux-uneven-{m}", functools.partial(_check_uneven_anything, m, world_size))
                  for m in ("ring", "ulysses")]
        items.append(("cpu-enable-parallelism", _check_cpu_enable_parallelism))
        R, U = (2, 2) if world_size == 4 else (1, world_size)
        items.append(("flux-from_pretrained", functools.partial(_check_from_pretrained, R, U)))
    if world_size == 4:
        unified = functools.partial(_check_use_as_sdpa, 2, 2, 7, 5, 7)
        items.append(("flux-uneven-unified-use_as_sdpa", unified))
    items += [(key, functools.partial(_check_uneven_heads, *args))
              for key, args in UNEVEN_HEADS.get(world_size, [])]
    return run_items(items)


# Head counts the Ulysses degree does not divide: (key, (heads, ring_degree, ulysses_degree, anything)).
UNEVEN_HEADS = {
    2: [("flux-3heads-ulysses", (3, 1, 2, False)), ("flux-3heads-ulysses_anything", (3, 1, 2, True))],
    4: [("flux-3heads-unified", (3, 2, 2, False)), ("flux-5heads-ulysses_anything", (5, 1, 4, True))],
}


def _items(P: int) -> list[str]:
    keys = ["flux-single", "qwen-single", "flux-use_as_sdpa-1x1"] if P == 1 else []
    for mode in _meshes(P):
        keys += [f"flux-{mode}", f"qwen-{mode}", f"dispatch-lse-{mode}"]
    if P > 1:
        keys += ["flux-native-ulysses", "flux-uneven-ring", "flux-uneven-ulysses", "cpu-enable-parallelism",
                 "flux-from_pretrained"]
    if P == 4:
        keys.append("flux-uneven-unified-use_as_sdpa")
    keys += [key for key, _ in UNEVEN_HEADS.get(P, [])]
    return keys


@pytest.fixture(scope="module")
def runs():
    # "cpu:gloo": diffusers picks the device of its size exchange (uneven modes) from the backend's name.
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S, backend="cpu:gloo")


ITEMS = [(P, key) for P in WORLD_SIZES for key in _items(P)]


@pytest.mark.parametrize("world_size,key", ITEMS, ids=[f"ws{P}-{k}" for P, k in ITEMS])
def test_diffusers_context_parallel(runs, world_size, key):
    runs.assert_ok(world_size, key)

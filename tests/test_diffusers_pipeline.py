"""Whole diffusers pipelines under `parallelize_pipeline` (cp_attention.integrations.diffusers), on spawned
gloo ranks: the small random-weight FLUX and Qwen-Image pipelines of cp_attention.pipelines_tiny.

Correctness (CASES): every rank builds the same pipeline and inputs, parallelizes a fresh pipeline and runs
it; every rank's images must be bit-identical to rank 0's and close to the single-process pipeline's, and
each rank must have computed only its share (counted at the transformer's input layer: the batch of every
transformer call it computed, and how many; with cfg_degree=2, one pass per step).
Tolerance rule (tests/reference.py, assert_close_to_ref, applied to the images): the reference is the
single-process pipeline run in float64 and the baseline the same run in float32, both computed in the test
process (no process group, diffusers' native attention); the images of a parallel float32 run pass when
    max|got - ref| <= 2 * max|base - ref| + 2^-24 * rms(ref) + 2^-19 * max|ref|.
Covered: context parallelism alone (ring 2, Ulysses 2 and 4, Unified 2x2; 6 heads, so Ulysses 4 splits the
heads unevenly), the data axis (a batch of 2 and of 3 prompts, the latter split unevenly), the CFG axis
(FLUX true CFG, Qwen-Image) and their products at world 4 (cfg x ulysses, cfg x data, cfg x ring,
data x ulysses). Cases with `calls=2` run the pipeline twice: the second call reuses the placeholder shapes
learned in the first.

Errors (ERROR_CHECKS), each on every rank: degrees whose product is not the world size, cfg_degree=3, a
degree that is 0, True or 2.0, model CPU offload before (real hooks, or a transformer with an `_hf_hook`)
and after parallelize_pipeline, cfg_degree=2 with a pipeline run without CFG (raising at the second step or
at the pipeline's end, before and after the placeholder shapes are known, and correct CFG calls afterwards),
data_degree larger than the batch, a cfg_degree=2 transformer call under grad mode, and with data_degree=2
an output tensor without the batch dimension. Also on the data axis: tensors inside a list argument are
split on the batch (FLUX ControlNet's per-layer residuals).
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' pipelines import it

from dist_harness import SpawnedItems, run_case_items  # noqa: E402
from reference import assert_close_to_ref  # noqa: E402

SPAWN_TIMEOUT_S = 240.0
STEPS = 2


class Case(NamedTuple):
    """One pipeline run: family "flux" or "qwen", parallelize_pipeline's keyword arguments, heads of the
    transformer, (height, width), prompts, FLUX true CFG (negative prompts; Qwen always runs it) and how
    many times the parallel pipeline is called (each call must give the reference images)."""
    key: str
    family: str
    degrees: dict
    heads: int = 6
    size: tuple[int, int] = (64, 64)
    prompts: int = 2
    negative: bool = False
    calls: int = 1


CASES = {
    2: [Case("flux-ring2", "flux", dict(ring_degree=2)),
        Case("flux-ulysses2", "flux", dict(ulysses_degree=2)),
        Case("flux-data2", "flux", dict(data_degree=2)),
        Case("flux-data2-3prompts", "flux", dict(data_degree=2), prompts=3),
        Case("flux-truecfg-cfg2", "flux", dict(cfg_degree=2), negative=True, calls=2),
        Case("qwen-cfg2", "qwen", dict(cfg_degree=2), calls=2),
        Case("qwen-data2", "qwen", dict(data_degree=2))],
    4: [Case("flux-ulysses4-6heads", "flux", dict(ulysses_degree=4), size=(64, 96)),
        Case("flux-unified2x2", "flux", dict(ring_degree=2, ulysses_degree=2)),
        Case("flux-data2-ulysses2", "flux", dict(data_degree=2, ulysses_degree=2)),
        Case("qwen-cfg2-ulysses2", "qwen", dict(cfg_degree=2, ulysses_degree=2), calls=2),
        Case("qwen-cfg2-data2", "qwen", dict(cfg_degree=2, data_degree=2)),
        Case("qwen-cfg2-ring2", "qwen", dict(cfg_degree=2, ring_degree=2))],
}
ALL_CASES = {case.key: case for cases in CASES.values() for case in cases}
TRUE_CFG_CASE = "flux-truecfg-cfg2"  # whose reference the no-CFG error check also uses

# Degrees that are not ints >= 1: (the bad argument, parallelize_pipeline's keywords at world 2). Those with
# True and 2.0 multiply to the world size, so only the type check stops them.
BAD_DEGREES = [("ring_degree", dict(ring_degree=0, ulysses_degree=2)),
               ("ulysses_degree", dict(cfg_degree=2, ulysses_degree=True)),
               ("data_degree", dict(data_degree=2.0))]


# --- pipelines, inputs, references ------------------------------------------------------------------------

def _pipeline(case: Case):
    from cp_attention import pipelines_tiny

    make = pipelines_tiny.flux_pipeline if case.family == "flux" else pipelines_tiny.qwen_pipeline
    pipe = make(seed=0, heads=case.heads)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(case: Case, pipe, **overrides) -> dict:
    from cp_attention import pipelines_tiny

    height, width = case.size
    kw = dict(prompts=case.prompts, height=height, width=width, steps=STEPS)
    if case.family == "flux":
        kw["negative"] = case.negative
    kw.update(overrides)
    make = pipelines_tiny.flux_inputs if case.family == "flux" else pipelines_tiny.qwen_inputs
    return make(pipe, **kw)


def _references(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 images of the single-process pipeline: the reference, float32 images: the baseline)."""
    from cp_attention.pipelines_tiny import run, to_dtype

    pipe = _pipeline(case)
    # Explicitly: diffusers' set_attention_backend (run by earlier tests in this process) also changes the
    # default of models that set none.
    pipe.transformer.set_attention_backend("native")
    inputs = _inputs(case, pipe)
    ref = run(*to_dtype(copy.deepcopy(pipe), inputs, torch.float64))
    assert ref.dtype == torch.float64
    return ref, run(pipe, inputs)


_REFERENCES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # in each rank: set by _rank_main


def _parallel_pipeline(case: Case, **degrees):
    import cp_attention.integrations.diffusers as cpd

    pipe = _pipeline(case)
    cpd.parallelize_pipeline(pipe, **(degrees or case.degrees))
    return pipe


def _same_on_every_rank(name: str, images: torch.Tensor) -> None:
    """A collective: every rank's images equal rank 0's, bit for bit."""
    import torch.distributed as dist

    first = images.clone()
    dist.broadcast(first, src=0)
    assert torch.equal(first, images), (f"{name}: images differ from rank 0's by up to "
                                        f"{(first - images).abs().max().item():.3g}")


def _assert_reference_images(name: str, images: torch.Tensor, key: str) -> None:
    ref, base = _REFERENCES[key]
    assert_close_to_ref(name, images.double(), ref, base, torch.float32)


def _check_images(named_images: list[tuple[str, torch.Tensor]], key: str) -> None:
    """Every run's images the same on every rank (collectives, all of them first), then each close to the
    reference of case `key` (which may fail on one rank only)."""
    for name, images in named_images:
        _same_on_every_rank(name, images)
    for name, images in named_images:
        _assert_reference_images(name, images, key)


# --- correctness ------------------------------------------------------------------------------------------

# The transformer's first layer, which runs once per transformer call that a rank computes (not for a
# placeholder) on that rank's share of the batch.
INPUT_LAYER = {"flux": "x_embedder", "qwen": "img_in"}


def _expected_work(case: Case, call: int, data_rank: int) -> list[int]:
    """The batch of every transformer call a rank computes in pipeline call `call` (0, 1, ...): its share
    of the prompts, once per pass of each step; with cfg_degree=2 one pass per step, except in the first
    step of the first call, where both replicas compute both passes (to learn the placeholders' shapes)."""
    passes = 2 if case.family == "qwen" or case.negative else 1
    if case.degrees.get("cfg_degree", 1) == 2:
        computed = STEPS + (call == 0)
    else:
        computed = passes * STEPS
    share = torch.tensor_split(torch.arange(case.prompts), case.degrees.get("data_degree", 1))[data_rank]
    return [len(share)] * computed


def _check_case(rank: int, case: Case) -> None:
    import cp_attention.integrations.diffusers as cpd
    from cp_attention.pipelines_tiny import run

    pipe = _pipeline(case)
    placed = cpd.parallelize_pipeline(pipe, **case.degrees)
    inputs = _inputs(case, pipe)
    batches: list[int] = []
    getattr(pipe.transformer, INPUT_LAYER[case.family]).register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0]))
    images, work = [], []
    for i in range(case.calls):
        batches.clear()
        images.append((f"{case.key} call {i + 1} (rank {rank})", run(pipe, inputs)))
        work.append(list(batches))
    _check_images(images, case.key)
    for i, (name, _) in enumerate(images):
        expected = _expected_work(case, i, placed.data_rank)
        assert work[i] == expected, (f"{name}: computed transformer calls of batch {work[i]}, expected "
                                     f"{expected} (this rank's share of the work)")


# --- errors (world 2) -------------------------------------------------------------------------------------

FLUX = Case("flux", "flux", {})


def _check_degree_product(rank, world_size):
    import cp_attention.integrations.diffusers as cpd

    for degrees in (dict(ulysses_degree=world_size, data_degree=2), {}):
        with pytest.raises(ValueError, match=f"must equal the world size {world_size}"):
            cpd.parallelize_pipeline(_pipeline(FLUX), **degrees)


def _check_cfg_degree_3(rank, world_size):
    import cp_attention.integrations.diffusers as cpd

    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2"):
        cpd.parallelize_pipeline(_pipeline(FLUX), cfg_degree=3)


def _check_bad_degree(name, degrees, rank, world_size):
    import cp_attention.integrations.diffusers as cpd

    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {degrees[name]!r}"):
        cpd.parallelize_pipeline(_pipeline(FLUX), **degrees)


def _check_offload_before(rank, world_size):
    """A pipeline with offload hooks is refused: real ones (enable_model_cpu_offload to the CPU), and an
    `_hf_hook` on the transformer alone (what accelerate's hooks leave on a module)."""
    import cp_attention.integrations.diffusers as cpd

    pipe = _pipeline(FLUX)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="offload"):
        cpd.parallelize_pipeline(pipe, ulysses_degree=world_size)
    pipe = _pipeline(FLUX)
    pipe.transformer._hf_hook = object()
    with pytest.raises(ValueError, match="offload.*create the pipeline without offloading"):
        cpd.parallelize_pipeline(pipe, ulysses_degree=world_size)


def _check_offload_after(rank, world_size):
    pipe = _parallel_pipeline(FLUX, ulysses_degree=world_size)
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(ValueError, match=f"{method} after parallelize_pipeline: .*offload"):
            getattr(pipe, method)(device="cpu")
    assert not hasattr(pipe.transformer, "_hf_hook"), "the refused offload left a hook on the transformer"


def _check_cfg2_without_guidance(rank, world_size):
    """cfg_degree=2 and FLUX run without a negative prompt (one "cond" call per step): RuntimeError at the
    second step, or with one step at the pipeline's end; first before any CFG call (both replicas compute
    the first "cond" call), then after one (replica 1 gets a NaN placeholder). CFG calls in between and
    after give the reference images."""
    from cp_attention.pipelines_tiny import run

    case = ALL_CASES[TRUE_CFG_CASE]
    pipe = _parallel_pipeline(case)
    with_cfg = _inputs(case, pipe)
    without = {steps: _inputs(case, pipe, negative=False, steps=steps) for steps in (2, 1)}

    def refused():
        with pytest.raises(RuntimeError, match="another conditional call came first"):
            run(pipe, without[2])
        with pytest.raises(RuntimeError, match="the pipeline call ended first"):
            run(pipe, without[1])

    refused()
    images = [(f"CFG call after the refused ones (rank {rank})", run(pipe, with_cfg))]
    refused()
    images.append((f"CFG call after the refused ones, shapes known (rank {rank})", run(pipe, with_cfg)))
    _check_images(images, case.key)


def _check_data_batch_too_small(rank, world_size):
    from cp_attention.pipelines_tiny import run

    pipe = _parallel_pipeline(FLUX, data_degree=world_size)
    with pytest.raises(ValueError, match=f"data_degree={world_size} needs a batch of at least {world_size}"):
        run(pipe, _inputs(FLUX, pipe, prompts=1))


def _check_cfg2_grad_mode(rank, world_size):
    """A cfg_degree=2 transformer call that autograd would record (grad mode, parameters requiring grad)."""
    from cp_attention.demo import flux_inputs

    transformer = _parallel_pipeline(FLUX, cfg_degree=2).transformer
    assert any(p.requires_grad for p in transformer.parameters())
    inputs = flux_inputs(dict(transformer.config), 64, 64, 16, 2, seed=0)
    with torch.enable_grad(), transformer.cache_context("cond"):
        with pytest.raises(RuntimeError, match="inference-only"):
            transformer(**inputs)


class _Residuals(torch.nn.Module):
    """A transformer-like module whose forward takes per-layer residuals as a list of [B, ...] tensors (as
    FLUX ControlNet's controlnet_block_samples) and can return an extra tensor without a batch dimension."""

    def forward(self, hidden_states, block_samples=None, extra=False):
        for sample in block_samples:
            hidden_states = hidden_states + sample
        return (hidden_states, torch.ones(1, 4)) if extra else (hidden_states,)


def _replica_module(rank, world_size):
    import torch.distributed as dist

    from cp_attention.integrations._replicas import Axes, ReplicaForward

    module = _Residuals()
    ReplicaForward(module, Axes(1, 0, None, world_size, rank, dist.group.WORLD)).install()
    return module


def _check_data_split_list_of_tensors(rank, world_size):
    """Every tensor inside a list argument is split on the batch (3 prompts: shares 2 and 1), not the list."""
    x = torch.arange(3.0)[:, None].repeat(1, 5)
    samples = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = _Residuals()(x, samples)[0]
    got = _replica_module(rank, world_size)(x, block_samples=samples)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _check_data_output_without_batch(rank, world_size):
    """An output tensor without the batch dimension raises on every rank (even where it matches the share),
    instead of a gather that only some ranks join."""
    module = _replica_module(rank, world_size)
    with pytest.raises(ValueError, match="must carry the batch in its first dimension"):
        module(torch.zeros(3, 4), block_samples=[], extra=True)


def _check_auto_layout(rank, world_size):
    """layout="auto": the planner's best layout that fits the pipeline (Ulysses groups consecutive, the data
    split within the batch; with cfg an even data degree is the CFG axis), and the reference images. On the
    toy profile every link is slow, so CFG parallelism (no communication during attention) wins."""
    from conftest import toy_hardware

    import cp_attention.integrations.diffusers as cpd
    from cp_attention import plan
    from cp_attention.pipelines_tiny import run

    case = ALL_CASES["qwen-cfg2"]
    pipe = _pipeline(case)
    inputs = _inputs(case, pipe)
    seq = inputs["latents"].shape[1] + inputs["prompt_embeds"].shape[1]
    hw = toy_hardware(fast_span=1)
    chosen = cpd.parallelize_pipeline(pipe, layout="auto", seq_len=seq, batch=2, cfg=True, hardware=hw)
    plans = plan(world_size, seq_len=seq, heads=6, head_dim=32, batch=2, cfg=True, hardware=hw)
    assert chosen.plan == plans[0] and chosen.plan.data_degree == world_size
    assert (chosen.cfg_degree, chosen.data_degree, chosen.ring_degree, chosen.ulysses_degree) == (2, 1, 1, 1)
    _check_images([(f"auto layout (rank {rank})", run(pipe, inputs))], case.key)


def _check_auto_layout_misuse(rank, world_size):
    import cp_attention.integrations.diffusers as cpd

    pipe = _pipeline(FLUX)
    with pytest.raises(ValueError, match="layout='auto' needs seq_len"):
        cpd.parallelize_pipeline(pipe, layout="auto")
    with pytest.raises(ValueError, match="layout must be None or 'auto'"):
        cpd.parallelize_pipeline(pipe, layout="auto", seq_len=64, ring_degree=2)
    with pytest.raises(ValueError, match="layout must be None or 'auto'"):
        cpd.parallelize_pipeline(pipe, layout="fastest", seq_len=64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="hardware must be given on a machine without a CUDA device"):
            cpd.parallelize_pipeline(pipe, layout="auto", seq_len=64)


ERROR_CHECKS = [("error-degree-product", _check_degree_product),
                ("error-cfg-degree-3", _check_cfg_degree_3)]
ERROR_CHECKS += [(f"error-bad-{name}={degrees[name]!r}", functools.partial(_check_bad_degree, name, degrees))
                 for name, degrees in BAD_DEGREES]
ERROR_CHECKS += [("error-offload-before", _check_offload_before),
                 ("error-offload-after", _check_offload_after),
                 ("error-cfg2-without-guidance", _check_cfg2_without_guidance),
                 ("error-data2-one-prompt", _check_data_batch_too_small),
                 ("error-cfg2-grad-mode", _check_cfg2_grad_mode),
                 ("data2-list-of-tensors", _check_data_split_list_of_tensors),
                 ("error-data2-output-without-batch", _check_data_output_without_batch),
                 ("auto-layout", _check_auto_layout),
                 ("error-auto-layout", _check_auto_layout_misuse)]
ERROR_WORLD_SIZE = 2


# --- the spawns -------------------------------------------------------------------------------------------

def _items(world_size: int) -> list[tuple[str, object]]:
    items = [(case.key, case) for case in CASES[world_size]]
    if world_size == ERROR_WORLD_SIZE:
        items += ERROR_CHECKS
    return items


def _rank_main(references: dict, rank: int, world_size: int) -> dict[str, str | None]:
    _REFERENCES.update(references)
    return run_case_items(rank, world_size, _items(world_size), {Case: _check_case})


@pytest.fixture(scope="module")
def runs():
    # References in this process, before any rank starts: no process group, no parallelism.
    references = {key: _references(case) for key, case in ALL_CASES.items()}
    # "cpu:gloo": diffusers picks the device of its size exchange from the backend's name.
    rank_main = functools.partial(_rank_main, references)
    rank_main.__name__ = _rank_main.__name__  # the harness names it in its messages (not the references)
    return SpawnedItems(rank_main, SPAWN_TIMEOUT_S, backend="cpu:gloo")


ITEMS = [(P, key) for P in CASES for key, _ in _items(P)]


@pytest.mark.parametrize("world_size,key", ITEMS, ids=[f"ws{P}-{k}" for P, k in ITEMS])
def test_parallelize_pipeline(runs, world_size, key):
    runs.assert_ok(world_size, key)

"""ContextParallel on gloo: every (ring x ulysses) shape of world sizes 1-4 shards a global problem with
.shard, runs .attention, reassembles with .gather and matches the float64 reference over the whole sequence;
a mesh built outside is accepted; misuse raises ValueError on every rank."""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_items
from reference import check_attention

SPAWN_TIMEOUT_S = 120.0
AUTO_HEADS = [1, 12]  # ContextParallel.auto at world 4: one head allows only the ring
WORLD_SIZES = [1, 2, 3, 4]
# (ring, ulysses) meshes per world size: every factorization.
MESHES = {P: [(r, P // r) for r in range(1, P + 1) if P % r == 0] for P in WORLD_SIZES}
# (name, B, S, H, Hkv, D, dtype, causal, masked): S = 61 splits unevenly over 2, 3 and 4 ranks.
PROBLEMS = [("s61-causal-mqa-mask-f32", 2, 61, 12, 1, 16, torch.float32, True, True),
            ("s61-full-f16", 1, 61, 12, 12, 24, torch.float16, False, False)]


def _problem(name, B, S, H, Hkv, D, dtype, causal, masked):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = randn(B, S, H, D, dtype=dtype, gen=gen)
    k = randn(B, S, Hkv, D, dtype=dtype, gen=gen)
    v = randn(B, S, Hkv, D, dtype=dtype, gen=gen)
    mask = make_kv_mask(B, S, gen) if masked else None
    return q, k, v, mask


def _check_problem(cp, problem):
    name, *_, causal, masked = problem
    q, k, v, mask = _problem(*problem)
    local = [cp.shard(t) for t in (q, k, v)]
    out, lse = cp.attention(*local, causal=causal, kv_mask=None if mask is None else cp.shard(mask),
                            return_lse=True)
    assert out.shape[1] == local[0].shape[1] and lse.shape[2] == local[0].shape[1]
    check_attention(cp.gather(out), cp.gather(lse, dim=2), q, k, v, causal=causal, kv_mask=mask)


def _check_shard_gather(cp, rank):
    """shard follows torch.tensor_split in mesh-rank order; gather puts uneven chunks back, bit for bit."""
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).reshape(2, 11, 3)
    chunk = cp.shard(x)
    assert torch.equal(chunk, torch.tensor_split(x, cp.world_size, dim=1)[cp.rank])
    assert cp.rank == rank, f"mesh rank {cp.rank} on global rank {rank} (meshes here span the world in order)"
    assert torch.equal(cp.gather(chunk), x)
    assert torch.equal(cp.gather(cp.shard(x, dim=-1), dim=-1), x)


def _check_given_mesh(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from cp_attention import ContextParallel

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("ring", "ulysses"))
    cp = ContextParallel(mesh=mesh)
    mode = "ulysses" if world_size > 1 else "ring"  # 1 x 1 is the ring over one rank
    assert (cp.ring_degree, cp.ulysses_degree, cp.mode) == (1, world_size, mode)
    _check_problem(cp, PROBLEMS[0])
    with pytest.raises(ValueError, match="ring_degree=2 does not match"):
        ContextParallel(ring_degree=2, mesh=mesh)
    flat = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    with pytest.raises(ValueError, match="mesh must be a DeviceMesh with mesh_dim_names"):
        ContextParallel(mesh=flat)


def _check_misuse(rank, world_size):
    from cp_attention import ContextParallel

    with pytest.raises(ValueError, match="must equal the world size"):
        ContextParallel(ring_degree=world_size, ulysses_degree=2)
    with pytest.raises(ValueError, match="ulysses_degree must be an int >= 1"):
        ContextParallel(ring_degree=1, ulysses_degree=0)
    if world_size == 1:
        return
    # A chunk whose other dims differ on one rank: every rank raises (they all see every shape).
    cp = ContextParallel(ring_degree=world_size)
    x = torch.zeros(1, 3, 2 if rank else 4)
    with pytest.raises(ValueError, match="must match outside dim 1"):
        cp.gather(x)


# ---------------------------------------------------------------------------------------------------------
# The data axis: (data, ring, ulysses) meshes; each replica attends over its share of the batch.
DATA_MESHES = {2: [(2, 1, 1)], 4: [(2, 2, 1), (2, 1, 2), (4, 1, 1)]}
# (name, B, S, H, Hkv, D, dtype, causal, masked): B = 5 splits unevenly over 2 and 4 replicas.
DATA_PROBLEM = ("b5-s23-causal-gqa-mask-f32", 5, 23, 4, 2, 16, torch.float32, True, True)


def _check_data_axis(rank, world_size, data, ring, ulysses):
    from cp_attention import ContextParallel

    cp = ContextParallel(ring_degree=ring, ulysses_degree=ulysses, data_degree=data)
    assert (cp.data_degree, cp.world_size) == (data, ring * ulysses)
    assert cp.data_rank == rank // (ring * ulysses), "replicas hold consecutive ranks"
    name, *_, causal, masked = DATA_PROBLEM
    q, k, v, mask = _problem(*DATA_PROBLEM)
    share = [cp.split_batch(t) for t in (q, k, v, mask)]
    assert torch.equal(share[0], torch.tensor_split(q, data)[cp.data_rank])
    local = [cp.shard(t) for t in share]
    out, lse = cp.attention(*local[:3], causal=causal, kv_mask=local[3], return_lse=True)
    full_out = cp.gather_batch(cp.gather(out))
    full_lse = cp.gather_batch(cp.gather(lse, dim=2))
    check_attention(full_out, full_lse, q, k, v, causal=causal, kv_mask=mask)

    # Differentiable both ways: each rank gets back the gradient over its own block only.
    x = torch.arange(5 * 7 * 3, dtype=torch.float32).view(5, 7, 3).requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).view(x.shape)
    (cp.gather_batch(cp.gather(cp.shard(cp.split_batch(x)) * 3.0)) * w).sum().backward()
    own = torch.zeros(x.shape, dtype=torch.bool)
    torch.tensor_split(torch.tensor_split(own, data)[cp.data_rank], cp.world_size, dim=1)[cp.rank].fill_(True)
    assert torch.equal(x.grad, torch.where(own, 3.0 * w, 0.0)), "gather_batch/gather backward: not the slice"


def _check_data_misuse(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from cp_attention import ContextParallel

    with pytest.raises(ValueError, match="data_degree \\* ring_degree \\* ulysses_degree must equal"):
        ContextParallel(ring_degree=world_size, data_degree=2)
    with pytest.raises(ValueError, match="data_degree must be an int >= 1"):
        ContextParallel(data_degree=0)
    mesh = init_device_mesh("cpu", (2, 1, world_size // 2), mesh_dim_names=("data", "ring", "ulysses"))
    cp = ContextParallel(mesh=mesh)
    assert (cp.data_degree, cp.ring_degree, cp.ulysses_degree) == (2, 1, world_size // 2)
    with pytest.raises(ValueError, match="data_degree=1 does not match"):
        ContextParallel(mesh=mesh, data_degree=1)


def _check_auto(rank, world_size, heads):
    """ContextParallel.auto builds the planner's best layout, placement included, and attends exactly. With
    one head only the ring fits; with 12 the toy profile's fast link favours Ulysses."""
    import torch.distributed as dist
    from conftest import toy_hardware

    from cp_attention import ContextParallel, plan

    hw = toy_hardware(fast_span=2)
    cp = ContextParallel.auto(4096, heads, 64, hardware=hw)
    best = plan(world_size, seq_len=4096, heads=heads, head_dim=64, hardware=hw)[0]
    assert cp.plan == best
    assert (cp.data_degree, cp.ring_degree, cp.ulysses_degree) == (best.data_degree, best.ring_degree,
                                                                  best.ulysses_degree)
    if cp.ulysses_degree > 1:
        assert dist.get_process_group_ranks(cp.ulysses_group)[:2] == _placed_group(rank, best, "ulysses")
    problem = ("auto", 1, 37, heads, heads, 16, torch.float32, True, False)
    _check_problem(cp, problem)


def _placed_group(rank, best, dim):
    """The first two global ranks of this rank's group along dim, as the plan's placement puts them."""
    R, U = best.ring_degree, best.ulysses_degree
    base, local = rank - rank % (R * U), rank % (R * U)
    if best.placement == "ring-inner":  # global = base + u * R + r
        r, u = local % R, local // R
        ulysses, ring = [base + i * R + r for i in range(U)], [base + u * R + i for i in range(R)]
    else:  # global = base + r * U + u
        r, u = local // U, local % U
        ulysses, ring = [base + r * U + i for i in range(U)], [base + i * U + u for i in range(R)]
    return (ulysses if dim == "ulysses" else ring)[:2]


def _check_ring_inner_mesh(rank, world_size):
    """A ring-inner plan's mesh: ring groups on consecutive ranks, Ulysses groups strided; attention exact."""
    import dataclasses

    import torch.distributed as dist
    from conftest import toy_hardware

    from cp_attention import ContextParallel, plan
    from cp_attention.planner import placement_mesh

    plans = plan(world_size, seq_len=512, heads=4, head_dim=16, hardware=toy_hardware())
    two_by_two = next(p for p in plans if (p.ring_degree, p.ulysses_degree) == (2, 2))
    ring_inner = dataclasses.replace(two_by_two, placement="ring-inner")
    cp = ContextParallel(mesh=placement_mesh(ring_inner, "cpu"))
    assert dist.get_process_group_ranks(cp.ring_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(cp.ulysses_group) == [rank % 2, rank % 2 + 2]
    assert dist.get_process_group_ranks(cp.ulysses_group)[:2] == _placed_group(rank, ring_inner, "ulysses")
    _check_problem(cp, ("ring-inner", 2, 29, 4, 2, 16, torch.float32, False, True))


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    from cp_attention import ContextParallel

    results = {}
    for data, ring, ulysses in DATA_MESHES.get(world_size, []):
        results.update(run_items([(f"data{data}x{ring}x{ulysses}", functools.partial(
            _check_data_axis, rank, world_size, data, ring, ulysses))]))
    if world_size in DATA_MESHES:
        results.update(run_items([("data-misuse", functools.partial(_check_data_misuse, rank, world_size))]))
    for ring, ulysses in MESHES[world_size]:
        cp = ContextParallel(ring_degree=ring, ulysses_degree=ulysses)
        items = [(f"{ring}x{ulysses}-{p[0]}", functools.partial(_check_problem, cp, p)) for p in PROBLEMS]
        items.append((f"{ring}x{ulysses}-shard-gather", functools.partial(_check_shard_gather, cp, rank)))
        results.update(run_items(items))
    if world_size == 4:
        results.update(run_items([(f"auto-heads{h}", functools.partial(_check_auto, rank, world_size, h))
                                  for h in AUTO_HEADS]))
        results.update(run_items([("ring-inner-mesh", functools.partial(_check_ring_inner_mesh, rank,
                                                                        world_size))]))
    results.update(run_items([("given-mesh", functools.partial(_check_given_mesh, rank, world_size)),
                              ("misuse", functools.partial(_check_misuse, rank, world_size))]))
    return results


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


MESH_ITEMS = [(P, f"{r}x{u}-{p[0]}") for P in WORLD_SIZES for r, u in MESHES[P] for p in PROBLEMS]
SHARD_ITEMS = [(P, f"{r}x{u}-shard-gather") for P in WORLD_SIZES for r, u in MESHES[P]]


@pytest.mark.parametrize("world_size,key", MESH_ITEMS, ids=[f"ws{P}-{k}" for P, k in MESH_ITEMS])
def test_attention_matches_reference(runs, world_size, key):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("world_size,key", SHARD_ITEMS, ids=[f"ws{P}-{k}" for P, k in SHARD_ITEMS])
def test_shard_then_gather_is_identity(runs, world_size, key):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_given_mesh(runs, world_size):
    runs.assert_ok(world_size, "given-mesh")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_misuse_raises_on_every_rank(runs, world_size):
    runs.assert_ok(world_size, "misuse")


def test_needs_initialised_process_group():
    import cp_attention

    with pytest.raises(RuntimeError, match="init_process_group"):
        cp_attention.ContextParallel(ring_degree=1)


DATA_ITEMS = [(P, f"data{d}x{r}x{u}") for P, meshes in DATA_MESHES.items() for d, r, u in meshes]


@pytest.mark.parametrize("world_size,key", DATA_ITEMS, ids=[f"ws{P}-{k}" for P, k in DATA_ITEMS])
def test_data_axis_replicas_match_reference(runs, world_size, key):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("world_size", sorted(DATA_MESHES))
def test_data_axis_misuse(runs, world_size):
    runs.assert_ok(world_size, "data-misuse")


@pytest.mark.parametrize("heads", AUTO_HEADS)
def test_auto_builds_the_planned_layout(runs, heads):
    runs.assert_ok(4, f"auto-heads{heads}")


def test_ring_inner_placement_mesh(runs):
    runs.assert_ok(4, "ring-inner-mesh")

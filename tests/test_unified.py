"""Unified (ring x Ulysses) attention (cp_attention.distributed.unified_attention) on gloo meshes 2x2, 1x4,
4x1 and 1x1: every rank's output and LSE against the float64 reference over the whole sequence, sliced to
the rank, under the tolerance rule; and misuse in one row that must raise on every rank of the mesh."""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_items
from test_ring import _check_shard, _lengths, _shard

SPAWN_TIMEOUT_S = 120.0
F32, F16 = torch.float32, torch.float16


class Case(NamedTuple):
    """One problem on a (ring_degree x ulysses_degree) mesh; seq as in test_ring (global length or per-rank
    lengths in global-rank order)."""
    name: str
    ring: int
    ulysses: int
    B: int
    seq: int | tuple[int, ...]
    H: int
    Hkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    masked: bool = False


CASES = [
    Case("1x1-s37-causal-f32-mask", 1, 1, 2, 37, 2, 1, 16, F32, True, True),
    Case("2x2-s1001-causal-f32", 2, 2, 1, 1001, 4, 2, 16, F32, True),
    Case("2x2-lens9,0,30,4-causal-f16-mask", 2, 2, 2, (9, 0, 30, 4), 4, 4, 8, F16, True, True),
    Case("2x2-s50-full-mqa-f32-mask", 2, 2, 2, 50, 2, 1, 24, F32, False, True),
    Case("1x4-s45-causal-gqa-f32-mask", 1, 4, 2, 45, 8, 2, 16, F32, True, True),
    Case("4x1-s45-causal-gqa-f16-mask", 4, 1, 2, 45, 4, 2, 16, F16, True, True),
    # 9 heads over rows of 2: 5 and 4; kv heads 0-1 and 1-2 (kv head 1 on both, repeated locally on rank 0).
    Case("2x2-s21-causal-h9kv3-f16-mask", 2, 2, 1, 21, 9, 3, 8, F16, True, True),
    Case("1x4-s10-full-h6kv2-f32", 1, 4, 1, 10, 6, 2, 8, F32, False),
]


def _groups(ring: int, ulysses: int):
    """(ring_group, ulysses_group) of this rank. Every rank creates every group, in one order (new_group is
    collective)."""
    import torch.distributed as dist

    me = dist.get_rank()
    ring_group = ulysses_group = None
    for row in range(ring):
        g = dist.new_group([row * ulysses + u for u in range(ulysses)])
        if me // ulysses == row:
            ulysses_group = g
    for col in range(ulysses):
        g = dist.new_group([row * ulysses + col for row in range(ring)])
        if me % ulysses == col:
            ring_group = g
    return ring_group, ulysses_group


def _run_case(rank: int, case: Case, groups):
    from cp_attention.distributed import unified_attention

    world = case.ring * case.ulysses
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    lens = _lengths(case.seq, world)
    S = sum(lens)
    q = randn(case.B, S, case.H, case.D, dtype=case.dtype, gen=gen)
    k = randn(case.B, S, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    v = randn(case.B, S, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    mask = make_kv_mask(case.B, S, gen) if case.masked else None
    ring_group, ulysses_group = groups
    args = [_shard(t, lens, rank) for t in (q, k, v, mask)]
    out, lse = unified_attention(*args[:3], ring_group=ring_group, ulysses_group=ulysses_group,
                                 causal=case.causal, kv_mask=args[3], return_lse=True)
    start = sum(lens[:rank])
    _check_shard(out, lse, q, k, v, slice(start, start + lens[rank]), case.causal, mask)


def _check_misuse(rank: int, groups):
    """A head-count mismatch inside row 1 of a 2x2 mesh raises ValueError on all four ranks (row 0's ranks
    learn it through the column exchange) instead of leaving row 0 waiting in the ring; so does a row with
    more ranks than heads."""
    from cp_attention.distributed import unified_attention

    ring_group, ulysses_group = groups
    H = 4 if rank != 3 else 2
    x = torch.zeros(1, 5, H, 8)
    with pytest.raises(ValueError, match="unified_attention"):
        unified_attention(x, x, x, ring_group=ring_group, ulysses_group=ulysses_group)
    # One head for rows of two ranks: refused on every rank, naming the group.
    y = torch.zeros(1, 5, 1, 8)
    with pytest.raises(ValueError, match=r"ulysses_group.size\(\)=2 exceeds the number of query heads H=1"):
        unified_attention(y, y, y, ring_group=ring_group, ulysses_group=ulysses_group)


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    results = {}
    meshes = sorted({(c.ring, c.ulysses) for c in CASES if c.ring * c.ulysses == world_size})
    for ring, ulysses in meshes:
        groups = _groups(ring, ulysses)
        items = [(c.name, functools.partial(_run_case, rank, c, groups))
                 for c in CASES if (c.ring, c.ulysses) == (ring, ulysses)]
        if (ring, ulysses) == (2, 2):
            items.append(("misuse-2x2", functools.partial(_check_misuse, rank, groups)))
        results.update(run_items(items))
    return results


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


def _assert_item(runs, world_size: int, key: str):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unified_matches_reference(runs, case):
    _assert_item(runs, case.ring * case.ulysses, case.name)


def test_unified_misuse_in_one_row_raises_on_every_rank(runs):
    _assert_item(runs, 4, "misuse-2x2")

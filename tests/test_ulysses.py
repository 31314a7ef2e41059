"""Ulysses attention (cp_attention.distributed.ulysses_attention) on 1 to 5 gloo ranks: every rank's output
and LSE against the float64 reference over the whole sequence, sliced to the rank, under the tolerance rule,
head counts that do not divide by the group size included (and their gradients on 5 ranks); and misuse that
must raise on every rank (torch.compile: tests/test_cp_compile.py).

Each world size is spawned once (the `runs` fixture) and runs all of its items; each test then reports its
own item's outcome on every rank.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_case_items
from test_cp_backward import Case as GradCase
from test_cp_backward import _run_case as _run_grad_case
from test_ring import _check_shard, _lengths, _shard

SPAWN_TIMEOUT_S = 120.0
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


class Case(NamedTuple):
    """One Ulysses problem. seq: global length split by torch.tensor_split, or explicit per-rank lengths.
    mask: "none", "random" (last batch fully masked when B > 1), "rank" (random, and one rank's whole
    chunk masked) or "4d" (random, passed as [B, 1, 1, S_r])."""
    name: str
    world_size: int
    B: int
    seq: int | tuple[int, ...]
    H: int
    Hkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    mask: str = "none"


CASES = [
    Case("ws1-s37-causal-f16-mask", 1, 2, 37, 4, 1, 24, F16, True, "random"),
    Case("ws2-s64-full-f32", 2, 1, 64, 2, 2, 32, F32, False),
    Case("ws2-s65-causal-gqa-f16-mask", 2, 2, 65, 4, 2, 16, F16, True, "random"),
    Case("ws2-lens0,50-causal-mqa-f32-4d", 2, 2, (0, 50), 2, 1, 8, F32, True, "4d"),
    Case("ws3-s1001-causal-f32", 3, 1, 1001, 3, 3, 16, F32, True),
    Case("ws3-s1001-full-f16-rankmask", 3, 1, 1001, 6, 3, 16, F16, False, "rank"),
    Case("ws3-lens40,0,23-causal-mqa-f16-mask", 3, 2, (40, 0, 23), 3, 1, 8, F16, True, "random"),
    Case("ws4-lens10,0,30,5-causal-gqa-f16-mask", 4, 2, (10, 0, 30, 5), 8, 2, 16, F16, True, "random"),
    Case("ws4-s50-causal-f32-rankmask", 4, 2, 50, 4, 4, 16, F32, True, "rank"),
    Case("ws4-s23-full-gqa8-bf16", 4, 1, 23, 8, 8, 8, BF16, False),
    # Heads that do not divide evenly: the first H % P ranks get one query head more.
    Case("ws3-s10-causal-h8kv2-f32-4d", 3, 1, 10, 8, 2, 8, F32, True, "4d"),  # rank 1 reads kv heads 0 and 1
    Case("ws4-s9-full-h30-f16", 4, 1, 9, 30, 30, 4, F16, False),
    Case("ws4-lens3,0,5,2-causal-h6kv2-bf16-mask", 4, 2, (3, 0, 5, 2), 6, 2, 8, BF16, True, "random"),
    Case("ws5-s13-causal-h8-f32-mask", 5, 1, 13, 8, 8, 8, F32, True, "random"),
]
WORLD_SIZES = [1, 2, 3, 4, 5]
# Gradients on 5 ranks (tests/test_cp_backward.py covers 1 to 4), run in this file's 5-rank spawn.
GRAD_CASES = [GradCase("ulysses-ws5-s12-causal-h8-f32", "ulysses", 5, 1, 12, 8, 8, 8, F32, True, "random"),
              GradCase("ulysses-ws5-s11-full-h7kv1-f16", "ulysses", 5, 2, 11, 7, 1, 8, F16, False)]
MISUSE_WS = [2, 3]


def _make_problem(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    lens = _lengths(case.seq, case.world_size)
    S = sum(lens)
    q = randn(case.B, S, case.H, case.D, dtype=case.dtype, gen=gen)
    k = randn(case.B, S, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    v = randn(case.B, S, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    mask = None
    if case.mask != "none":
        mask = make_kv_mask(case.B, S, gen)
        if case.mask == "rank":
            r = case.world_size // 2
            start = sum(lens[:r])
            assert lens[r] > 0, "the masked rank must hold keys"
            mask[:, start:start + lens[r]] = False
    return q, k, v, mask, lens


def _run_case(rank: int, case: Case):
    from cp_attention.distributed import ulysses_attention

    q, k, v, mask, lens = _make_problem(case)
    q_r, k_r, v_r, mask_r = (_shard(t, lens, rank) for t in (q, k, v, mask))
    if case.mask == "4d":
        mask_r = mask_r[:, None, None, :]
    # Both collective calls before any check: a rank failing a check must not strand the others.
    out, lse = ulysses_attention(q_r, k_r, v_r, causal=case.causal, kv_mask=mask_r, return_lse=True)
    out_only = ulysses_attention(q_r, k_r, v_r, causal=case.causal, kv_mask=mask_r)
    start = sum(lens[:rank])
    _check_shard(out, lse, q, k, v, slice(start, start + lens[rank]), case.causal, mask)
    assert isinstance(out_only, torch.Tensor), "return_lse=False must return only out"
    assert torch.equal(out_only, out), "return_lse=False changed out"


def _check_misuse(rank: int, world_size: int):
    """Inconsistent or unsupported inputs raise ValueError on every rank (never a hang), naming the problem;
    the group stays usable afterwards."""
    from cp_attention.distributed import ulysses_attention

    def expect(match, q, k, v, **kw):
        with pytest.raises(ValueError, match=match):
            ulysses_attention(q, k, v, **kw)

    x = torch.randn(1, 4, 6, 8)
    # Heads differ on the last rank.
    h = 3 if rank == world_size - 1 else 6
    y = torch.randn(1, 4, h, 8)
    expect("disagree on the number of query heads H", y, y, y)
    # dtypes differ on rank 0.
    z = x.half() if rank == 0 else x
    expect("disagree on the dtype", z, z, z)
    # Fewer query heads than ranks: some rank would get none.
    w = torch.randn(1, 4, world_size - 1, 8)
    expect(f"group.size\\(\\)={world_size} exceeds the number of query heads H={world_size - 1}", w, w, w)
    # One rank's own inputs are invalid (its k has another head dim): it raises its own error, the others
    # learn of it from the exchange.
    bad = torch.randn(1, 4, 6, 4) if rank == 0 else x
    expect("head dim" if rank == 0 else "rejected their own inputs", x, bad, bad)
    # A mask on some ranks only.
    m = torch.ones(1, 4, dtype=torch.bool) if rank == 0 else None
    expect("presence of kv_mask", x, x, x, kv_mask=m)
    # And the group still works.
    out = ulysses_attention(x, x, x)
    assert out.shape == x.shape


def _item_list(world_size: int):
    items = [(c.name, c) for c in CASES + GRAD_CASES if c.world_size == world_size]
    if world_size in MISUSE_WS:
        items.append((f"misuse-ws{world_size}", _check_misuse))
    return items


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    runners = {Case: _run_case, GradCase: _run_grad_case}
    return run_case_items(rank, world_size, _item_list(world_size), runners)


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


def _assert_item(runs, world_size: int, key: str):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ulysses_matches_reference(runs, case):
    _assert_item(runs, case.world_size, case.name)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_ulysses_grads_on_5_ranks(runs, case):
    _assert_item(runs, case.world_size, case.name)


@pytest.mark.parametrize("world_size", MISUSE_WS)
def test_ulysses_misuse_raises_on_every_rank(runs, world_size):
    _assert_item(runs, world_size, f"misuse-ws{world_size}")


def test_ulysses_needs_initialised_process_group():
    from cp_attention.distributed import ulysses_attention

    x = torch.zeros(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(x, x, x)

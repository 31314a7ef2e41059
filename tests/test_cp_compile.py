"""Context-parallel attention under torch.compile, on gloo: ring (3 ranks), Ulysses (2 ranks) and Unified (a
2x2 mesh) compiled around a call and fed a run of global lengths in which only some ranks' shards change
(301, 302, 301, ...). Every call must give eager's bits and the float64 reference's values on every rank, in
the spawn's time limit (a rank that traces alone into a collective would hang). With `seq_lens` the call
traces whole (fullgraph=True); without it the lengths are exchanged eagerly through a graph break.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_items
from test_ring import _check_shard, _lengths, _shard
from test_unified import _groups

SPAWN_TIMEOUT_S = 240.0
# Global lengths: from one to the next only some ranks' shards change length.
LENGTHS = {2: [301, 302, 301], 3: [31, 32, 31, 33], 4: [301, 302, 301]}
MODES = [("ring", 3), ("ulysses", 2), ("unified", 4)]
STATED = [True, False]  # seq_lens given (fullgraph) or not (graph break around the exchange)


def _problem(S: int, world: int, causal_seed: str):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{causal_seed}-{S}".encode()))
    q = randn(1, S, 4, 8, gen=gen)
    k = randn(1, S, 2, 8, gen=gen)
    v = randn(1, S, 2, 8, gen=gen)
    mask = make_kv_mask(1, S, gen)
    return q, k, v, mask, _lengths(S, world)


def _check_compiled(rank: int, world: int, mode: str, stated: bool):
    import torch.distributed as dist

    from cp_attention.distributed import ring_attention, ulysses_attention, unified_attention

    torch._dynamo.reset()
    if mode == "unified":
        ring_group, ulysses_group = _groups(2, 2)
        call = functools.partial(unified_attention, ring_group=ring_group, ulysses_group=ulysses_group)
    else:
        attend = ring_attention if mode == "ring" else ulysses_attention
        call = functools.partial(attend, group=dist.group.WORLD)

    def fn(q, k, v, mask, S):
        kw = {"seq_lens": S} if stated else {}  # unstated: the default call
        out, lse = call(q, k, v, causal=True, kv_mask=mask, return_lse=True, **kw)
        return out * 2.0, lse

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=stated)
    for S in LENGTHS[world]:
        q, k, v, mask, lens = _problem(S, world, mode)
        args = [_shard(t, lens, rank) for t in (q, k, v, mask)]
        got_out, got_lse = compiled(*args, S)
        want_out, want_lse = fn(*args, S)
        torch.testing.assert_close(got_out, want_out, rtol=0, atol=0, msg=f"S={S}: compiled out != eager")
        torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0, msg=f"S={S}: compiled lse != eager")
        start = sum(lens[:rank])
        _check_shard(got_out / 2.0, got_lse, q, k, v, slice(start, start + lens[rank]), True, mask)


def _key(mode: str, stated: bool) -> str:
    return f"{mode}-{'seq_lens' if stated else 'exchanged'}"


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    return run_items((_key(mode, stated), functools.partial(_check_compiled, rank, world, mode, stated))
                     for mode, world in MODES if world == world_size for stated in STATED)


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("stated", STATED, ids=["fullgraph-seq_lens", "graph-break-exchange"])
@pytest.mark.parametrize("mode,world", MODES, ids=[m for m, _ in MODES])
def test_compiled_call_follows_changing_shard_lengths(runs, mode, world, stated):
    runs.assert_ok(world, _key(mode, stated))

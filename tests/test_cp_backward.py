"""The backward pass of context-parallel attention on 1 to 4 gloo ranks: ring, Ulysses and Unified (through
ContextParallel), each rank's dq, dk, dv against float64 autograd over the whole sequence, sliced to the
rank, under the tolerance rule of tests/reference.py; plus the ring backward's determinism, its memory bound
(foreign chunks and accumulators alive at once), the aten backend inside the ring, gather's backward, and
a failed step that must not leave another rank's gradients silently short.

Each world size is spawned once (the `runs` fixture) and runs all of its items.
"""

from __future__ import annotations

import time
import zlib
from typing import NamedTuple

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_case_items
from reference import assert_close_to_ref, attention_bwd_ref, same_dtype_math_path_bwd
from test_ring import _lengths, _shard

SPAWN_TIMEOUT_S = 240.0
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


class Case(NamedTuple):
    """One problem. mode: "ring", "ulysses" or "unified" (R x U mesh, R * U == world_size). seq: global
    length (tensor_split) or per-rank lengths; kv_seq: the same for K/V (ring only; None: like seq). mask:
    "none", "random" (last batch fully masked when B > 1) or "4d" (random, passed as [B, 1, 1, S_r]).
    dlse: whether the loss uses the lse too."""
    name: str
    mode: str
    world_size: int
    B: int
    seq: int | tuple[int, ...]
    H: int
    Hkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    mask: str = "none"
    dlse: bool = True
    kv_seq: int | tuple[int, ...] | None = None
    mesh: tuple[int, int] | None = None
    backend: str = "auto"


CASES = [
    Case("ring-ws1-s21-causal-f32-mask", "ring", 1, 2, 21, 4, 2, 16, F32, True, "random"),
    Case("ring-ws2-s40-full-f32", "ring", 2, 1, 40, 2, 2, 16, F32, False),
    Case("ring-ws2-lens0,30-causal-gqa-f16-mask", "ring", 2, 2, (0, 30), 4, 2, 8, F16, True, "random"),
    Case("ring-ws2-s33-causal-bf16-nodlse", "ring", 2, 1, 33, 2, 1, 8, BF16, True, dlse=False),
    Case("ring-ws2-s26-causal-aten-f32-mask", "ring", 2, 2, 26, 2, 1, 8, F32, True, "random",
         backend="aten"),
    Case("ring-ws3-lens17,0,12-causal-gqa-f32-mask", "ring", 3, 2, (17, 0, 12), 4, 2, 16, F32, True,
         "random"),
    Case("ring-ws3-cross-q24-kv35-causal-f32-mask", "ring", 3, 2, 24, 2, 1, 8, F32, True, "random",
         kv_seq=35),
    Case("ring-ws3-cross-q0,14,7-kv9,0,6-causal-f16", "ring", 3, 1, (0, 14, 7), 2, 2, 8, F16, True,
         kv_seq=(9, 0, 6)),
    Case("ring-ws3-s31-full-bf16-4d", "ring", 3, 2, 31, 2, 2, 8, BF16, False, "4d"),
    Case("ring-ws4-lens9,0,20,6-causal-gqa-f16-mask", "ring", 4, 2, (9, 0, 20, 6), 4, 2, 16, F16, True,
         "random"),
    Case("ring-ws4-s3-causal-f32", "ring", 4, 1, 3, 2, 1, 8, F32, True),
    Case("ulysses-ws1-s19-causal-f32-mask", "ulysses", 1, 2, 19, 2, 1, 8, F32, True, "random"),
    Case("ulysses-ws2-s30-causal-gqa-f32-mask", "ulysses", 2, 2, 30, 4, 2, 16, F32, True, "random"),
    Case("ulysses-ws2-lens21,0-full-f16", "ulysses", 2, 1, (21, 0), 2, 2, 8, F16, False),
    Case("ulysses-ws3-s25-causal-mqa-bf16-4d", "ulysses", 3, 2, 25, 3, 1, 8, BF16, True, "4d"),
    Case("ulysses-ws4-lens5,11,0,8-causal-gqa-f32-mask", "ulysses", 4, 2, (5, 11, 0, 8), 4, 2, 8, F32, True,
         "random"),
    Case("ulysses-ws4-s22-full-f16-nodlse", "ulysses", 4, 1, 22, 8, 4, 8, F16, False, dlse=False),
    # Head counts that do not divide by the Ulysses degree (kv heads copied to several ranks: summed).
    Case("ulysses-ws3-s10-causal-h8kv2-bf16", "ulysses", 3, 1, 10, 8, 2, 8, BF16, True),
    Case("ulysses-ws4-s9-full-h30-f32", "ulysses", 4, 1, 9, 30, 30, 4, F32, False),
    Case("ulysses-ws4-lens4,0,6,3-causal-h6kv2-f16-mask", "ulysses", 4, 2, (4, 0, 6, 3), 6, 2, 8, F16, True,
         "random"),
    Case("unified-ws4-2x2-s14-causal-h9kv3-f32-mask", "unified", 4, 2, 14, 9, 3, 8, F32, True, "random",
         mesh=(2, 2)),
    Case("unified-ws4-2x2-s29-causal-gqa-f32-mask", "unified", 4, 2, 29, 4, 2, 16, F32, True, "random",
         mesh=(2, 2)),
    Case("unified-ws4-2x2-lens7,0,12,5-full-f16", "unified", 4, 1, (7, 0, 12, 5), 2, 2, 8, F16, False,
         mesh=(2, 2)),
]
WORLD_SIZES = sorted({c.world_size for c in CASES})
DETERMINISM_WS = [3]
MEMORY_WS = [3, 4]
GATHER_WS = [2, 4]
FAILURE_WS = [3]


# ---------------------------------------------------------------------------------------------------------
def _problem(case: Case):
    """The global q, k, v, kv_mask, dout, dlse (one seed per case, identical on every rank) and lengths."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    q_lens = _lengths(case.seq, case.world_size)
    k_lens = _lengths(case.seq if case.kv_seq is None else case.kv_seq, case.world_size)
    Sq, Sk = sum(q_lens), sum(k_lens)
    q = randn(case.B, Sq, case.H, case.D, dtype=case.dtype, gen=gen)
    k = randn(case.B, Sk, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    v = randn(case.B, Sk, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    mask = None if case.mask == "none" else make_kv_mask(case.B, Sk, gen)
    dout = randn(case.B, Sq, case.H, case.D, dtype=case.dtype, gen=gen)
    dlse = torch.randn(case.B, case.H, Sq, generator=gen) if case.dlse else None
    return q, k, v, mask, dout, dlse, q_lens, k_lens


def _attention(case: Case, q, k, v, mask, q_lens, k_lens):
    """The mode's call on this rank's shards (a collective); returns (out, lse)."""
    import cp_attention
    from cp_attention.distributed import ring_attention, ulysses_attention

    kw = dict(causal=case.causal, kv_mask=mask, return_lse=True, backend=case.backend)
    if case.mode == "ring":
        return ring_attention(q, k, v, seq_lens=q_lens, kv_seq_lens=k_lens, **kw)
    if case.mode == "ulysses":
        return ulysses_attention(q, k, v, **kw)
    R, U = case.mesh
    return cp_attention.ContextParallel(ring_degree=R, ulysses_degree=U).attention(q, k, v, **kw)


def _rank_grads(case: Case, rank: int, q, k, v, mask, dout, dlse, q_lens, k_lens):
    """This rank's (dq, dk, dv) of the loss sum(dout * out) + sum(dlse * lse) (rows that see keys)."""
    leaves = [_shard(t, lens, rank).detach().clone().requires_grad_()
              for t, lens in ((q, q_lens), (k, k_lens), (v, k_lens))]
    mask_r = _shard(mask, k_lens, rank)
    if case.mask == "4d":
        mask_r = mask_r[:, None, None, :]
    out, lse = _attention(case, *leaves, mask_r, q_lens, k_lens)
    loss = (out.float() * _shard(dout, q_lens, rank).float()).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * _shard(dlse, q_lens, rank, dim=2), 0.0).sum()
    loss.backward()
    return [t.grad for t in leaves]


def _run_case(rank: int, case: Case):
    q, k, v, mask, dout, dlse, q_lens, k_lens = _problem(case)
    got = _rank_grads(case, rank, q, k, v, mask, dout, dlse, q_lens, k_lens)
    ref = attention_bwd_ref(q, k, v, dout, dlse, None, case.causal, mask)
    base = same_dtype_math_path_bwd(q, k, v, dout, dlse, None, case.causal, mask)
    lens_of = (q_lens, k_lens, k_lens)
    for name, g, t, r, b, lens in zip(("dq", "dk", "dv"), got, (q, k, v), ref, base, lens_of):
        own = _shard(t, lens, rank)
        assert g.shape == own.shape and g.dtype == own.dtype, f"{name}: {g.dtype} {list(g.shape)}"
        assert torch.isfinite(g).all(), f"{name} has NaN or inf"
        assert_close_to_ref(name, g, _shard(r, lens, rank), _shard(b, lens, rank), case.dtype)


# ---------------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_determinism(rank: int, world_size: int):
    """Two ring backward passes with the ranks arriving in different orders give identical bits."""
    case = Case("det", "ring", world_size, 2, 37, 4, 2, 16, F16, True, "random")
    problem = _problem(case)
    runs = []
    for delays in ([0.0] * world_size, [0.05 * (world_size - i) for i in range(world_size)]):
        time.sleep(delays[rank])
        runs.append(_rank_grads(case, rank, *problem))
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs between two runs"


def _check_memory(rank: int, world_size: int):
    """The ring backward holds at most two foreign K/V chunks and two dK/dV accumulators at once (every
    receive buffer is counted by storage), and none outlives the call."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from cp_attention.distributed import ring

    lens = {3: [5, 0, 6], 4: [5, 3, 9, 6]}[world_size]
    case = Case("mem", "ring", world_size, 2, tuple(lens), 2, 1, 8, F32, True, "random")
    problem = _problem(case)
    live, peak = {"kv": [], "acc": []}, {"kv": 0, "acc": 0}
    kv_sizes = {2 * 2 * n * 1 * 8 * 4 + 2 * n for n in lens}  # k, v float32 and the bool mask
    original = ring._new_recv_buffer

    def tracked(nbytes, device):
        buf = original(nbytes, device)
        kind = "kv" if nbytes in kv_sizes else "acc"
        live[kind][:] = [w for w in live[kind] if not w.expired()]
        live[kind].append(StorageWeakRef(buf.untyped_storage()))
        peak[kind] = max(peak[kind], len(live[kind]))
        return buf

    ring._new_recv_buffer = tracked
    try:
        grads = _rank_grads(case, rank, *problem)
    finally:
        ring._new_recv_buffer = original
    del grads
    assert peak["kv"] <= 2, f"{peak['kv']} foreign K/V chunks were alive at once (at most 2 allowed)"
    assert peak["acc"] <= 2, f"{peak['acc']} dK/dV accumulators were alive at once (at most 2 allowed)"
    assert not [w for kind in live.values() for w in kind if not w.expired()], "buffers outlived the call"


def _check_gather_backward(rank: int, world_size: int):
    """gather's backward hands each rank the gradient over its own chunk; shard is a view (its gradient
    lands in the global tensor's rows of the chunk)."""
    import cp_attention

    cp = cp_attention.ContextParallel(ring_degree=2, ulysses_degree=world_size // 2)
    full = torch.arange(2 * 11 * 3, dtype=torch.float32).view(2, 11, 3).requires_grad_()
    part = cp.shard(full)
    weights = torch.linspace(-1, 1, full.numel()).view(full.shape)
    (cp.gather(part * 2.0) * weights).sum().backward()
    chunk = torch.zeros_like(full, dtype=torch.bool)
    torch.tensor_split(chunk, world_size, dim=1)[rank].fill_(True)
    assert torch.equal(full.grad, torch.where(chunk, 2.0 * weights, 0.0)), "gather's backward: not the slice"


def _check_failure_poisons(rank: int, world_size: int):
    """A rank whose backward step fails raises, and the chunks whose accumulators it could not add to come
    back NaN to their owners (not silently short of a share); the other ranks still finish the schedule."""
    from cp_attention.distributed import _step

    case = Case("fail", "ring", world_size, 1, 12, 2, 2, 8, F32, False)
    problem = _problem(case)
    original = _step.attend_chunk_bwd
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    from cp_attention.distributed import ring
    ring.attend_chunk_bwd = failing
    try:
        if rank == 1:
            with pytest.raises(RuntimeError, match="injected failure"):
                _rank_grads(case, rank, *problem)
        else:
            _, dk, dv = _rank_grads(case, rank, *problem)
            # Rank 1 failed at its step 1 (chunk 0) and then skipped step 2 (chunk 2): both come back NaN.
            assert torch.isnan(dk).all() and torch.isnan(dv).all(), f"rank {rank}: gradients not poisoned"
    finally:
        ring.attend_chunk_bwd = original


def _item_list(world_size: int) -> list[tuple[str, object]]:
    items = [(c.name, c) for c in CASES if c.world_size == world_size]
    for key, sizes, fn in (("determinism", DETERMINISM_WS, _check_determinism),
                           ("memory", MEMORY_WS, _check_memory),
                           ("gather", GATHER_WS, _check_gather_backward),
                           ("failure", FAILURE_WS, _check_failure_poisons)):
        if world_size in sizes:
            items.append((f"{key}-ws{world_size}", fn))
    return items


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    return run_case_items(rank, world_size, _item_list(world_size), {Case: _run_case})


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_grads_match_reference(runs, case):
    runs.assert_ok(case.world_size, case.name)


@pytest.mark.parametrize("world_size", DETERMINISM_WS)
def test_ring_backward_is_deterministic(runs, world_size):
    runs.assert_ok(world_size, f"determinism-ws{world_size}")


@pytest.mark.parametrize("world_size", MEMORY_WS)
def test_ring_backward_memory_bound(runs, world_size):
    runs.assert_ok(world_size, f"memory-ws{world_size}")


@pytest.mark.parametrize("world_size", GATHER_WS)
def test_gather_backward_is_the_own_slice(runs, world_size):
    runs.assert_ok(world_size, f"gather-ws{world_size}")


@pytest.mark.parametrize("world_size", FAILURE_WS)
def test_failed_backward_step_poisons_not_shortchanges(runs, world_size):
    runs.assert_ok(world_size, f"failure-ws{world_size}")

"""The ring invariant (DESIGN section 1): attend to K/V chunks one at a time, merge the partial states in any
order, and get attention over the whole K/V."""

from __future__ import annotations

import pytest
import torch
from conftest import make_kv_mask, randn, skip_unsupported
from reference import check_attention

import cp_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ((B, Sq, Sk, H, Hkv, D), number of chunks): odd lengths, Sq < Sk and Sq > Sk (causal rows that see nothing
# in some chunks, or at all), 1 to 5 chunks.
CASES = [((2, 37, 61, 4, 2, 64), 1), ((2, 37, 61, 4, 2, 64), 3), ((1, 50, 23, 3, 1, 40), 2),
         ((1, 50, 23, 3, 1, 40), 5)]


def _boundaries(Sk: int, n: int, gen: torch.Generator) -> list[int]:
    """n chunks [b_i, b_{i+1}) covering [0, Sk), with random cuts; from 3 chunks on, one chunk is empty."""
    cuts = sorted(torch.randint(0, Sk + 1, (n - 1,), generator=gen).tolist())
    if n >= 3:
        cuts[1] = cuts[0]
    return [0, *cuts, Sk]


def _attend_chunk(q, k, v, kv_mask, s, e, causal, backend):
    """(out, lse) of all queries over keys [s, e) under the causal rule of the whole K/V.

    Query i sees global key j iff j <= i + Sk - Sq. Over chunk [s, e) that is the chunk's own bottom-right
    causal rule for the first Sq - (Sk - e) queries (shift their count so the diagonals line up), while every
    later query sees the whole chunk. So the chunk runs as two calls, causal and non-causal."""
    Sq, Sk = q.shape[1], k.shape[1]
    kc, vc = k[:, s:e], v[:, s:e]
    mc = None if kv_mask is None else kv_mask[:, s:e]
    if not causal:
        return cp_attention.flash_attn(q, kc, vc, kv_mask=mc, return_lse=True, backend=backend)
    split = min(max(Sq - (Sk - e), 0), Sq)
    o1, l1 = cp_attention.flash_attn(q[:, :split], kc, vc, causal=True, kv_mask=mc, return_lse=True,
                                     backend=backend)
    o2, l2 = cp_attention.flash_attn(q[:, split:], kc, vc, kv_mask=mc, return_lse=True, backend=backend)
    return torch.cat([o1, o2], dim=1), torch.cat([l1, l2], dim=2)


def _problem(target, shape, causal, masked, dtype, seed):
    """(gen, q, k, v, kv_mask) for one case; skips what the target's kernel does not cover."""
    B, Sq, Sk, H, Hkv, D = shape
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, Sq, H, D, dtype=dtype, device=target.device, gen=gen)
    k = randn(B, Sk, Hkv, D, dtype=dtype, device=target.device, gen=gen)
    v = randn(B, Sk, Hkv, D, dtype=dtype, device=target.device, gen=gen)
    kv_mask = make_kv_mask(B, Sk, gen, target.device) if masked else None
    skip_unsupported(target, q, Sk, causal, masked)
    skip_unsupported(target, q, Sk, False, masked)  # the chunks run non-causal parts, too
    return gen, q, k, v, kv_mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,n_chunks", CASES, ids=[f"{s}-{n}chunks" for s, n in CASES])
def test_chunks_merge_to_whole(target, shape, n_chunks, causal, masked, dtype):
    B, Sq, Sk, H, Hkv, D = shape
    seed = n_chunks * 100 + causal * 10 + masked
    gen, q, k, v, kv_mask = _problem(target, shape, causal, masked, dtype, seed)

    bounds = _boundaries(Sk, n_chunks, gen)
    parts = [_attend_chunk(q, k, v, kv_mask, s, e, causal, target.backend)
             for s, e in zip(bounds, bounds[1:])]
    order = torch.randperm(n_chunks, generator=gen).tolist()

    # Functional merges, in a random order: the result stays in the chunks' dtype.
    out, lse = parts[order[0]]
    for i in order[1:]:
        out, lse = cp_attention.merge_attn_states(out, lse, *parts[i])
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask)

    # In place, into a float32 accumulator initialised from the first chunk (what a ring step does).
    acc, acc_lse = parts[order[0]][0].float().clone(), parts[order[0]][1].clone()
    for i in order[1:]:
        cp_attention.merge_attn_states_(acc, acc_lse, *parts[i])
    _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask)

    # In place from the empty state (out NaN, never to be read; lse -inf), merging every chunk.
    acc = torch.full((B, Sq, H, D), float("nan"), device=target.device)
    acc_lse = torch.full((B, H, Sq), float("-inf"), device=target.device)
    for i in order:
        cp_attention.merge_attn_states_(acc, acc_lse, *parts[i])
    _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask)


@pytest.mark.parametrize("acc_dtype", ["float32", "q"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,n_chunks", CASES, ids=[f"{s}-{n}chunks" for s, n in CASES])
def test_fused_accumulation_equals_whole(target, shape, n_chunks, causal, masked, dtype, acc_dtype):
    """flash_attn_acc_ chunk by chunk (the fused ring step for our kernels) from the empty state, whose out
    is NaN-poisoned (it must never be read while its lse is -inf): equals attention over the whole. Causal
    chunks run as two calls on row slices of the state (strided out and lse), as in _attend_chunk."""
    B, Sq, Sk, H, Hkv, D = shape
    seed = 7 + n_chunks * 100 + causal * 10 + masked
    gen, q, k, v, kv_mask = _problem(target, shape, causal, masked, dtype, seed)

    state_dtype = torch.float32 if acc_dtype == "float32" else dtype
    acc = torch.full((B, Sq, H, D), float("nan"), dtype=state_dtype, device=target.device)
    acc_lse = torch.full((B, H, Sq), float("-inf"), device=target.device)
    bounds = _boundaries(Sk, n_chunks, gen)
    for s, e in zip(bounds, bounds[1:]):
        kc, vc = k[:, s:e], v[:, s:e]
        mc = None if kv_mask is None else kv_mask[:, s:e]
        split = min(max(Sq - (Sk - e), 0), Sq) if causal else 0
        if split:
            cp_attention.flash_attn_acc_(q[:, :split], kc, vc, acc[:, :split], acc_lse[:, :, :split],
                                         causal=True, kv_mask=mc, backend=target.backend)
        cp_attention.flash_attn_acc_(q[:, split:], kc, vc, acc[:, split:], acc_lse[:, :, split:], kv_mask=mc,
                                     backend=target.backend)
    assert acc.dtype == state_dtype
    check_attention(acc.to(q.dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask)


def _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask):
    # The chunks were computed in q's dtype, so the float32 accumulator is held to the tolerance of q's
    # dtype: it is rounded to that dtype (which keeps any NaN) and checked like a direct result.
    assert acc.dtype == torch.float32, f"the accumulator changed dtype to {acc.dtype}"
    check_attention(acc.to(q.dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask)

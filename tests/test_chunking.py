"""The ring invariant (docs/design.md, "Merging partial results"): attend to K/V chunks one at a time, merge
the partial states in any order, and get attention over the whole K/V."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_kind, make_kv_mask, randn, skip_unsupported
from reference import check_attention, merge_math_path, same_dtype_math_path

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


def _flash_attn_on(backend):
    """attend(q, k, v, causal, kv_mask) -> (out, lse) with cp_attention.flash_attn on `backend`."""
    def attend(q, k, v, causal, kv_mask):
        return cp_attention.flash_attn(q, k, v, causal=causal, kv_mask=kv_mask, return_lse=True,
                                       backend=backend)
    return attend


def _math_path(q, k, v, causal, kv_mask):
    return same_dtype_math_path(q, k, v, causal=causal, kv_mask=kv_mask)


def _attend_chunk(attend, q, k, v, kv_mask, s, e, causal):
    """(out, lse) of all queries over keys [s, e) under the causal rule of the whole K/V, by `attend` (the
    kernel, or PyTorch's math path for the baseline).

    Query i sees global key j iff j <= i + Sk - Sq. Over chunk [s, e) that is the chunk's own bottom-right
    causal rule for the first Sq - (Sk - e) queries (shift their count so the diagonals line up), while every
    later query sees the whole chunk. So the chunk runs as two calls, causal and non-causal."""
    Sq, Sk = q.shape[1], k.shape[1]
    kc, vc = k[:, s:e], v[:, s:e]
    mc = None if kv_mask is None else kv_mask[:, s:e]
    if not causal:
        return attend(q, kc, vc, False, mc)
    split = min(max(Sq - (Sk - e), 0), Sq)
    o1, l1 = attend(q[:, :split], kc, vc, True, mc)
    o2, l2 = attend(q[:, split:], kc, vc, False, mc)
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
    chunks = list(zip(bounds, bounds[1:]))
    parts = [_attend_chunk(_flash_attn_on(target.backend), q, k, v, kv_mask, s, e, causal) for s, e in chunks]
    order = torch.randperm(n_chunks, generator=gen).tolist()
    # The yardstick does the same: PyTorch's math path chunk by chunk (each part rounded to q's dtype, as the
    # kernel's are), merged in the same order by the float32 merge formula.
    base_parts = [_attend_chunk(_math_path, q, k, v, kv_mask, s, e, causal) for s, e in chunks]
    kernel = kernel_kind(target)

    # Functional merges, in a random order: the result stays in the chunks' dtype.
    out, lse = parts[order[0]]
    base = base_parts[order[0]]
    for i in order[1:]:
        out, lse = cp_attention.merge_attn_states(out, lse, *parts[i])
        base = merge_math_path(*base, *base_parts[i])
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask, kernel=kernel, base=base)

    # In place, into a float32 accumulator initialised from the first chunk (what a ring step does).
    acc, acc_lse = parts[order[0]][0].float().clone(), parts[order[0]][1].clone()
    base = base_parts[order[0]][0].float(), base_parts[order[0]][1]
    for i in order[1:]:
        cp_attention.merge_attn_states_(acc, acc_lse, *parts[i])
        base = merge_math_path(*base, *base_parts[i])
    _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask, kernel, base)

    # In place from the empty state (out NaN, never to be read; lse -inf), merging every chunk.
    acc = torch.full((B, Sq, H, D), float("nan"), device=target.device)
    acc_lse = torch.full((B, H, Sq), float("-inf"), device=target.device)
    base = acc.clone(), acc_lse.clone()
    for i in order:
        cp_attention.merge_attn_states_(acc, acc_lse, *parts[i])
        base = merge_math_path(*base, *base_parts[i])
    _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask, kernel, base)


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
    # The yardstick runs the same steps with PyTorch's math path: each chunk's partial result merged by the
    # float32 merge formula into a state kept in state_dtype. Our kernels merge the partial result in their
    # epilogue, unrounded; torch's kernels return it in q's dtype first (see cp_attention.flash_attn_acc_).
    part_dtype = dtype if kernel_kind(target) == "torch" else torch.float32
    base = acc.clone(), acc_lse.clone()
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
        part_out, part_lse = _attend_chunk(_math_path, q.float(), k.float(), v.float(), kv_mask, s, e, causal)
        base_out, base_lse = merge_math_path(*base, part_out.to(part_dtype), part_lse)
        base = base_out.to(state_dtype), base_lse
    assert acc.dtype == state_dtype
    check_attention(acc.to(q.dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask,
                    kernel=kernel_kind(target), base=(base[0].to(q.dtype), base[1]))


def _check_accumulator(acc, acc_lse, q, k, v, causal, kv_mask, kernel, base):
    # The chunks were computed in q's dtype, so the float32 accumulator is held to the tolerance of q's
    # dtype: it is rounded to that dtype (which keeps any NaN) and checked like a direct result, against the
    # math path's float32 accumulator rounded the same way.
    assert acc.dtype == torch.float32, f"the accumulator changed dtype to {acc.dtype}"
    check_attention(acc.to(q.dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask,
                    kernel=kernel, base=(base[0].to(q.dtype), base[1]))

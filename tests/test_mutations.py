"""The checks catch small errors: our kernels with a small bug planted around them must fail the very checks
the real tests run (reference.check_attention, test_merge.check_merge), in float32, float16 and bfloat16,
while the kernels as they are pass them. If a check loosened until a 1% error or a 1e-3 LSE shift slipped
through, these tests would fail.

The planted bugs ("mutations"), each a wrapper around one of our CPU kernels:
- scale_out: out comes back 1% too large (in the output's dtype);
- shift_lse: lse comes back 1e-3 too large;
- drop_last_key: the kernel attends to k[:, :-1], v[:, :-1] (an off-by-one at the end of the key loop);
- skip_last_row (the merge, which reads no keys): the last row keeps side a's state unmerged (the merge's
  off-by-one at the end of its row loop).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_kv_mask, randn
from reference import check_attention
from test_merge import _state, check_merge

import cp_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
SCALE = 1.01
SHIFT = 1e-3
KERNEL_MUTATIONS = ["scale_out", "shift_lse", "drop_last_key"]
MERGE_MUTATIONS = ["scale_out", "shift_lse", "skip_last_row"]

# (B, Sq, Sk, H, Hkv, D, causal, masked): odd lengths and head dims that no block size divides, GQA, MQA.
# Every row sees at least two keys, the last key among them (a row without keys has no value to get wrong).
ATTN_PROBLEMS = [(2, 37, 53, 4, 2, 40, False, False), (1, 29, 61, 3, 1, 33, True, True),
                 (3, 17, 23, 2, 2, 72, False, True), (1, 45, 50, 2, 1, 5, True, False)]
# The same for the fused step, which runs chunk by chunk: (problem, cuts of the K/V into chunks). Non-causal
# (a causal chunk is two calls on row slices, see test_chunking.py), one chunk empty.
FUSED_PROBLEMS = [((2, 37, 53, 4, 2, 40, False, True), (20, 20)),
                  ((1, 29, 61, 3, 1, 33, False, False), (7, 40)),
                  ((3, 17, 23, 2, 2, 72, False, True), (11,))]
# [B, S, H, D] of the merged states.
MERGE_SHAPES = [(2, 37, 4, 40), (1, 61, 3, 33), (3, 17, 2, 72)]


def _problem_id(p):
    B, Sq, Sk, H, Hkv, D, causal, masked = p
    return f"{B}x{Sq}x{Sk}-h{H}-{Hkv}-d{D}{'-causal' if causal else ''}{'-mask' if masked else ''}"


def _inputs(problem, dtype, seed):
    B, Sq, Sk, H, Hkv, D, causal, masked = problem
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, Sq, H, D, dtype=dtype, gen=gen)
    k = randn(B, Sk, Hkv, D, dtype=dtype, gen=gen)
    v = randn(B, Sk, Hkv, D, dtype=dtype, gen=gen)
    kv_mask = None
    if masked:
        kv_mask = make_kv_mask(B, Sk, gen, empty_batch=False)
        kv_mask[:, -1] = True  # so that dropping the last key changes every row
    return q, k, v, causal, kv_mask


def _flash_attn(q, k, v, causal=False, kv_mask=None):
    return cp_attention.flash_attn(q, k, v, causal=causal, kv_mask=kv_mask, return_lse=True, backend="cpu")


def _mutated_attention(mutation):
    """cp_attention.flash_attn (our C++ kernel) with `mutation` planted around it."""
    def attend(q, k, v, causal=False, kv_mask=None):
        if mutation == "drop_last_key":
            return _flash_attn(q, k[:, :-1], v[:, :-1], causal, None if kv_mask is None else kv_mask[:, :-1])
        out, lse = _flash_attn(q, k, v, causal, kv_mask)
        if mutation == "scale_out":
            return out * SCALE, lse
        assert mutation == "shift_lse", mutation
        return out, lse + SHIFT
    return attend


def _fused_step(q, k, v, out, lse, kv_mask=None):
    cp_attention.flash_attn_acc_(q, k, v, out, lse, kv_mask=kv_mask, backend="cpu")


def _mutated_fused_step(mutation):
    """cp_attention.flash_attn_acc_ (our fused C++ step) with `mutation` planted around it."""
    def step(q, k, v, out, lse, kv_mask=None):
        if mutation == "drop_last_key":
            _fused_step(q, k[:, :-1], v[:, :-1], out, lse, None if kv_mask is None else kv_mask[:, :-1])
            return
        _fused_step(q, k, v, out, lse, kv_mask)
        if mutation == "scale_out":
            out.mul_(SCALE)
        else:
            assert mutation == "shift_lse", mutation
            lse.add_(SHIFT)  # -inf (a row without keys so far) stays -inf
    return step


def _mutated_merge(mutation):
    """cp_attention.merge_attn_states (our C++ merge) with `mutation` planted around it."""
    def merge(out_a, lse_a, out_b, lse_b):
        out, lse = cp_attention.merge_attn_states(out_a, lse_a, out_b, lse_b)
        if mutation == "scale_out":
            return out * SCALE, lse
        if mutation == "shift_lse":
            return out, lse + SHIFT
        assert mutation == "skip_last_row", mutation
        out, lse = out.clone(), lse.clone()
        out[:, -1] = out_a[:, -1]
        lse[:, :, -1] = lse_a[:, :, -1]
        return out, lse
    return merge


# A planted bug must fail the tolerance rule itself (its message), not some side check: the cases keep
# every row with keys, so no empty-row or infinity check fires first.
CAUGHT_BY_THE_RULE = r"(out|lse): max abs error .* > tolerance"


@pytest.mark.parametrize("mutation", KERNEL_MUTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("problem", ATTN_PROBLEMS, ids=_problem_id)
def test_flash_attn_check_catches(problem, dtype, mutation):
    q, k, v, causal, kv_mask = _inputs(problem, dtype, seed=sum(problem))

    def check(attend):
        out, lse = attend(q, k, v, causal=causal, kv_mask=kv_mask)
        check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask)

    check(_flash_attn)
    with pytest.raises(AssertionError, match=CAUGHT_BY_THE_RULE):
        check(_mutated_attention(mutation))


@pytest.mark.parametrize("mutation", KERNEL_MUTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("problem,cuts", FUSED_PROBLEMS, ids=[_problem_id(p) for p, _ in FUSED_PROBLEMS])
def test_fused_step_check_catches(problem, cuts, dtype, mutation):
    # Chunk by chunk into a float32 state that starts empty with out NaN (never to be read); the bug sits in
    # the last step only, so the result is off by exactly what the mutation does once.
    q, k, v, _, kv_mask = _inputs(problem, dtype, seed=7 + sum(problem))
    B, Sq, H, D = q.shape
    bounds = [0, *cuts, k.shape[1]]

    def check(last_step):
        out = torch.full((B, Sq, H, D), float("nan"))
        lse = torch.full((B, H, Sq), float("-inf"))
        for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
            step = last_step if n == len(bounds) - 2 else _fused_step
            step(q, k[:, s:e], v[:, s:e], out, lse, None if kv_mask is None else kv_mask[:, s:e])
        check_attention(out.to(dtype), lse, q, k, v, kv_mask=kv_mask)

    check(_fused_step)
    with pytest.raises(AssertionError, match=CAUGHT_BY_THE_RULE):
        check(_mutated_fused_step(mutation))


@pytest.mark.parametrize("mutation", MERGE_MUTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=str)
def test_merge_check_catches(shape, dtype, mutation):
    # Both sides alive on every row (dead rows pass through exactly, a separate check).
    gen = torch.Generator().manual_seed(sum(shape))
    out_a, lse_a = _state(shape, dtype, "cpu", gen, dead=0.0)
    out_b, lse_b = _state(shape, dtype, "cpu", gen, dead=0.0)

    def check(merge):
        out, lse = merge(out_a, lse_a, out_b, lse_b)
        check_merge(out, lse, out_a, lse_a, out_b, lse_b, dtype)

    check(cp_attention.merge_attn_states)
    with pytest.raises(AssertionError, match=CAUGHT_BY_THE_RULE):
        check(_mutated_merge(mutation))

"""Bad input fails with a ValueError that names the argument and what was expected, from the public API and
from the raw ops alike (C++ checks on CPU tensors; the fake kernels when a meta tensor is involved)."""

from __future__ import annotations

import re

import pytest
import torch

import cp_attention

OPS = torch.ops.cp_attention
B, SQ, SK, H, HKV, D = 2, 5, 7, 4, 2, 16


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(device=device, dtype=dtype)


def _good():
    return {"q": _t(B, SQ, H, D), "k": _t(B, SK, HKV, D), "v": _t(B, SK, HKV, D),
            "kv_mask": torch.ones(B, SK, dtype=torch.bool)}


def _strided_last(*shape):
    return _t(*shape[:-1], 2 * shape[-1])[..., ::2]


def _all(dtype=torch.float32, d=D):
    return {"q": _t(B, SQ, H, d, dtype=dtype), "k": _t(B, SK, HKV, d, dtype=dtype),
            "v": _t(B, SK, HKV, d, dtype=dtype)}


# name -> (changes to the good inputs, regexes the message must contain). On CPU-only machines, a "meta"
# tensor stands in for a tensor on another device.
ATTN_CASES = {
    "q_rank3": ({"q": _t(SQ, H, D)}, [r"\bq\b", "4-D"]),
    "k_rank5": ({"k": _t(1, B, SK, HKV, D)}, [r"\bk\b", "4-D"]),
    "v_rank2": ({"v": _t(SK, D)}, [r"\bv\b", "4-D"]),
    "float64": (_all(torch.float64), [r"\bq\b", "float32"]),
    "int32": (_all(torch.int32), [r"\bq\b", "float32"]),
    "k_dtype": ({"k": _t(B, SK, HKV, D, dtype=torch.float16)}, [r"\bk\b", "dtype"]),
    "v_dtype": ({"v": _t(B, SK, HKV, D, dtype=torch.bfloat16)}, [r"\bv\b", "dtype"]),
    "k_device": ({"k": _t(B, SK, HKV, D, device="meta")}, [r"\bk\b", "device"]),
    "v_device": ({"v": _t(B, SK, HKV, D, device="meta")}, [r"\bv\b", "device"]),
    "k_batch": ({"k": _t(B + 1, SK, HKV, D)}, [r"\bk\b", "batch"]),
    "v_seq": ({"v": _t(B, SK + 1, HKV, D)}, [r"\bv\b", "sequence"]),
    "v_heads": ({"v": _t(B, SK, HKV + 1, D)}, [r"\bv\b", "heads"]),
    "k_head_dim": ({"k": _t(B, SK, HKV, D // 2)}, [r"\bk\b", "head dim"]),
    "D_257": (_all(d=257), ["head dim", "256"]),
    "D_0": (_all(d=0), ["head dim", r"\b1\b"]),
    "H_not_multiple": ({"q": _t(B, SQ, 3, D)}, ["heads", "multiple"]),
    "Hkv_zero": ({"k": _t(B, SK, 0, D), "v": _t(B, SK, 0, D)}, ["heads", "multiple"]),
    "q_last_stride": ({"q": _strided_last(B, SQ, H, D)}, [r"\bq\b", "stride"]),
    "k_last_stride": ({"k": _strided_last(B, SK, HKV, D)}, [r"\bk\b", "stride"]),
    "v_last_stride": ({"v": _strided_last(B, SK, HKV, D)}, [r"\bv\b", "stride"]),
    "mask_float": ({"kv_mask": torch.ones(B, SK)}, ["kv_mask", "bool"]),
    "mask_uint8": ({"kv_mask": torch.ones(B, SK, dtype=torch.uint8)}, ["kv_mask", "bool"]),
    "mask_long": ({"kv_mask": torch.ones(B, SK + 1, dtype=torch.bool)}, ["kv_mask", "shape"]),
    "mask_batch": ({"kv_mask": torch.ones(B + 1, SK, dtype=torch.bool)}, ["kv_mask", "shape"]),
    "mask_1d": ({"kv_mask": torch.ones(SK, dtype=torch.bool)}, ["kv_mask", "shape"]),
    "mask_device": ({"kv_mask": torch.ones(B, SK, dtype=torch.bool, device="meta")},
                    ["kv_mask", "device|meta"]),
}


def _attn_inputs(case):
    inputs = _good()
    inputs.update(ATTN_CASES[case][0])
    return inputs


def _assert_message(err: pytest.ExceptionInfo, patterns):
    msg = str(err.value)
    missing = [p for p in patterns if not re.search(p, msg, re.IGNORECASE)]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_flash_attn_rejects(case):
    i = _attn_inputs(case)
    for backend in cp_attention.available_backends("cpu"):
        with pytest.raises(ValueError) as err:
            cp_attention.flash_attn(i["q"], i["k"], i["v"], kv_mask=i["kv_mask"], backend=backend)
        _assert_message(err, ATTN_CASES[case][1])


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_flash_attn_fwd_op_rejects(case):
    i = _attn_inputs(case)
    with pytest.raises(ValueError) as err:
        OPS.flash_attn_fwd(i["q"], i["k"], i["v"], None, False, i["kv_mask"])
    _assert_message(err, ATTN_CASES[case][1])


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_flash_attn_acc_rejects_bad_qkv(case):
    # The fused ring step checks q, k, v and kv_mask like the forward does (the public function and the op).
    i = _attn_inputs(case)
    q = i["q"] if isinstance(i["q"], torch.Tensor) and i["q"].dim() == 4 else _t(B, SQ, H, D)
    out, lse = torch.zeros(q.shape[0], q.shape[1], q.shape[2], q.shape[3]), torch.zeros(B, q.shape[2], SQ)
    for fn in (lambda: cp_attention.flash_attn_acc_(i["q"], i["k"], i["v"], out, lse, kv_mask=i["kv_mask"]),
               lambda: OPS.flash_attn_fwd_acc_(i["q"], i["k"], i["v"], out, lse, None, False, i["kv_mask"])):
        with pytest.raises(ValueError) as err:
            fn()
        _assert_message(err, ATTN_CASES[case][1])


# The running state of the fused ring step: out [B, Sq, H, D] (q's dtype or float32), lse [B, H, Sq] float32.
ACC_CASES = {
    "out_shape": ({"out": _t(B, SQ + 1, H, D)}, [r"\bout\b", "shape"]),
    "out_rank3": ({"out": _t(SQ, H, D)}, [r"\bout\b", "shape"]),
    "out_float16": ({"out": _t(B, SQ, H, D, dtype=torch.float16)}, [r"\bout\b", "float32"]),
    "out_float64": ({"out": _t(B, SQ, H, D, dtype=torch.float64)}, [r"\bout\b", "dtype"]),
    "out_last_stride": ({"out": _strided_last(B, SQ, H, D)}, [r"\bout\b", "stride"]),
    "out_device": ({"out": _t(B, SQ, H, D, device="meta")}, [r"\bout\b", "device|meta"]),
    "lse_bshd_order": ({"lse": _t(B, SQ, H)}, [r"\blse\b", "shape"]),
    "lse_half": ({"lse": _t(B, H, SQ, dtype=torch.float16)}, [r"\blse\b", "float32"]),
    "lse_device": ({"lse": _t(B, H, SQ, device="meta")}, [r"\blse\b", "device|meta"]),
}


@pytest.mark.parametrize("case", list(ACC_CASES))
def test_flash_attn_acc_rejects_bad_state(case):
    i = dict(_good(), out=_t(B, SQ, H, D), lse=_t(B, H, SQ))
    i.update(ACC_CASES[case][0])
    args = (i["q"], i["k"], i["v"], i["out"], i["lse"])
    for fn in (lambda: cp_attention.flash_attn_acc_(*args),
               lambda: OPS.flash_attn_fwd_acc_(*args, None, False, None)):
        with pytest.raises(ValueError) as err:
            fn()
        _assert_message(err, ACC_CASES[case][1])


def test_head_dim_bounds_are_inclusive():
    # The counterpart of D_0 / D_257: 1 and 256 themselves are accepted.
    for d in (1, 256):
        cp_attention.flash_attn(_t(1, 3, 2, d), _t(1, 4, 1, d), _t(1, 4, 1, d))


def test_unknown_backend():
    i = _good()
    with pytest.raises(ValueError) as err:
        cp_attention.flash_attn(i["q"], i["k"], i["v"], backend="no_such_backend")
    _assert_message(err, ["backend", "no_such_backend"])


def test_backend_on_wrong_device():
    # Our CPU kernel asked to run on tensors of another device.
    q, k = _t(1, 3, 2, 8, device="meta"), _t(1, 4, 1, 8, device="meta")
    with pytest.raises(ValueError) as err:
        cp_attention.flash_attn(q, k, k, backend="cpu")
    _assert_message(err, ["backend", "cpu"])


def test_non_tensor_input():
    i = _good()
    with pytest.raises(ValueError) as err:
        cp_attention.flash_attn(i["q"].tolist(), i["k"], i["v"])
    _assert_message(err, [r"\bq\b", "Tensor"])


# ---------------------------------------------------------------------------------------------------------
# Merges: the "a" side is (out_a, lse_a) for merge_attn_states and (out, lse) for the in-place merge.
S, MH, MD = 5, 3, 8


def _merge_good():
    return {"out_a": _t(B, S, MH, MD), "lse_a": _t(B, MH, S),
            "out_b": _t(B, S, MH, MD), "lse_b": _t(B, MH, S)}


MERGE_CASES = {
    "out_a_rank3": ({"out_a": _t(S, MH, MD)}, ["{out_a}", "4-D"]),
    "out_b_rank5": ({"out_b": _t(1, B, S, MH, MD)}, ["out_b", "4-D"]),
    "out_a_float64": ({"out_a": _t(B, S, MH, MD, dtype=torch.float64)}, ["{out_a}", "float32"]),
    "out_b_int": ({"out_b": _t(B, S, MH, MD, dtype=torch.int32)}, ["out_b", "float32"]),
    "lse_a_half": ({"lse_a": _t(B, MH, S, dtype=torch.float16)}, ["{lse_a}", "float32"]),
    "lse_b_float64": ({"lse_b": _t(B, MH, S, dtype=torch.float64)}, ["lse_b", "float32"]),
    "lse_a_bshd_order": ({"lse_a": _t(B, S, MH)}, ["{lse_a}", "shape"]),
    "lse_b_short": ({"lse_b": _t(B, MH, S - 1)}, ["lse_b", "shape"]),
    "lse_b_4d": ({"lse_b": _t(B, MH, S, 1)}, ["lse_b", "shape"]),
    "out_b_shape": ({"out_b": _t(B, S + 1, MH, MD), "lse_b": _t(B, MH, S + 1)}, ["out_b", "shape"]),
    "out_b_head_dim": ({"out_b": _t(B, S, MH, MD + 1)}, ["out_b", "shape"]),
    "lse_b_device": ({"lse_b": _t(B, MH, S, device="meta")}, ["lse_b", "device|meta"]),
    "out_b_device": ({"out_b": _t(B, S, MH, MD, device="meta"), "lse_b": _t(B, MH, S, device="meta")},
                     ["out_b", "device|meta"]),
}
MERGE_FNS = {
    "merge_attn_states": (cp_attention.merge_attn_states, {"out_a": "out_a", "lse_a": "lse_a"}),
    "op_merge_attn_states": (OPS.merge_attn_states, {"out_a": "out_a", "lse_a": "lse_a"}),
    "merge_attn_states_": (cp_attention.merge_attn_states_, {"out_a": "out", "lse_a": "lse"}),
    "op_merge_attn_states_": (OPS.merge_attn_states_, {"out_a": "out", "lse_a": "lse"}),
}


@pytest.mark.parametrize("fn", list(MERGE_FNS))
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_rejects(case, fn):
    func, names = MERGE_FNS[fn]
    i = _merge_good()
    i.update(MERGE_CASES[case][0])
    # The a side's name as the message must spell it, as a whole word ("out" must not match "out_b").
    patterns = [p.format(**{k: rf"\b{v}\b" for k, v in names.items()}) for p in MERGE_CASES[case][1]]
    with pytest.raises(ValueError) as err:
        func(i["out_a"], i["lse_a"], i["out_b"], i["lse_b"])
    _assert_message(err, patterns)


def test_flash_attn_acc_rejects_state_overlapping_inputs():
    # The state is written while q, k and v are read: sharing memory with them is refused, not raced.
    q, k, v = _t(B, SQ, H, D), _t(B, SK, HKV, D), _t(B, SK, HKV, D)
    lse = torch.full((B, H, SQ), float("-inf"))
    with pytest.raises(RuntimeError, match="memory location"):
        OPS.flash_attn_fwd_acc_(q, k, v, q, lse, None, False, None)
    with pytest.raises(RuntimeError, match="memory location"):
        OPS.flash_attn_fwd_acc_(q, k, v, torch.zeros(B, SQ, H, D), k.view(-1)[: B * H * SQ].view(B, H, SQ),
                                None, False, None)


def _cpu_op_calls():
    """One valid call of every CPU op of the library, by op name."""
    q, k, v = _t(1, 6, 4, 8), _t(1, 6, 2, 8), _t(1, 6, 2, 8)
    out, lse = torch.zeros(1, 6, 4, 8), torch.full((1, 4, 6), float("-inf"))
    return {
        "flash_attn_fwd": lambda: OPS.flash_attn_fwd(q, k, v, None, False, None),
        "flash_attn_fwd_acc_": lambda: OPS.flash_attn_fwd_acc_(q, k, v, out, lse, None, False, None),
        "merge_attn_states": lambda: OPS.merge_attn_states(q, lse, q, lse),
        "merge_attn_states_": lambda: OPS.merge_attn_states_(out, lse, q, lse),
        "a2a_pack_seq_to_head": lambda: OPS.a2a_pack_seq_to_head(q, k, v, 2),
        "a2a_unpack_seq_to_head": lambda: OPS.a2a_unpack_seq_to_head(q.reshape(-1)[:96], [3, 3], 1, 2, 1, 4),
        "a2a_pack_head_to_seq": lambda: OPS.a2a_pack_head_to_seq(q, [2, 4]),
        "a2a_unpack_head_to_seq": lambda: OPS.a2a_unpack_head_to_seq(q.reshape(-1), [3, 1], 1, 6, 8),
    }


@pytest.mark.parametrize("op", list(_cpu_op_calls()))
def test_cpu_ops_run_on_every_isa_copy(op):
    # The CPU ops run the ISA copy of their kernels that dispatch chose (csrc/cpu/dispatch.cpp); limited to
    # each narrower copy this CPU can also run, every op still runs and gives the same result as the widest.
    from conftest import narrower_cpu_isas

    from cp_attention import _C

    def results():
        torch.manual_seed(0)  # the same inputs every time
        got = _cpu_op_calls()[op]()
        return [t.clone() for t in (got if isinstance(got, tuple) else (got,)) if isinstance(t, torch.Tensor)]

    widest = results()
    for isa in narrower_cpu_isas():
        _C._limit_cpu_isa(isa)
        try:
            got = results()
        finally:
            _C._limit_cpu_isa("")
        for g, w in zip(got, widest):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)

"""cp_attention.sdpa against the float64 reference (the tolerance rule of tests/reference.py) and against
torch's SDPA where it falls back; use_as_sdpa's routing, restore on exceptions and nesting."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from reference import (
    assert_close_to_ref,
    attention_bwd_ref,
    attention_ref,
    same_dtype_math_path,
    same_dtype_math_path_bwd,
)

import cp_attention
from cp_attention import sdpa_drop_in

TORCH_SDPA = sdpa_drop_in.TORCH_SDPA


@pytest.fixture(autouse=True)
def fresh_warnings():
    sdpa_drop_in.reset_fallback_warnings()
    yield
    sdpa_drop_in.reset_fallback_warnings()


def _bhsd(B, H, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return randn(B, S, H, D, dtype=dtype, gen=g).transpose(1, 2).contiguous()


def _check_vs_ref(out, q, k, v, scale=None, causal=False, kv_mask=None):
    """out, q, k, v BHSD; the reference and math path run on BSHD views."""
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    ref, _ = attention_ref(qs, ks, vs, scale, causal, kv_mask)
    base, _ = same_dtype_math_path(qs, ks, vs, scale, causal, kv_mask)
    assert out.shape == q.shape[:3] + (v.shape[-1],)
    assert out.dtype == q.dtype
    assert_close_to_ref("sdpa out", out.transpose(1, 2), ref, base, q.dtype)


def _no_fallback():
    """A context in which any fallback warning fails the test."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message="cp_attention.sdpa")
    return ctx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask_shape", [None, "B11S", "S", "1S", "11S", "111S"])
def test_matches_reference_with_key_masks(dtype, mask_shape):
    B, H, Sq, Sk, D = 2, 3, 37, 45, 24
    q, k, v = _bhsd(B, H, Sq, D, dtype, 1), _bhsd(B, H, Sk, D, dtype, 2), _bhsd(B, H, Sk, D, dtype, 3)
    g = torch.Generator().manual_seed(4)
    key = torch.rand(B if mask_shape == "B11S" else 1, Sk, generator=g) < 0.6
    key[:, 0] = True
    shapes = {"B11S": (B, 1, 1, Sk), "S": (Sk,), "1S": (1, Sk), "11S": (1, 1, Sk), "111S": (1, 1, 1, Sk)}
    mask = None if mask_shape is None else key.reshape(shapes[mask_shape])
    ctx = _no_fallback()
    try:
        out = cp_attention.sdpa(q, k, v, attn_mask=mask)
    finally:
        ctx.__exit__(None, None, None)
    _check_vs_ref(out, q, k, v, kv_mask=None if mask is None else key.expand(B, Sk))


def test_gqa_causal_scale_match_reference_and_torch():
    B, H, Hkv, S, D = 2, 8, 2, 33, 32
    q, k, v = _bhsd(B, H, S, D, seed=1), _bhsd(B, Hkv, S, D, seed=2), _bhsd(B, Hkv, S, D, seed=3)
    ctx = _no_fallback()
    try:
        out = cp_attention.sdpa(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    finally:
        ctx.__exit__(None, None, None)
    _check_vs_ref(out, q, k, v, scale=0.3, causal=True)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True, scale=0.3, enable_gqa=True))


def test_fully_masked_batch_gives_zero_like_torch():
    q, k, v = _bhsd(2, 2, 5, 8, seed=1), _bhsd(2, 2, 7, 8, seed=2), _bhsd(2, 2, 7, 8, seed=3)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1] = False
    out = cp_attention.sdpa(q, k, v, attn_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask))


def test_layout_views_without_copies(monkeypatch):
    """BHSD inputs reach the kernel as BSHD views of the same memory, and the output is a BHSD view of a
    contiguous BSHD buffer (the layout torch's flash kernels return)."""
    seen = {}
    real = sdpa_drop_in.flash_attn

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        return real(q, k, v, **kw)

    monkeypatch.setattr(sdpa_drop_in, "flash_attn", spy)
    # BSHD storage seen through BHSD views, as diffusers' native backend hands it to SDPA.
    q_store, k_store = torch.randn(2, 19, 4, 16), torch.randn(2, 23, 4, 16)
    v_store = torch.randn(2, 23, 4, 16)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q_store, k_store, v_store))
    out = cp_attention.sdpa(q, k, v)
    for name, store in (("q", q_store), ("k", k_store), ("v", v_store)):
        assert seen[name].data_ptr() == store.data_ptr() and seen[name].shape == store.shape, name
    assert out.shape == (2, 4, 19, 16) and out.transpose(1, 2).is_contiguous()
    _check_vs_ref(out, q, k, v)
    # Contiguous BHSD and a last dim that is not contiguous (copied, then fine).
    q2 = q.contiguous()
    cp_attention.sdpa(q2, k, v)
    assert seen["q"].data_ptr() == q2.data_ptr()
    wide = torch.randn(2, 4, 19, 32)
    q3 = wide[..., ::2]
    _check_vs_ref(cp_attention.sdpa(q3, k, v), q3, k, v)


FALLBACKS = {
    "dropout": (dict(dropout_p=0.5), "dropout_p > 0"),
    "float-mask": (dict(attn_mask=torch.zeros(2, 1, 1, 9)), "not boolean"),
    "per-query-mask": (dict(attn_mask=torch.rand(2, 1, 7, 9) > 0.3), "varies across heads or queries"),
    "causal-sq-ne-sk": (dict(is_causal=True), "is_causal with Sq != Sk"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallbacks_match_torch_and_warn_once(case):
    kwargs, reason = FALLBACKS[case]
    q, k, v = _bhsd(2, 3, 7, 8, seed=1), _bhsd(2, 3, 9, 8, seed=2), _bhsd(2, 3, 9, 8, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = cp_attention.sdpa(q, k, v, **kwargs)
        torch.manual_seed(0)
        again = cp_attention.sdpa(q, k, v, **kwargs)
    torch.manual_seed(0)
    expected = TORCH_SDPA(q, k, v, **kwargs)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    mine = [str(w.message) for w in caught if "cp_attention.sdpa" in str(w.message)]
    assert len(mine) == 1 and reason in mine[0], mine


def test_other_fallbacks():
    q, k, v = _bhsd(1, 2, 5, 8, seed=1), _bhsd(1, 2, 5, 8, seed=2), _bhsd(1, 2, 5, 8, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # float64, a 5-D input, differing heads without enable_gqa (torch itself then raises)
        assert torch.equal(cp_attention.sdpa(q.double(), k.double(), v.double()),
                           TORCH_SDPA(q.double(), k.double(), v.double()))
        q5, k5, v5 = (t[None] for t in (q, k, v))
        assert torch.equal(cp_attention.sdpa(q5, k5, v5), TORCH_SDPA(q5, k5, v5))
        with pytest.raises(RuntimeError):
            cp_attention.sdpa(_bhsd(1, 4, 5, 8), k, v)
    reasons = [str(w.message) for w in caught]
    assert any("dtype" in r for r in reasons) and any("4-D" in r for r in reasons)
    assert any("without enable_gqa" in r for r in reasons)


@pytest.mark.parametrize("backend", ["auto", "aten"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_inputs_that_need_grad_backprop_through_our_kernels(backend, is_causal):
    # No fallback: the gradients are ours (flash_attn's backward), checked against float64 autograd.
    q, k, v = (_bhsd(2, 3, 11, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    dout = _bhsd(2, 3, 11, 8, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        out = cp_attention.sdpa(q, k, v, is_causal=is_causal, backend=backend)
    out.backward(dout)
    bshd = [t.detach().transpose(1, 2) for t in (q, k, v, dout)]
    ref = attention_bwd_ref(*bshd, causal=is_causal)
    base = same_dtype_math_path_bwd(*bshd, causal=is_causal)
    for name, t, r, b in zip(("dq", "dk", "dv"), (q, k, v), ref, base):
        assert_close_to_ref(name, t.grad.transpose(1, 2), r, b, torch.float32)


@pytest.mark.parametrize("kwargs,name", [(dict(dropout_p=-0.1), "dropout_p"),
                                         (dict(is_causal=1), "is_causal"),
                                         (dict(scale=float("nan")), "scale")])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = _bhsd(1, 2, 4, 8)
    with pytest.raises(ValueError, match=name):
        cp_attention.sdpa(q, q, q, **kwargs)


# ---------------------------------------------------------------------------------------------------------
class TinyAttention(torch.nn.Module):
    """A model that calls torch.nn.functional.scaled_dot_product_attention itself, as diffusers does."""

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FakeCP:
    """Stands in for ContextParallel (one process): records calls and attends with flash_attn."""

    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, *, scale=None, causal=False, kv_mask=None):
        self.calls.append((q.shape, kv_mask))
        return cp_attention.flash_attn(q, k, v, scale=scale, causal=causal, kv_mask=kv_mask)


def test_use_as_sdpa_routes_model_calls_and_restores(monkeypatch):
    calls = []
    real = sdpa_drop_in.flash_attn
    monkeypatch.setattr(sdpa_drop_in, "flash_attn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _bhsd(2, 2, 6, 8, seed=1), _bhsd(2, 2, 6, 8, seed=2), _bhsd(2, 2, 6, 8, seed=3)
    original = F.scaled_dot_product_attention
    with cp_attention.use_as_sdpa():
        assert F.scaled_dot_product_attention is cp_attention.sdpa
        out = TinyAttention()(q, k, v)
    assert F.scaled_dot_product_attention is original and len(calls) == 1
    _check_vs_ref(out, q, k, v)


def test_use_as_sdpa_restores_on_exception():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with cp_attention.use_as_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="cp must be"):
        with cp_attention.use_as_sdpa(cp=object()):
            pass
    assert F.scaled_dot_product_attention is original


def test_use_as_sdpa_nests_and_routes_to_context_parallel():
    q, k, v = _bhsd(2, 2, 6, 8, seed=1), _bhsd(2, 2, 6, 8, seed=2), _bhsd(2, 2, 6, 8, seed=3)
    mask = torch.tensor([[True] * 6, [True, False] * 3])[:, None, None, :]
    original, cp = F.scaled_dot_product_attention, FakeCP()
    with cp_attention.use_as_sdpa():
        with cp_attention.use_as_sdpa(cp):
            out = TinyAttention()(q, k, v, mask)
            assert len(cp.calls) == 1 and cp.calls[0][0] == (2, 6, 2, 8)  # BSHD shards
            assert cp.calls[0][1].shape == (2, 6)  # the key mask, as [B, S_local]
            with pytest.raises(ValueError, match="not boolean"):  # no silent local-only fallback
                TinyAttention()(q, k, v, torch.zeros(2, 1, 1, 6))
        assert F.scaled_dot_product_attention is cp_attention.sdpa
        with pytest.raises(RuntimeError):
            with cp_attention.use_as_sdpa(cp):
                raise RuntimeError("inner")
        assert F.scaled_dot_product_attention is cp_attention.sdpa
    assert F.scaled_dot_product_attention is original
    _check_vs_ref(out, q, k, v, kv_mask=mask[:, 0, 0])

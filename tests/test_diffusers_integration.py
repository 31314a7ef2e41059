"""The diffusers backend in one process: registration (enum member, registry, idempotence), the version check,
the backend function as diffusers' dispatcher calls it (BSHD, masks, GQA, causal, LSE in [B, S, H]), and
that importing cp_attention does not import diffusers. Context parallelism: tests/test_diffusers_cp.py."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import randn
from reference import check_attention

diffusers = pytest.importorskip("diffusers")

import cp_attention  # noqa: E402
import cp_attention.integrations.diffusers as cpd  # noqa: E402
from cp_attention import sdpa_drop_in  # noqa: E402


def test_importing_cp_attention_does_not_import_diffusers():
    code = ("import sys, cp_attention, cp_attention.integrations; "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_register_adds_one_member_and_is_idempotent():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    before = [(m.name, m.value) for m in AttentionBackendName if m.value != cpd.BACKEND_NAME]
    member = cpd.register()
    assert member is cpd.register()  # idempotent
    after = [(m.name, m.value) for m in AttentionBackendName]
    assert after == before + [("CP_ATTENTION", "cp_attention")], "existing members must stay as they were"
    assert AttentionBackendName("cp_attention") is member and AttentionBackendName.CP_ATTENTION is member
    assert member == "cp_attention" and isinstance(member, str)
    assert _AttentionBackendRegistry._backends[member] is cpd.attention_backend
    assert _AttentionBackendRegistry._is_context_parallel_available(member)
    names = _AttentionBackendRegistry._supported_arg_names[member]
    assert {"return_lse", "_parallel_config", "enable_gqa"} <= names


@pytest.mark.parametrize("version", ["0.39.2", "0.43.0", "1.0.0", "garbage"])
def test_unsupported_version_names_supported_ones(version):
    supported = r"0\.40\.x, 0\.41\.x, 0\.42\.x \(tested on 0\.42\.1\)"
    with pytest.raises(cpd.UnsupportedDiffusers, match=supported):
        cpd.check_version(version)


def test_register_checks_installed_version(monkeypatch):
    assert cpd.check_version() == diffusers.__version__
    monkeypatch.setattr(diffusers, "__version__", "0.43.0.dev0")
    with pytest.raises(cpd.UnsupportedDiffusers, match="diffusers 0.43.0.dev0 is not supported"):
        cpd.register()


def test_set_attention_backend_runs_our_kernel(monkeypatch):
    from diffusers_models import references, run, tiny_flux, tiny_flux_inputs

    calls = []
    real = sdpa_drop_in.flash_attn
    monkeypatch.setattr(sdpa_drop_in, "flash_attn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cpd.register()
    model, inputs = tiny_flux(), tiny_flux_inputs(3, 4, 5)
    ref, base = references(model, inputs)
    model.set_attention_backend("cp_attention")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="cp_attention.sdpa")  # no fallback on this path
        out = run(model, inputs)
    assert len(calls) == 2, f"one call per attention layer (2), got {len(calls)}"
    from reference import assert_close_to_ref

    assert_close_to_ref("flux", out.double(), ref, base, torch.float32)


def _bshd(B, S, H, D, seed, dtype=torch.float32):
    return randn(B, S, H, D, dtype=dtype, gen=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask_form", ["B_S", "B_1_1_S"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_backend_masks_and_lse_layout(mask_form, dtype):
    """Called like diffusers' dispatcher: BSHD tensors, a [B, Sk] or [B, 1, 1, Sk] bool key mask (one batch
    entry masks every key), return_lse -> lse [B, Sq, H] float32."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    member = cpd.register()
    B, Sq, Sk, H, D = 3, 21, 26, 4, 32
    q, k, v = _bshd(B, Sq, H, D, 1, dtype), _bshd(B, Sk, H, D, 2, dtype), _bshd(B, Sk, H, D, 3, dtype)
    mask = torch.rand(B, Sk, generator=torch.Generator().manual_seed(4)) < 0.6
    mask[:, 1] = True
    mask[-1] = False
    attn_mask = mask if mask_form == "B_S" else mask[:, None, None, :]
    out, lse = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, attention_kwargs={"return_lse": True},
                                     backend=member)
    assert lse.shape == (B, Sq, H) and lse.dtype == torch.float32 and lse.is_contiguous()
    check_attention(out, lse.transpose(1, 2), q, k, v, kv_mask=mask)
    alone = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=member)
    assert torch.equal(alone, out)


def test_backend_gqa_and_causal():
    member = cpd.register()
    B, S, H, Hkv, D = 2, 17, 8, 2, 16
    q, k, v = _bshd(B, S, H, D, 1), _bshd(B, S, Hkv, D, 2), _bshd(B, S, Hkv, D, 3)
    out, lse = cpd.attention_backend(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    check_attention(out, lse.transpose(1, 2), q, k, v, causal=True)
    assert member.value == "cp_attention"


def test_backend_unsupported_arguments():
    q, k, v = _bshd(2, 5, 2, 8, 1), _bshd(2, 5, 2, 8, 2), _bshd(2, 5, 2, 8, 3)
    float_mask = torch.zeros(2, 1, 1, 5)
    # Without the LSE torch's SDPA takes over (warned); the LSE cannot come from it.
    sdpa_drop_in.reset_fallback_warnings()
    with pytest.warns(UserWarning, match="not boolean"):
        out = cpd.attention_backend(q, k, v, attn_mask=float_mask)
    ref = sdpa_drop_in.TORCH_SDPA(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  attn_mask=float_mask).transpose(1, 2)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="cannot run these arguments: attn_mask is not boolean"):
        cpd.attention_backend(q, k, v, attn_mask=float_mask, return_lse=True)
    with pytest.raises(ValueError, match="dropout_p > 0"):
        cpd.attention_backend(q, k, v, dropout_p=0.1, return_lse=True)


def test_no_accelerator_workaround_is_scoped():
    original = torch.accelerator.device_count
    with cpd.no_accelerator_workaround():
        assert torch.accelerator.device_count() >= 1
    assert torch.accelerator.device_count is original
    with pytest.raises(KeyError):
        with cpd.no_accelerator_workaround():
            raise KeyError("x")
    assert torch.accelerator.device_count is original
    assert cp_attention.sdpa is sdpa_drop_in.sdpa

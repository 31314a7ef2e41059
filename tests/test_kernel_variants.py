"""What runs by default and what says so: the record of proven kernel variants
(cp_attention/kernel_variants.py) and the API's use of it, the CP_ATTENTION_LOG report of each call's
choice, and the fallback where no image of the build's CUDA kernels fits the device (faked here: a probe
result and FakeTensors on "cuda"), with the plain-torch merge it may fall back on."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import randn
from reference import merge_ref
from torch._subclasses.fake_tensor import FakeTensorMode

import cp_attention
from cp_attention import attention
from cp_attention import kernel_variants as kv
from cp_attention.aten_backend import merge_states_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
OPT_IN = ("cuda_sm90", "triton_tma")


# ---------------------------------------------------------------------------------------------------------
# The record.
@pytest.mark.parametrize("variant", sorted(kv.PROVEN), ids=lambda v: "_".join(v))
def test_proven_variants_cite_a_run_where_they_passed(variant):
    # Each proven variant names a results file of benchmarks/results/ that exists, comes from a GPU and shows
    # the variant pass there: every shape of a forward benchmark timed under its name (the benchmark times
    # nothing that failed its correctness check), or a kernel probe's PASS.
    engine, kernel = variant
    assert kernel in kv.KERNELS[engine], f"{variant}: not a variant of the {engine} ops"
    proof = kv.PROVEN[variant]
    path = os.path.join(RESULTS, proof.file)
    assert os.path.isfile(path), f"{variant}: {proof.file} is not in benchmarks/results/"
    result = json.loads(open(path).read())
    assert result["environment"]["device"].startswith("cuda"), f"{path}: not a GPU run"
    rows = result["rows"]
    if result["benchmark"] == "kernel_probe":
        assert proof.name == f"{engine}_{kernel}", proof
        assert [r["verdict"] for r in rows if r["variant"] == proof.name] == ["PASS"], path
    else:
        assert result["benchmark"] == "flash_fwd" and proof.name in result["backends"], (path, proof)
        assert rows and all(f"{proof.name}_ms" in r and f"{proof.name}_failed" not in r for r in rows), path


def test_defaults_are_proven():
    for engine in kv.KERNELS:
        assert kv.is_proven(engine, kv.DEFAULTS[engine]), (engine, kv.DEFAULTS[engine])
        assert kv.is_proven(engine, "default")
    # A chooser is proven only when every variant it may pick is.
    assert not kv.is_proven("cuda", "auto") and not kv.is_proven("triton", "auto")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_and_listed_backends_run_proven_variants_only(device_type):
    names = cp_attention.available_backends(device_type)
    assert not set(OPT_IN) & set(names), names
    for name in names:
        if name in kv.BACKENDS:
            assert kv.is_proven(*kv.resolve(name)), name
    for name in OPT_IN:
        assert not kv.is_proven(*kv.resolve(name)), f"{name} is proven now: list it, update this test"


def test_ops_default_to_the_proven_variants():
    # Called without a kernel the ops run "default", the variant proven when they were written.
    ops = torch.ops.cp_attention
    for op in (ops.flash_attn_fwd, ops.flash_attn_fwd_acc_, ops.triton_flash_attn_fwd,
               ops.triton_flash_attn_fwd_acc_):
        arg = op.default._schema.arguments[-1]
        assert (arg.name, arg.default_value) == ("variant", "default"), op
    assert kv.variants_of("cuda", "default") == ("mma",)
    assert kv.variants_of("triton", "default") == ("pointer",)


def _captured_kernels(monkeypatch):
    """Calls of the GPU ops from the API, recorded as (op, kernel) without running them (CPU tensors pass
    the device checks here)."""
    seen = []
    monkeypatch.setattr(attention, "_check_own_device", lambda *a: None)
    monkeypatch.setattr(attention, "_check_triton_device", lambda *a: None)
    monkeypatch.setattr(attention, "_own_runs", lambda op, device: op != "flash_attn_fwd_acc_")
    for name in ("flash_attn_fwd", "triton_flash_attn_fwd", "triton_flash_attn_fwd_acc_"):
        monkeypatch.setattr(attention.ops, name,
                            lambda *a, name=name: seen.append((name, a[-1])) or (None, None))
    return seen


def test_api_passes_the_record_explicitly(monkeypatch):
    seen = _captured_kernels(monkeypatch)
    q = torch.randn(1, 3, 2, 8)
    state = (torch.zeros(1, 3, 2, 8), torch.full((1, 2, 3), -math.inf))
    for backend in ("cuda", "cuda_sm90", "triton", "triton_tma"):
        cp_attention.flash_attn(q, q, q, backend=backend, return_lse=True)
    cp_attention.flash_attn_acc_(q, q, q, *state, backend="triton")
    assert seen == [("flash_attn_fwd", "mma"), ("flash_attn_fwd", "auto"),
                    ("triton_flash_attn_fwd", "pointer"), ("triton_flash_attn_fwd", "auto"),
                    ("triton_flash_attn_fwd_acc_", "pointer")]

    # A GPU run proves the choosers: editing the record, and nothing else, makes them the defaults.
    seen.clear()
    for engine in kv.KERNELS:
        for variant in kv.KERNELS[engine]:
            monkeypatch.setitem(kv.PROVEN, (engine, variant), kv.Proof("a-later-run.json", variant))
        monkeypatch.setitem(kv.DEFAULTS, engine, "auto")
    for backend in ("cuda", "triton"):
        cp_attention.flash_attn(q, q, q, backend=backend)
    assert seen == [("flash_attn_fwd", "auto"), ("triton_flash_attn_fwd", "auto")]


def test_unknown_backend_lists_the_opt_in_ones():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=r"unknown backend 'sm90'.*'cuda_sm90'.*'triton_tma'"):
        cp_attention.flash_attn(q, q, q, backend="sm90")
    with pytest.raises(ValueError, match="backend 'cuda_sm90' runs on cuda tensors, got q on cpu"):
        cp_attention.flash_attn(q, q, q, backend="cuda_sm90")


def test_kernel_argument_errors_match_between_fake_and_real():
    # On the CPU "default", "panels" and "brgemm" name kernels; the fake kernels (what torch.compile
    # traces) say the same as the C++ op, and on "cuda" they list the CUDA op's names.
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError) as real:
        torch.ops.cp_attention.flash_attn_fwd(q, q, q, None, False, None, "mma")
    assert str(real.value).splitlines()[0] == (
        "cp_attention.flash_attn_fwd: variant must be 'default', 'panels' or 'brgemm' on the CPU, got 'mma'")
    with FakeTensorMode():
        fq = torch.empty(1, 3, 2, 8)
        with pytest.raises(ValueError) as fake:
            torch.ops.cp_attention.flash_attn_fwd(fq, fq, fq, None, False, None, "mma")
        assert str(fake.value) == str(real.value).splitlines()[0]
        cq, clse = torch.empty(1, 3, 2, 8, device="cuda"), torch.empty(1, 2, 3, device="cuda")
        with pytest.raises(ValueError, match="variant must be default, mma, sm90, sm90_tma, "
                                             "sm90_tma_no_pingpong or auto, got 'pointer'"):
            torch.ops.cp_attention.flash_attn_fwd_acc_(cq, cq, cq, cq.clone(), clse, None, False, None,
                                                       "pointer")


# ---------------------------------------------------------------------------------------------------------
# CP_ATTENTION_LOG.
def _run_logged(env_value, code):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(kv.LOG_ENV, None)
    if env_value is not None:
        env[kv.LOG_ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)


LOGGED_CALLS = """
import logging, torch, cp_attention
print("level after import", logging.getLogger("cp_attention").level)
q = torch.randn(1, 5, 2, 8)
out, lse = cp_attention.flash_attn(q, q, q, backend="cpu", return_lse=True)
cp_attention.flash_attn(q, q, q, backend="aten")
cp_attention.merge_attn_states_(out, lse, out, lse)
print("level after calls", logging.getLogger("cp_attention").level)
"""


def test_log_switch_reports_each_call():
    on = _run_logged("1", LOGGED_CALLS)
    assert on.returncode == 0, on.stderr
    # Nothing happens at import; the first call reads the switch.
    assert "level after import 0" in on.stdout and "level after calls 10" in on.stdout
    assert on.stderr.splitlines() == [
        "cp_attention: cp_attention.flash_attn: backend 'cpu' -> cpu kernel 'default'; float32 [1, 5, 2, 8] "
        "on cpu",
        "cp_attention: cp_attention.flash_attn: backend 'aten' -> aten kernel 'aten_cpu_flash'; float32 "
        "[1, 5, 2, 8] on cpu",
        "cp_attention: cp_attention.merge_attn_states_: backend 'auto' -> cpu kernel 'merge'; float32 "
        "[1, 5, 2, 8] on cpu"], on.stderr
    for value in (None, "0", ""):
        off = _run_logged(value, LOGGED_CALLS)
        assert off.returncode == 0 and off.stderr == "", (value, off.stderr)
        assert "level after calls 0" in off.stdout


def test_log_names_proven_and_unproven_gpu_variants(monkeypatch, caplog):
    # Without the switch the caller's own logging configuration decides; GPU calls say whether their kernel
    # is proven.
    _captured_kernels(monkeypatch)
    q = torch.randn(1, 3, 2, 8)
    with caplog.at_level(logging.DEBUG, logger="cp_attention"):
        for backend in ("cuda", "cuda_sm90", "triton", "triton_tma"):
            cp_attention.flash_attn(q, q, q, backend=backend)
    assert [r.getMessage().split(" -> ")[1].split(";")[0] for r in caplog.records] == [
        "cuda kernel 'mma' (proven)", "cuda kernel 'auto' (unproven)", "triton kernel 'pointer' (proven)",
        "triton kernel 'auto' (unproven)"]


# ---------------------------------------------------------------------------------------------------------
# No image of the build's CUDA kernels fits the device: "auto" falls back, with one warning.
@pytest.fixture
def no_cuda_image(monkeypatch):
    """A CUDA device 0 that the build's kernels do not fit, as the runtime's answer would say; returns the
    list of devices the probe was asked about."""
    asked = []
    monkeypatch.setattr(attention, "_cuda_index", lambda device: device.index or 0)
    monkeypatch.setattr(attention, "_probe_kernel_image", lambda index: asked.append(index) or False)
    monkeypatch.setattr(attention, "_device_name", lambda index: "a future GPU, sm_130")
    monkeypatch.setattr(attention, "_IMAGE_FITS", {})
    monkeypatch.setattr(attention, "_BACKENDS_FOUND", {})
    return asked


def test_no_image_warns_once_and_drops_cuda_from_auto(no_cuda_image):
    with pytest.warns(RuntimeWarning, match=r"no image that loads on CUDA device 0 \(a future GPU, sm_130\)"):
        names = cp_attention.available_backends("cuda")
    assert "cuda" not in names and names[0] == "aten", names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cp_attention.available_backends("cuda:0") == names
        with FakeTensorMode():
            q = torch.empty(1, 3, 2, 8, device="cuda")
            with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cuda:0: this build has "
                                                   "no CUDA kernel that loads on it"):
                cp_attention.flash_attn(q, q, q, backend="cuda")
    assert no_cuda_image == [0], "the runtime is asked once per device"


@pytest.mark.parametrize("triton_runs", [True, False], ids=["to-triton", "to-torch"])
def test_no_image_merges_fall_back(no_cuda_image, monkeypatch, triton_runs):
    # Every ring step merges through "auto"; on such a device it takes Triton's merge, or plain torch ops.
    monkeypatch.setattr(attention, "_triton_runs_on", lambda device_type: triton_runs)
    used = []
    for name in ("merge_attn_states", "merge_attn_states_", "triton_merge_attn_states",
                 "triton_merge_attn_states_"):
        real = getattr(attention.ops, name)
        monkeypatch.setattr(attention.ops, name,
                            lambda *a, name=name, real=real: used.append(name) or real(*a))
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = torch.empty(1, 3, 2, 8, device="cuda")
        lse = torch.empty(1, 2, 3, device="cuda")
        merged, merged_lse = cp_attention.merge_attn_states(out, lse, out, lse)
        cp_attention.merge_attn_states_(out, lse, out, lse)
        cpu_out, cpu_lse = torch.empty(1, 3, 2, 8), torch.empty(1, 2, 3)
        cp_attention.merge_attn_states_(cpu_out, cpu_lse, cpu_out, cpu_lse)  # the CPU keeps its own kernel
    assert merged.device.type == "cuda" and merged.shape == out.shape and merged_lse.shape == lse.shape
    assert used == (["triton_merge_attn_states", "triton_merge_attn_states_"] if triton_runs else []) + [
        "merge_attn_states_"]


# The plain-torch merge those devices may get, against the float64 reference: rows empty on one side (whose
# out holds NaN and must not be read), on both, mixed dtypes, strided views, and in place.
@pytest.mark.parametrize("dtype_a,dtype_b", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
def test_torch_merge_matches_reference(dtype_a, dtype_b):
    gen = torch.Generator().manual_seed(5)
    B, S, H, D = 2, 9, 3, 16
    out_a = randn(B, S, H + 1, D, dtype=dtype_a, gen=gen)[:, :, 1:]
    out_b = randn(B, S, H, D, dtype=dtype_b, gen=gen)
    lse_a = torch.randn(B, H, S, generator=gen) * 3
    lse_b = (torch.randn(B, S, H, generator=gen) * 3).transpose(1, 2)
    lse_a[:, :, ::3] = -math.inf
    lse_b[:, :, ::2] = -math.inf
    out_a[lse_a.isneginf().transpose(1, 2)] = math.nan
    out_b[lse_b.isneginf().transpose(1, 2)] = math.nan
    ref_out, ref_lse = merge_ref(out_a, lse_a, out_b, lse_b)
    out, lse = merge_states_torch("op", out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.promote_types(dtype_a, dtype_b) and out.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any()
    empty = lse.isneginf()
    assert torch.equal(empty, ref_lse.isneginf()) and (out[empty.transpose(1, 2)] == 0).all()
    tol = 1e-6 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    # In place into a float32 accumulator, as merge_attn_states_ does.
    acc, acc_lse = out_a.float(), lse_a.clone()
    merge_states_torch("op", acc, acc_lse, out_b, lse_b, into=(acc, acc_lse))
    torch.testing.assert_close(acc_lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(acc.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_torch_merge_checks_its_inputs():
    out, lse = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"merge_attn_states_: lse_b must have shape \[B, H, S\]"):
        merge_states_torch("cp_attention.merge_attn_states_", out, lse, out, lse[:, :, :3], into=(out, lse))

"""The planner's cost model and `plan` (cp_attention.planner): layouts enumerated, costs against the model's
formulas worked by hand here in float64 on a synthetic profile, link placement, rankings on the built-in
profiles, the CLI, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import toy_hardware

from cp_attention.planner import plan
from cp_attention.planner.cost import Workload, estimate, layouts

TOY = toy_hardware()  # 4 devices on a fast link, a slower network beyond

WORLDS = [1, 2, 3, 4, 6, 8, 16]
SHAPES = [dict(seq_len=4608, heads=24, head_dim=128), dict(seq_len=1000, heads=5, head_dim=64),
          dict(seq_len=37, heads=3, head_dim=64, kv_heads=1)]


def _kernel_ms(b, h, sq, sk, d, rate_tflops, half, overhead_us):
    fill = (sq / (sq + half)) * (sk / (sk + half))
    return overhead_us / 1e3 + 4.0 * b * h * sq * sk * d / (rate_tflops * 1e12 * fill) * 1e3


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_layouts_are_every_valid_factorization(world, batch):
    heads, seq = 6, 1000
    got = set(layouts(world, heads, batch, seq))
    sizes = range(1, world + 1)
    expected = {(d, r, u) for d in sizes for r in sizes for u in sizes
                if d * r * u == world and d <= batch and u <= heads}
    assert got == expected


def test_ulysses_only_cost_matches_the_formula():
    w = Workload(seq_len=4096, heads=8, head_dim=128, kv_heads=8, batch=1, causal=False, dtype="bfloat16",
                 train=False)
    p = estimate(w, TOY, 1, 1, 4, "ulysses-inner")
    local, e, D = 4096 / 4, 2, 128
    qkv = local * D * e * (2 + 2 * 2) * 4 * 3 / 4  # 2 query heads and 2 kv heads per rank, k and v
    out = local * D * e * 2 * 4 * 3 / 4
    a2a = 2 * 5e-3 + (qkv + out) / 100e9 * 1e3
    compute = _kernel_ms(1, 2, 4096, 4096, D, 200.0, 100.0, 10.0)
    assert p.comm_ms == pytest.approx(a2a, rel=1e-12)
    assert p.compute_ms == pytest.approx(compute, rel=1e-12)
    assert p.time_ms == pytest.approx(a2a + compute, rel=1e-12)
    assert (p.ulysses_link, p.ring_link) == ("fast", None)
    assert p.memory_bytes == int(2 * 4096 * D * e * (2 * 2 + 2 * 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_ring_only_cost_matches_the_formula(causal, train):
    w = Workload(seq_len=4000, heads=4, head_dim=64, kv_heads=2, batch=2, causal=causal, dtype="bfloat16",
                 train=train)
    R = 8  # extent 8 > the fast span of 4: the slow link
    p = estimate(w, TOY, 1, R, 1, "ulysses-inner")
    sq = 4000 / R
    step = _kernel_ms(2, 4, sq, sq, 64, 100.0, 100.0, 10.0)
    steps = R - 0.5 if causal else R
    compute = steps * step * (3.5 if train else 1.0)
    kv = 2 * sq * 2 * 64 * 2 * 2
    hop = 20e-3 + kv / 10e9 * 1e3
    exposed = (R - 1) * max(0.0, hop - 0.5 * step)
    if train:
        exposed += (R - 1) * max(0.0, 20e-3 + (kv + 2 * sq * 2 * 64 * 4 * 2) / 10e9 * 1e3 - 0.5 * 2.5 * step)
    assert p.compute_ms == pytest.approx(compute, rel=1e-12)
    assert p.comm_ms == pytest.approx(exposed, rel=1e-12)
    assert p.ring_link == "slow" and p.ulysses_link is None


def test_placement_decides_which_group_crosses_the_slow_link():
    plans = {p.placement: p for p in plan(8, seq_len=8192, heads=16, head_dim=128, hardware=TOY)
             if (p.ring_degree, p.ulysses_degree) == (2, 4)}
    inner = plans["ulysses-inner"]
    assert inner.groups == dict(ulysses=[0, 1, 2, 3], ring=[0, 4])
    assert (inner.ulysses_link, inner.ring_link) == ("fast", "slow")
    outer = plans["ring-inner"]
    assert outer.groups == dict(ulysses=[0, 2, 4, 6], ring=[0, 1])
    assert (outer.ulysses_link, outer.ring_link) == ("slow", "fast")
    # The all-to-all moves more than a hop hides: keeping it on the fast link wins.
    assert inner.time_ms < outer.time_ms


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"S{s['seq_len']}H{s['heads']}")
@pytest.mark.parametrize("world", [2, 4, 8])
def test_plan_is_sorted_and_complete(shape, world):
    plans = plan(world, hardware=TOY, batch=2, **shape)
    times = [p.time_ms for p in plans]
    assert times == sorted(times)
    assert all(p.data_degree * p.ring_degree * p.ulysses_degree == world for p in plans)
    assert all(p.ulysses_degree <= shape["heads"] for p in plans)
    assert all(math.isfinite(p.time_ms) and p.time_ms > 0 and p.compute_ms > 0 for p in plans)
    found = layouts(world, shape["heads"], 2, shape["seq_len"])
    expected = sum(2 if r > 1 and u > 1 else 1 for _, r, u in found)
    assert len(plans) == expected


def test_cfg_doubles_the_batch_a_data_axis_can_split():
    plain = {p.layout for p in plan(4, seq_len=4096, heads=8, head_dim=64, hardware=TOY)}
    cfg = {p.layout for p in plan(4, seq_len=4096, heads=8, head_dim=64, hardware=TOY, cfg=True)}
    assert "2x1x2" not in plain and "2x1x2" in cfg


@pytest.mark.parametrize("name", ["h100-sxm", "h200-sxm", "a100-sxm"])
def test_nvlink_profiles_rank_flux_on_4_gpus_as_published(name):
    """FLUX.1 at 1024 x 1024 (4096 image + 512 text tokens, 24 heads x 128) on 4 GPUs of an NVLink node:
    both published 4 x H100 tables measured Ulysses fastest, then Unified 2 x 2, then ring."""
    plans = plan(4, seq_len=4608, heads=24, head_dim=128, hardware=name)
    cp = {(p.ring_degree, p.ulysses_degree): p.time_ms for p in plans if p.placement == "ulysses-inner"}
    assert cp[(1, 4)] < cp[(2, 2)] < cp[(4, 1)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(hardware="h900"), "h100-sxm"),
    (dict(kv_heads=5), "kv_heads must divide heads"),
    (dict(dtype=torch.int8), "dtype must be one of"),
    (dict(seq_len=3), "no layout of world_size=8"),
    (dict(heads=0), "heads must be an int >= 1"),
    (dict(batch=True), "batch must be an int >= 1"),
])
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(seq_len=4096, heads=24, head_dim=128, hardware=TOY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan(8, **args)


def test_cli_prints_the_ranked_table(capsys):
    from cp_attention.planner.cli import main

    assert main(["--model", "flux", "--height", "1024", "--width", "1024", "--gpus", "8",
                 "--hardware", "l20-pcie"]) == 0
    out = capsys.readouterr().out
    assert "flux 1024x1024: sequence 4608, 24 heads x 128" in out
    rows = [r for r in out.splitlines() if r.startswith("| ") and not r.startswith("| #")]
    expected = plan(8, seq_len=4608, heads=24, head_dim=128, hardware="l20-pcie")
    assert len(rows) == len(expected)
    assert [r.split("|")[2].strip() for r in rows] == [p.layout for p in expected]


def test_cli_writes_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from cp_attention.planner.cli import main

    path = tmp_path / "layouts.png"
    assert main(["--seq-len", "4608", "--heads", "24", "--head-dim", "128", "--gpus", "4",
                 "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["--model", "flux", "--gpus", "8", "--hardware", "tpu"], "unknown hardware profile"),
    (["--gpus", "8", "--heads", "24"], "--seq-len, --head-dim"),
    (["--model", "flux", "--gpus", "0"], "world_size must be an int >= 1"),
])
def test_cli_errors_exit_2_with_a_message(argv, message, capsys):
    from cp_attention.planner.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_is_exported_as_a_function():
    import cp_attention

    assert callable(cp_attention.plan) and cp_attention.plan is plan


@pytest.mark.parametrize("device_name,profile", [("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                                 ("NVIDIA H200", "h200-sxm"),
                                                 ("NVIDIA A100-PCIE-40GB", "a100-pcie"),
                                                 ("NVIDIA A100-SXM4-80GB", "a100-sxm"),
                                                 ("NVIDIA L20", "l20-pcie"),
                                                 ("NVIDIA GeForce RTX 4090", "rtx4090-pcie")])
def test_default_hardware_follows_the_cuda_device_name(device_name, profile, monkeypatch):
    from cp_attention.planner import BUILTIN, default_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device_name)
    assert default_hardware() is BUILTIN[profile]


def test_default_hardware_needs_a_name_without_a_known_gpu(monkeypatch):
    from cp_attention.planner import default_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="hardware must be given on a machine without a CUDA device"):
        default_hardware()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Accelerator 9000")
    with pytest.raises(ValueError, match="no built-in profile for the device 'Some Accelerator 9000'"):
        default_hardware()


@pytest.mark.parametrize("R,U", [(1, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("train", [False, True])
def test_packing_and_synchronisation_terms(R, U, train):
    """copy_gbs adds the packing around each all-to-all (every byte of q, k, v and the output read and
    written on both sides), sync_us a fixed cost per all-to-all and per ring hop; both only to comm."""
    import dataclasses

    w = Workload(seq_len=4096, heads=8, head_dim=128, kv_heads=8, batch=1, causal=False, dtype="bfloat16",
                 train=train)
    plain = estimate(w, TOY, 1, R, U, "ulysses-inner")
    extra = estimate(w, dataclasses.replace(TOY, copy_gbs=50.0, sync_us=300.0), 1, R, U, "ulysses-inner")
    passes = 2 if train else 1
    syncs = passes * ((2 if U > 1 else 0) + (R - 1))
    local = 4096 / (R * U)
    hq = hkv = 8 // U
    pack = passes * (2 * 2 * local * 128 * 2 * (2 * hq + 2 * hkv) * U / 50e9 * 1e3 if U > 1 else 0.0)
    assert extra.compute_ms == plain.compute_ms
    assert extra.comm_ms - plain.comm_ms == pytest.approx(pack + syncs * 0.3, rel=1e-12)
    assert extra.details["syncs"] == syncs


def test_profile_fields_round_trip(tmp_path):
    import dataclasses

    from cp_attention.planner import HardwareProfile

    measured = dataclasses.replace(TOY, copy_gbs=12.5, sync_us=250.0, overlap=0.1)
    measured.save(str(tmp_path / "p.json"))
    assert HardwareProfile.load(str(tmp_path / "p.json")) == measured
    for bad in (dict(copy_gbs=0.0), dict(sync_us=-1.0), dict(overlap=1.5)):
        with pytest.raises(ValueError, match="copy_gbs None or > 0|sync_us >= 0|overlap in"):
            dataclasses.replace(TOY, **bad)

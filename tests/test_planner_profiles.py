"""The planner's built-in hardware profiles (planner/profiles.py) and the HardwareProfile they fill in
(planner/hardware.py): round trips, rate lookups, link levels, get_profile and its errors."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from cp_attention.planner.hardware import HardwareProfile, Link
from cp_attention.planner.profiles import BUILTIN, PROFILE_NAMES, get_profile

REQUIRED = ("h100-sxm", "h200-sxm", "a100-sxm", "a100-pcie", "l20-pcie", "l40s-pcie", "rtx4090-pcie")
DTYPES = ("bfloat16", "float16", "float32")


def calibrated(p: HardwareProfile) -> bool:
    return any("calibrated on" in source for source in p.sources)


def small_profile(**over) -> HardwareProfile:
    kw = dict(name="toy", device="toy", attention_tflops={"bfloat16": {64: 100, 128: 300}},
              kernel_half_len=256, kernel_overhead_us=10, gemm_tflops={"bfloat16": 200}, memory_gb=16,
              devices_per_node=4,
              links=(Link("nvlink", 4, 100, 5), Link("ethernet", math.inf, 10, 20)))
    kw.update(over)
    return HardwareProfile(**kw)


def test_names():
    assert PROFILE_NAMES == tuple(sorted(BUILTIN))
    assert set(REQUIRED) <= set(PROFILE_NAMES)
    for name, p in BUILTIN.items():
        assert p.name == name


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_round_trip_dict(name):
    p = BUILTIN[name]
    d = p.to_dict()
    json.dumps(d, allow_nan=False)  # plain JSON: the network span is written "inf", not a float
    q = HardwareProfile.from_dict(json.loads(json.dumps(d)))
    assert q == p
    assert math.isinf(q.links[-1].span)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_round_trip_file(name, tmp_path):
    p = BUILTIN[name]
    path = tmp_path / f"{name}.json"
    p.save(str(path))
    assert HardwareProfile.load(str(path)) == p
    assert get_profile(str(path)) == p
    assert get_profile(path) == p  # a pathlib.Path works too


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profile_values(name):
    p = BUILTIN[name]
    assert p.devices_per_node == 8
    assert p.memory_gb > 0
    assert 0 < p.overlap <= 1
    assert 0 < p.kernel_overhead_us < 100
    assert 0 < p.kernel_half_len < 4096
    for dtype in DTYPES:
        assert set(p.attention_tflops[dtype]) >= {64, 128}, (name, dtype)
        for d in (64, 128):
            assert p.attention_rate(dtype, d) > 0
        assert p.gemm_rate(dtype) > 0
    for d in (64, 128):
        # float32 attention runs on the CUDA cores: far below the half-precision tensor-core kernel
        assert p.attention_rate("float32", d) < p.attention_rate("bfloat16", d) / 3
        assert p.attention_rate("bfloat16", d) == p.attention_rate("float16", d)
    # a larger head dim does more work per byte: the kernel is not slower at 128 than at 64
    assert p.attention_rate("bfloat16", 128) >= p.attention_rate("bfloat16", 64)
    # the attention kernel is a FlashAttention-class rate, below what dense matmuls sustain; a gemm rate
    # calibrated on whole pipelines also carries the elementwise work between the matmuls
    if calibrated(p):
        assert p.attention_rate("bfloat16", 128) / 2 <= p.gemm_rate("bfloat16")
    else:
        assert p.attention_rate("bfloat16", 128) <= p.gemm_rate("bfloat16")
    assert p.sources and all(isinstance(s, str) and s for s in p.sources)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_links(name):
    p = BUILTIN[name]
    spans = [link.span for link in p.links]
    assert all(a < b for a, b in zip(spans, spans[1:])), spans
    assert math.isinf(spans[-1])
    # outer levels are slower: less bandwidth, no lower latency
    for inner, outer in zip(p.links, p.links[1:]):
        assert inner.bandwidth_gbs > outer.bandwidth_gbs, (inner, outer)
        assert inner.latency_us <= outer.latency_us, (inner, outer)
    assert all(link.bandwidth_gbs > 0 and link.latency_us > 0 for link in p.links)
    # a whole node stays inside the node; one more device takes the network
    assert not math.isinf(p.link_for(p.devices_per_node).span)
    assert p.link_for(p.devices_per_node + 1) is p.links[-1]
    assert p.link_for(1) is p.links[0]


def test_link_for_levels():
    h100 = BUILTIN["h100-sxm"]
    assert [h100.link_for(n).name for n in (1, 2, 8, 9, 16, 64)] == ["nvlink"] * 3 + ["infiniband"] * 3
    pcie = BUILTIN["a100-pcie"]
    assert [pcie.link_for(n).name for n in (2, 3, 4, 5, 8, 16)] == \
        ["pcie-switch", "socket", "socket", "upi", "upi", "infiniband"]
    # no peer-to-peer on GeForce: a pair goes through host memory like the rest of the socket
    assert BUILTIN["rtx4090-pcie"].link_for(2).name == "socket"


def test_relative_numbers():
    h100, h200, a100 = BUILTIN["h100-sxm"], BUILTIN["h200-sxm"], BUILTIN["a100-sxm"]
    rate = {name: [BUILTIN[name].attention_rate("bfloat16", d) for d in (64, 128)] for name in PROFILE_NAMES}
    for d in (0, 1):
        assert rate["h100-sxm"][d] > 2 * rate["a100-sxm"][d]
        assert rate["a100-sxm"][d] > rate["a100-pcie"][d]
        assert rate["l40s-pcie"][d] > rate["rtx4090-pcie"][d] > rate["l20-pcie"][d]
    assert h100.gemm_rate("bfloat16") > a100.gemm_rate("bfloat16")
    assert h200.memory_gb > h100.memory_gb
    assert h100.link_for(8).bandwidth_gbs > h100.link_for(16).bandwidth_gbs
    assert h100.link_for(8).bandwidth_gbs > a100.link_for(8).bandwidth_gbs
    assert a100.link_for(8).bandwidth_gbs > BUILTIN["a100-pcie"].link_for(2).bandwidth_gbs
    # host-staged copies (no P2P) are slower and later than P2P under a PCIe switch
    assert BUILTIN["rtx4090-pcie"].link_for(2).bandwidth_gbs < BUILTIN["l40s-pcie"].link_for(2).bandwidth_gbs
    assert BUILTIN["rtx4090-pcie"].link_for(2).latency_us > BUILTIN["l40s-pcie"].link_for(2).latency_us
    assert BUILTIN["rtx4090-pcie"].overlap < BUILTIN["l40s-pcie"].overlap < h100.overlap


def test_attention_rate_interpolates_and_scales():
    p = small_profile()
    assert p.attention_rate("bfloat16", 64) == 100
    assert p.attention_rate("bfloat16", 128) == 300
    assert p.attention_rate("bfloat16", 96) == pytest.approx(200)
    assert p.attention_rate("bfloat16", 80) == pytest.approx(150)
    assert p.attention_rate("bfloat16", 32) == pytest.approx(50)  # scaled linearly below the smallest
    assert p.attention_rate("bfloat16", 16) == pytest.approx(25)
    assert p.attention_rate("bfloat16", 256) == 300  # held above the largest
    assert p.attention_rate("float16", 96) == pytest.approx(200)  # an unlisted dtype falls back to bfloat16
    h100 = BUILTIN["h100-sxm"]
    t = h100.attention_tflops["bfloat16"]
    assert h100.attention_rate("bfloat16", 96) == pytest.approx((t[64] + t[128]) / 2)
    assert h100.attention_rate("bfloat16", 192) == pytest.approx((t[128] + t[256]) / 2)
    assert h100.attention_rate("bfloat16", 32) == pytest.approx(t[64] / 2)


def test_get_profile_accepts():
    p = small_profile()
    assert get_profile(p) is p
    assert get_profile("h100-sxm") is BUILTIN["h100-sxm"]
    assert get_profile("L40S-PCIe") is BUILTIN["l40s-pcie"]


@pytest.mark.parametrize("bad", ["h900", "h100", "profile.txt", "", 42, None, ["h100-sxm"]])
def test_get_profile_unknown(bad):
    with pytest.raises(ValueError) as info:
        get_profile(bad)
    msg = str(info.value)
    assert f"hardware={bad!r}" in msg
    assert ", ".join(PROFILE_NAMES) in msg
    assert ".json" in msg and "HardwareProfile" in msg


def test_get_profile_file_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x", ')
    with pytest.raises(ValueError, match="does not parse as JSON") as info:
        get_profile(str(path))
    assert str(path) in str(info.value)


def test_get_profile_file_not_text(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(ValueError) as info:
        get_profile(str(path))
    assert str(path) in str(info.value)


def test_get_profile_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="cannot be read") as info:
        get_profile(str(path))
    assert str(path) in str(info.value)


def test_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="expected the keys name, attention_tflops") as info:
        HardwareProfile.from_dict({"name": "x"})
    assert "KeyError" in str(info.value) and "links" in str(info.value)
    path = tmp_path / "partial.json"
    d = BUILTIN["a100-sxm"].to_dict()
    del d["gemm_tflops"]
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="expected the keys") as info:
        get_profile(str(path))
    assert str(path) in str(info.value) and "gemm_tflops" in str(info.value)
    path.write_text(json.dumps([1, 2]))  # valid JSON, not an object
    with pytest.raises(ValueError, match="not a hardware profile"):
        get_profile(pathlib.Path(path))


def test_spans_must_increase():
    links = (Link("nvlink", 8, 300, 10), Link("pcie-switch", 2, 20, 10), Link("ethernet", math.inf, 5, 20))
    with pytest.raises(ValueError, match="spans must increase"):
        small_profile(links=links)
    with pytest.raises(ValueError, match="spans must increase"):  # the last level must cover a node
        small_profile(links=(Link("nvlink", 2, 300, 10),), devices_per_node=4)
    with pytest.raises(ValueError, match="at least one level"):
        small_profile(links=())
    assert small_profile(links=(Link("nvlink", 4, 300, 10),)).link_for(4).name == "nvlink"


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUILTIN["h100-sxm"].memory_gb = 1

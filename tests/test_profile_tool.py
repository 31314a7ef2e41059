"""`python -m cp_attention.profile` measures this machine and writes a HardwareProfile that loads: one --quick
run on two ranks (it launches torchrun itself, like the demos), its JSON checked for sane values and for fits
that reproduce the points they were fitted to; its fitting helpers on synthetic data; and its argument checks,
which must reject bad input before anything is launched. Timings are checked only loosely (see below)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from cp_attention import profile as profile_tool
from cp_attention.planner.hardware import HardwareProfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How far a measured time may be from its fitted model. The fits are two-parameter models (latency +
# bytes / bandwidth; overhead + flops / (peak * fill**2)) of times that do not follow them exactly (gloo
# changes protocol with the message size, caches and thread pools change with the shape) and that come from
# a small machine which other processes share while the test runs, so the match is loose. A unit error is
# far outside it: bandwidth in bytes/s instead of GB/s is off by 1e9, in bits by 8x, and the largest
# message's time is mostly bandwidth term (checked below), so such an error shows there; a rate in FLOP/s or
# GFLOP/s instead of TFLOP/s is off by 1e3 or more on every kernel point.
LINK_FACTOR = 3.0
# The kernel's points are milliseconds long and the sweep's first dtype is timed with few calls: looser.
KERNEL_FACTOR = 5.0


def _no_launch(*a):
    pytest.fail("launched torchrun despite bad arguments")


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "p.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "cp_attention.profile", "--quick", "--world-size", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    out_text = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"profile failed (exit {proc.returncode}):\n{out_text}"
    with open(out) as f:
        raw = json.load(f)
    return proc, out, raw, HardwareProfile.load(str(out))


def test_quick_profile_loads_with_sane_values(quick_run):
    proc, out, raw, p = quick_run
    assert p.name.startswith("measured-") and p.device
    assert set(p.attention_tflops) == {"bfloat16", "float32"}
    for dtype, table in p.attention_tflops.items():
        assert set(table) == {64, 128}, dtype
        assert all(_finite_positive(r) for r in table.values()), (dtype, table)
    assert set(p.gemm_tflops) == {"bfloat16", "float32"}
    assert all(_finite_positive(r) for r in p.gemm_tflops.values()), p.gemm_tflops
    assert math.isfinite(p.kernel_half_len) and p.kernel_half_len >= 0
    assert math.isfinite(p.kernel_overhead_us) and p.kernel_overhead_us >= 0
    assert _finite_positive(p.memory_gb)
    assert p.devices_per_node == 2
    assert 0 <= p.overlap <= 1 and math.isfinite(p.overlap)  # measured (step 5)
    assert len(p.links) == 1 and math.isinf(p.links[0].span) and p.links[0].name == "gloo-local"
    assert _finite_positive(p.links[0].bandwidth_gbs) and _finite_positive(p.links[0].latency_us)
    assert p.sources and "cp_attention.profile" in p.sources[0]
    m = raw["measured"]
    assert m["world_size"] == 2 and m["device"] == "cpu" and m["threads_per_rank"] >= 1
    # What a CPU and gloo on localhost can do, in the profile's units (TFLOP/s, GB/s, us): wide bounds that a
    # rate in FLOP/s or GFLOP/s, or a bandwidth in bytes/s, is far outside.
    for r in [*p.gemm_tflops.values(), *(r for t in p.attention_tflops.values() for r in t.values())]:
        assert 1e-5 < r < 100, p
    assert 1e-3 < p.links[0].bandwidth_gbs < 1e3 and 0.1 < p.links[0].latency_us < 1e5, p.links
    assert _finite_positive(m["p2p"]["bandwidth_gbs"]) and _finite_positive(m["p2p"]["latency_us"])
    # The summary on rank 0's stdout.
    for text in ("attention TFLOP/s", "kernel: half_len", "gemm TFLOP/s", "all-to-all:", "ring hop",
                 "overlap at S=", "copy: ", "sync: ", "sync_us ", f"wrote {out}"):
        assert text in proc.stdout, f"{text!r} missing from:\n{proc.stdout[-3000:]}"


@pytest.mark.parametrize("kind", ["all_to_all", "p2p"])
def test_link_fit_reproduces_the_measured_points(quick_run, kind):
    _, _, raw, p = quick_run
    fit = raw["measured"][kind]
    if kind == "all_to_all":  # the link the planner reads: checked as loaded, so its units are what counts
        latency_us, bandwidth_gbs = p.links[0].latency_us, p.links[0].bandwidth_gbs
        assert (latency_us, bandwidth_gbs) == pytest.approx((fit["latency_us"], fit["bandwidth_gbs"]))
    else:
        latency_us, bandwidth_gbs = fit["latency_us"], fit["bandwidth_gbs"]
    points = fit["points"]
    assert len(points) >= 3
    for pt in points:
        if kind == "all_to_all":  # bytes sent to the other rank: half the buffer on two ranks
            assert pt["bytes"] == pt["buffer_bytes"] // 2
        predicted_us = latency_us + pt["bytes"] / (bandwidth_gbs * 1e9) * 1e6
        ratio = max(predicted_us / pt["time_us"], pt["time_us"] / predicted_us)
        assert ratio <= LINK_FACTOR, (kind, pt, latency_us, bandwidth_gbs, predicted_us)
    # The largest message is mostly bandwidth term, so the check above sees a bandwidth in the wrong unit.
    big = max(points, key=lambda pt: pt["bytes"])
    assert big["bytes"] / (bandwidth_gbs * 1e3) > latency_us, (big, latency_us, bandwidth_gbs)


def test_kernel_fit_reproduces_the_sweep(quick_run):
    _, _, raw, p = quick_run
    sweep = raw["measured"]["kernel_sweep"]
    peak = p.attention_tflops[sweep["dtype"]][sweep["head_dim"]]
    assert sweep["peak_tflops"] == pytest.approx(peak)
    h = p.kernel_half_len
    for pt in sweep["points"]:
        s = pt["seq"]
        assert pt["flops"] == 4 * sweep["batch_heads"] * s * s * sweep["head_dim"]
        predicted_us = p.kernel_overhead_us + pt["flops"] / (peak * 1e12 * (s / (s + h)) ** 2) * 1e6
        ratio = max(predicted_us / pt["time_us"], pt["time_us"] / predicted_us)
        assert ratio <= KERNEL_FACTOR, (pt, h, p.kernel_overhead_us, peak, predicted_us)
    # The sweep's point at the rate measurement's shape is the same call timed again: their rates agree
    # (up to noise), which ties the profile's TFLOP/s to the sweep's microseconds and flops directly; an
    # overhead fitted to a wrong rate can hide some of a unit error above, not this.
    same = [pt for pt in sweep["points"] if pt["seq"] == raw["measured"]["attention"]["seq"]]
    assert same, sweep["points"]
    point_tflops = same[0]["flops"] / same[0]["time_us"] / 1e6
    assert 1 / LINK_FACTOR <= point_tflops / peak <= LINK_FACTOR, (point_tflops, peak)


def test_overlap_copy_sync_are_sane_top_level_values(quick_run):
    _, _, raw, p = quick_run
    # Read from the raw JSON: HardwareProfile may not have copy_gbs / sync_us yet (it ignores unknown keys).
    assert isinstance(raw["overlap"], float) and 0 <= raw["overlap"] <= 1, raw["overlap"]
    assert p.overlap == raw["overlap"]
    copy_gbs, sync_us = raw["copy_gbs"], raw["sync_us"]
    # A CPU copies at 0.1 to 1000 GB/s: bytes/s (1e9 too much) or MB/s (1e3 too much) is far outside.
    assert _finite_positive(copy_gbs) and 0.1 < copy_gbs < 1000, copy_gbs
    assert isinstance(sync_us, float) and math.isfinite(sync_us) and sync_us >= 0, sync_us
    # One sync point costs less than a second (seconds or nanoseconds mistaken for us are caught by the
    # recomputation from the raw loop times below, which are in us).
    assert sync_us < 1e6, sync_us


def test_overlap_copy_sync_follow_from_the_raw_timings(quick_run):
    """The written overlap, copy_gbs and sync_us recomputed here from measured's raw timings by the stated
    formulas, and the raw timings tied to each other and to the rest of the profile, so that a wrong formula
    or unit fails."""
    _, _, raw, p = quick_run
    m = raw["measured"]
    ov = m["overlap"]
    bh, d = ov["batch_heads"], ov["head_dim"]
    assert len(ov["shapes"]) == 2
    for sh in ov["shapes"]:
        a, b, c = sh["kernel_us"], sh["hop_us"], sh["overlapped_us"]
        assert all(_finite_positive(t) for t in (a, b, c)), sh
        assert sh["hop_bytes"] == 2 * sh["seq"] * bh * d * 4  # K and V, float32
        hidden = a + b - c
        assert sh["overlap_step"] == pytest.approx(min(1.0, max(0.0, hidden / a)), abs=1e-12), sh
        assert sh["overlap_hop"] == pytest.approx(min(1.0, max(0.0, hidden / b)), abs=1e-12), sh
    # The chosen shape: kernel and hop times closest; the profile's overlap is its hidden / kernel time
    # (cost.py: a hop costs max(0, hop - overlap * step)).
    chosen = min(ov["shapes"], key=lambda sh: abs(math.log(sh["kernel_us"] / sh["hop_us"])))
    assert ov["chosen_seq"] == chosen["seq"]
    assert raw["overlap"] == pytest.approx(chosen["overlap_step"], abs=1e-12)

    cp = m["copy"]
    one, seq, heads, dim = cp["shape"]
    assert one == 1 and cp["bytes"] == 2 * 4 * seq * heads * dim  # read + written, float32
    assert raw["copy_gbs"] == pytest.approx(cp["bytes"] / (cp["time_us"] * 1e-6) / 1e9, rel=1e-9)

    sy = m["sync"]
    t1, t2, t3, n = sy["kernel_loop_us"], sy["kernel_allreduce_loop_us"], sy["allreduce_loop_us"], sy["n"]
    assert n >= 1 and all(_finite_positive(t) for t in (t1, t2, t3)), sy
    assert raw["sync_us"] == pytest.approx(max(0.0, (t2 - t1 - t3) / n), rel=1e-9, abs=1e-9)
    # The raw times are microseconds: an all_reduce of one float on localhost takes 1 us to 100 ms, and the
    # sync loop's kernel is the overlap measurement's kernel at the same shape, timed the same way but in a
    # loop of n (without a barrier between calls, so ranks that share cores contend more: loose).
    assert 1 < t3 / n < 1e5, sy
    same = [sh for sh in ov["shapes"] if sh["seq"] == sy["seq"]]
    assert same and (sy["head_dim"], sy["batch_heads"]) == (d, bh)
    ratio = (t1 / n) / same[0]["kernel_us"]
    assert 1 / KERNEL_FACTOR <= ratio <= KERNEL_FACTOR, (t1 / n, same[0])


def test_overlap_helpers():
    # Kernel 10, hop 4, both 11: 3 of the hop's 4 hide, 3 / 10 of the step.
    assert profile_tool.overlap_fractions(10.0, 4.0, 11.0) == pytest.approx((0.3, 0.75))
    assert profile_tool.overlap_fractions(10.0, 4.0, 15.0) == (0.0, 0.0)  # slower together: clamped
    assert profile_tool.overlap_fractions(4.0, 4.0, 3.0) == (1.0, 1.0)
    shapes = [{"seq": 1, "kernel_us": 1.0, "hop_us": 5.0}, {"seq": 2, "kernel_us": 9.0, "hop_us": 4.0},
              {"seq": 3, "kernel_us": 100.0, "hop_us": 8.0}]
    assert profile_tool.closest_shape(shapes)["seq"] == 2
    # The profile's overlap is the chosen shape's hidden time over its KERNEL time (cost.py's definition).
    measured = [dict(sh, overlapped_us=sh["kernel_us"] + 0.5 * sh["hop_us"]) for sh in shapes]
    measured = [dict(sh, **dict(zip(("overlap_step", "overlap_hop"), profile_tool.overlap_fractions(
        sh["kernel_us"], sh["hop_us"], sh["overlapped_us"])))) for sh in measured]
    chosen, overlap = profile_tool.profile_overlap(measured)
    assert chosen["seq"] == 2 and overlap == pytest.approx(2.0 / 9.0)
    assert profile_tool.sync_cost_us(100.0, 130.0, 10.0, 10) == pytest.approx(2.0)
    assert profile_tool.sync_cost_us(100.0, 105.0, 10.0, 10) == 0.0


def test_fit_line_recovers_a_line():
    xs = [2048.0, 32768.0, 524288.0, 2097152.0]
    ts = [50e-6 + x / 2e9 for x in xs]
    a, b = profile_tool.fit_line(xs, ts)
    assert a == pytest.approx(50e-6, rel=1e-6) and 1 / b == pytest.approx(2e9, rel=1e-6)
    # Times that do not grow with the size still give a positive latency and bandwidth.
    a, b = profile_tool.fit_line(xs, [1e-4, 1e-4, 1e-4, 0.9e-4])
    assert a > 0 and b > 0


def test_fit_kernel_recovers_half_len_and_overhead():
    seqs = [64, 128, 256, 512, 1024, 2048]
    flops = [4.0 * 8 * s * s * 128 for s in seqs]
    peak = 0.1e12
    ts = [profile_tool.kernel_model(s, f, peak, 40.0, 30e-6) for s, f in zip(seqs, flops)]
    h, o = profile_tool.fit_kernel(seqs, flops, ts, peak)
    assert h == pytest.approx(40.0, rel=0.03) and o == pytest.approx(30e-6, rel=0.1)


@pytest.mark.parametrize("args,message", [
    (["--dtypes", "bfloat16,fp8"], "--dtypes: unknown dtype(s) 'fp8'"),
    (["--dtypes", ","], "--dtypes"),
    (["--world-size", "1"], "--world-size must be >= 2"),
    (["--out", "{tmp}/no-such-folder/p.json"], "--out: the folder"),
    (["--out", "{tmp}"], "is a folder"),
])
def test_rejects_bad_arguments_before_launching(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(profile_tool, "_launch", _no_launch)
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "p.json")]
    assert profile_tool.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--world-size", "2"], "--out"),
                                          (["--out", "p.json", "--device", "tpu"], "--device")])
def test_argparse_errors_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.setattr(profile_tool, "_launch", _no_launch)
    with pytest.raises(SystemExit) as e:
        profile_tool.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments_launch_torchrun_with_them(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    monkeypatch.setattr(profile_tool, "_launch", lambda args, argv: seen.append((args.world_size, argv)) or 0)
    argv = ["--out", str(tmp_path / "p.json"), "--world-size", "3", "--dtypes", "float32", "--quick"]
    assert profile_tool.main(argv) == 0
    assert seen == [(3, argv)]


def test_device_cuda_without_a_gpu_is_an_argument_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(profile_tool.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profile_tool, "_launch", _no_launch)
    assert profile_tool.main(["--out", str(tmp_path / "p.json"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err

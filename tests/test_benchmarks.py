"""The benchmarks stay runnable: each one's --quick mode runs end to end (it checks our results against
torch's before timing, so a wrong kernel fails here too). Timings are not asserted: speed is judged by the
benchmarks' own side-by-side ratios, never by tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import runnable_cpu_isas

from cp_attention import kernel_variants as kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


QUICK_BENCHMARKS = ["bench_flash_fwd.py", "bench_a2a_pack.py", "bench_merge.py", "bench_host_overhead.py"]


@pytest.mark.parametrize("script", QUICK_BENCHMARKS)
def test_benchmark_quick_mode_runs(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--no-json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Every benchmark prints a table with a torch baseline column.
    assert "torch" in proc.stdout and "---" in proc.stdout, (
        f"{script} --quick printed no result table:\n{proc.stdout[-2000:]}")


def test_cp_benchmark_quick_mode_runs_under_torchrun():
    # Two gloo ranks: every mode runs, is checked against single-process attention, and is tabulated.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "benchmarks", "bench_cp.py"), "--quick", "--no-json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"bench_cp.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for mode in ("single-process", "allgather+sdpa", "ring", "ulysses"):
        assert mode in proc.stdout, f"bench_cp.py --quick printed no {mode} row:\n{proc.stdout[-2000:]}"


def test_cp_benchmark_train_quick_mode_runs_under_torchrun():
    # --train: forward and backward of every mode, output and q, k, v gradients checked, tabulated.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "benchmarks", "bench_cp.py"), "--quick", "--no-json", "--train"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (f"bench_cp.py --quick --train failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    assert "forward + backward" in proc.stdout and "ms/fwd+bwd" in proc.stdout, proc.stdout[-2000:]
    for mode in ("single-process", "allgather+sdpa", "ring", "ulysses"):
        assert mode in proc.stdout, f"bench_cp.py --train printed no {mode} row:\n{proc.stdout[-2000:]}"


# What the Python of the dry run below adds to the kernel probe's report: a line a GPU run prints when the
# TMA wgmma kernel hung, so that the skip travels through the script on the CPU too.
FAKE_PROBE_LINES = "SKIP_BENCH cuda_sm90 because cuda_sm90_tma (HANG) failed the probe\n"


def test_gpu_check_dry_run(tmp_path):
    # The GPU check's own plumbing (build info, the kernel probe and its skips, test selection, every
    # benchmark, the summary) on the CPU. The Python it runs is a wrapper that records the arguments of each
    # call and appends FAKE_PROBE_LINES to the probe's output.
    out_dir, calls = tmp_path / "out", tmp_path / "calls.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{calls}"\n'
        f'"{sys.executable}" "$@"\n'
        "rc=$?\n"
        f'case "$*" in *kernel_probe.py*) printf "{FAKE_PROBE_LINES}" ;; esac\n'
        'exit "$rc"\n')
    wrapper.chmod(0o755)
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--python", str(wrapper),
           "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (f"gpu_check.sh --dry-run failed:\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-2000:]}")
    assert "gpu_check: PASS" in proc.stdout
    summaries = list(out_dir.glob("gpu_check-dry-run-*.json"))
    assert summaries, "no summary JSON written"

    # The probe ran (the CPU op; the GPU variants are n/a on the CPU) and the summary shows it.
    probes = list(out_dir.glob("kernel_probe-*.json"))
    assert len(probes) == 1, f"expected one kernel probe JSON, found {probes}"
    verdicts = {r["variant"]: r["verdict"] for r in json.loads(probes[0].read_text())["rows"]}
    assert verdicts.pop("cpu") == "PASS" and set(verdicts.values()) == {"n/a"}, verdicts
    summary = json.loads(summaries[0].read_text())
    assert summary["probe"]["file"] == probes[0].name and summary["probe"]["failed"] == []
    assert "kernel probe (kernel_probe-" in proc.stdout and re.search(r"^cpu +- +PASS ", proc.stdout, re.M)

    # Its skip reaches the forward benchmark's arguments (and the log says why); every test shard runs
    # under a time limit per test (pytest-timeout) in a process of its own, without pytest-xdist.
    assert "benchmarks skip cuda_sm90 because cuda_sm90_tma (HANG) failed the probe" in proc.stdout
    seen = calls.read_text().splitlines()
    shard_calls = [c for c in seen if "--junitxml" in c]
    bench_calls = [c for c in seen if "bench_flash_fwd.py" in c]
    assert shard_calls and all("--timeout=120" in c and "xdist" not in c for c in shard_calls), shard_calls
    assert bench_calls and all("--skip-backends cuda_sm90" in c for c in bench_calls), bench_calls


def _kernel_probe(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import kernel_probe
    return kernel_probe


def test_kernel_probe_verdicts(monkeypatch):
    kp = _kernel_probe(monkeypatch)
    fault = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert kp.verdict_of(0, False, "") == "PASS"
    assert kp.verdict_of(3, False, "n/a: the sm_90 kernels need an sm_90 device") == "n/a"
    assert kp.verdict_of(1, False, "case x\n  WRONG: out err 0.5") == "FAIL"
    assert kp.verdict_of(4, False, fault) == "FAULT"
    assert kp.verdict_of(4, False, "RuntimeError: CUDA driver error: misaligned address") == "FAULT"
    assert kp.verdict_of(4, False, "ValueError: D must be <= 256") == "ERROR"
    assert kp.verdict_of(-11, False, "Fatal Python error: Segmentation fault") == "CRASH"
    assert kp.verdict_of(-6, False, fault) == "CRASH"
    assert kp.verdict_of(None, True, "case x") == "HANG"
    assert kp.verdict_of(-9, True, "") == "HANG"  # killed at the time limit: that is the hang


def test_kernel_probe_variants_follow_the_record(monkeypatch):
    # One probed variant per kernel name of cp_attention.kernel_variants, each run through its ops' variant
    # argument, and the table's "proven" column read from the record.
    kp = _kernel_probe(monkeypatch)
    assert kp.GPU_VARIANTS == ["cuda_mma", "cuda_sm90", "cuda_sm90_tma", "cuda_sm90_tma_no_pingpong",
                               "cuda_auto", "triton_pointer", "triton_tma", "triton_auto"]
    assert {n: kp.proven_label(n) for n in ("cuda_mma", "cuda_sm90_tma", "cuda_auto", "triton_pointer",
                                            "triton_auto", "cpu")} == {
        "cuda_mma": "yes", "cuda_sm90_tma": "no", "cuda_auto": "no", "triton_pointer": "yes",
        "triton_auto": "no", "cpu": "-"}
    monkeypatch.setitem(kv.PROVEN, ("cuda", "sm90_tma"), kv.Proof("a-later-run.json", "cuda_sm90_tma"))
    assert kp.proven_label("cuda_sm90_tma") == "yes" and kp.proven_label("cuda_auto") == "no"


def test_kernel_probe_skips(monkeypatch):
    # The benchmarks leave out each name that may run a failed variant: a backend (its kernel, and for a
    # choosing kernel each it may choose) or one of the forward benchmark's OP_VARIANTS.
    kp = _kernel_probe(monkeypatch)
    names = ["cuda", "cuda_sm90", "triton", "triton_tma", "cuda_sm90_cp", "cuda_tma_free"]
    passing = {name: "PASS" for name in kp.GPU_VARIANTS}
    assert kp.decide(passing, names) == {"skip_bench": [], "reasons": {}}
    assert kp.decision_lines(kp.decide(passing, names)) == []

    # The TMA wgmma kernel hangs: "cuda_sm90" (which runs it where the inputs allow) goes, the cp.async
    # kernel and mma.sync stay.
    d = kp.decide({**passing, "cuda_sm90_tma": "HANG"}, names)
    assert d["skip_bench"] == ["cuda_sm90"]
    assert kp.decision_lines(d) == ["SKIP_BENCH cuda_sm90 because cuda_sm90_tma (HANG) failed the probe"]
    # The chooser itself failing names it first.
    d = kp.decide({**passing, "cuda_auto": "FAULT", "cuda_sm90": "FAIL"}, names)
    assert d["skip_bench"] == ["cuda_sm90", "cuda_sm90_cp"]
    assert d["reasons"]["cuda_sm90"] == "cuda_auto (FAULT), cuda_sm90 (FAIL)"
    # mma.sync, the default, fails: "cuda" goes, and "cuda_sm90" too (it falls back on mma.sync).
    assert kp.decide({**passing, "cuda_mma": "CRASH"}, names)["skip_bench"] == ["cuda", "cuda_sm90"]
    assert kp.decide({**passing, "cuda_sm90_tma_no_pingpong": "HANG"}, names)["skip_bench"] == [
        "cuda_tma_free"]
    # Triton: a failed TMA tile takes "triton_tma" out, the pointer tiles both.
    assert kp.decide({**passing, "triton_tma": "FAULT"}, names)["skip_bench"] == ["triton_tma"]
    assert kp.decide({**passing, "triton_pointer": "FAIL"}, names)["skip_bench"] == ["triton", "triton_tma"]
    # n/a (a kernel this GPU or build does not have) is no failure.
    assert kp.decide({name: "n/a" for name in kp.GPU_VARIANTS}, names)["skip_bench"] == []


def test_summary_names_unproven_variants_that_passed(monkeypatch, capsys):
    # The GPU check's summary of a probe: its table with the record's column, what the benchmarks left
    # out, and the variants that passed but are not proven yet (what docs/gpu_check.md says to record).
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_check_summary

    def row(variant, proven, verdict):
        return {"variant": variant, "proven": proven, "verdict": verdict, "cases": "15/15", "out_err": 0.01,
                "lse_err": 0.001, "seconds": 3.0, "note": ""}

    probe = {"_file": "kernel_probe-cuda-x.json", "skip_bench": ["triton_tma"],
             "reasons": {"triton_tma": "triton_tma (HANG)"},
             "rows": [row("cuda_mma", "yes", "PASS"), row("cuda_sm90_tma", "no", "PASS"),
                      row("cuda_auto", "no", "PASS"), row("triton_tma", "no", "HANG")]}
    result = gpu_check_summary.probe_summary(probe)
    out = capsys.readouterr().out
    assert result["passed_unproven"] == ["cuda_sm90_tma", "cuda_auto"] and result["failed"] == ["triton_tma"]
    assert re.search(r"^cuda_sm90_tma +no +PASS ", out, re.M)
    assert "benchmarks skipped triton_tma: triton_tma (HANG) failed" in out
    assert "passed, not yet in the record: cuda_sm90_tma, cuda_auto" in out


def test_kernel_probe_reports_where_a_child_ended(monkeypatch, tmp_path):
    # The parent against a stand-in child that ends each way a kernel can: its verdict, its note, and a
    # hang that also left a grandchild holding the output pipe is still cut off at the time limit.
    kp = _kernel_probe(monkeypatch)
    case = "bf16-D64-B1-H4-1000x777"
    result = {"na": None, "cases": [{"case": case, "ok": False, "out_err": 0.5, "lse_err": 0.0,
                                     "seconds": 0.1, "problems": ["out: too far"]}]}
    child = tmp_path / "child.py"
    child.write_text(
        "import os, signal, subprocess, sys, time\n"
        "name = sys.argv[sys.argv.index('--one') + 1]\n"
        f"print('case {case}', flush=True)\n"
        "if name == 'hang':\n"
        "    subprocess.Popen(['sleep', '60'])\n"
        "    time.sleep(60)\n"
        "if name == 'crash':\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "if name == 'fault':\n"
        "    print('RuntimeError: CUDA error: an illegal memory access was encountered', flush=True)\n"
        "    sys.exit(4)\n"
        "if name == 'wrong':\n"
        f"    print('RESULT ' + {json.dumps(json.dumps(result))})\n"
        "    sys.exit(1)\n"
        "if name == 'na':\n"
        "    print('n/a: not on this GPU')\n"
        "    sys.exit(3)\n")
    monkeypatch.setattr(kp, "__file__", str(child))
    t0 = time.monotonic()
    rows = {name: kp.run_variant(name, "cpu", timeout=3.0, threads=1)
            for name in ("hang", "crash", "fault", "wrong", "na")}
    assert time.monotonic() - t0 < 40, "the hung child (or its grandchild) was not killed at its limit"
    assert {n: r["verdict"] for n, r in rows.items()} == {
        "hang": "HANG", "crash": "CRASH", "fault": "FAULT", "wrong": "FAIL", "na": "n/a"}
    assert rows["hang"]["note"] == f"no end in case {case}"
    assert rows["crash"]["note"] == f"signal 11 in case {case}"
    assert rows["fault"]["note"].startswith(f"CUDA error in case {case}: RuntimeError: CUDA error")
    assert rows["wrong"]["cases"] == "0/1" and rows["wrong"]["out_err"] == 0.5
    assert rows["wrong"]["note"] == f"wrong in {case}"
    assert rows["na"]["note"] == "not on this GPU"


def test_flash_bench_names_kernels_explicitly(monkeypatch):
    # Each timed name passes its kernel as an argument: the opt-in backends through flash_attn's backend,
    # "cuda_sm90_cp" and "cuda_tma_free" through the CUDA ops' variant argument. No environment variable is
    # set or read on the way.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_flash_fwd

    seen = []
    monkeypatch.setattr(bench_flash_fwd.ops, "flash_attn_fwd", lambda *a: seen.append(("op", a[-1])))
    monkeypatch.setattr(bench_flash_fwd.ops, "flash_attn_fwd_acc_", lambda *a: seen.append(("op_acc", a[-1])))
    monkeypatch.setattr(bench_flash_fwd.cp_attention, "flash_attn",
                        lambda *a, backend, **kw: seen.append(("api", backend)))
    monkeypatch.setattr(bench_flash_fwd.cp_attention, "flash_attn_acc_",
                        lambda *a, backend, **kw: seen.append(("api_acc", backend)))
    environ = dict(os.environ)
    names = ("cuda", "cuda_sm90", "triton_tma", "cuda_sm90_cp", "cuda_tma_free", "cpu_panels", "cpu_brgemm")
    for name in names:
        bench_flash_fwd.forward_fn(name, None, None, None, 0.1)()
        bench_flash_fwd.fused_fn(name, None, None, None, None, None, 0.1)()
    assert seen == [("api", "cuda"), ("api_acc", "cuda"), ("api", "cuda_sm90"), ("api_acc", "cuda_sm90"),
                    ("api", "triton_tma"), ("api_acc", "triton_tma"), ("op", "sm90"), ("op_acc", "sm90"),
                    ("op", "sm90_tma_no_pingpong"), ("op_acc", "sm90_tma_no_pingpong"), ("op", "panels"),
                    ("op_acc", "panels"), ("op", "brgemm"), ("op_acc", "brgemm")]
    assert dict(os.environ) == environ


def test_flash_bench_times_both_cpu_kernels_where_they_run(monkeypatch):
    # Our CPU backend ("default"), and beside it the two kernels it chooses between: the panel kernel
    # always, the brgemm kernel on the CPUs that run it (every ISA copy but the generic one).
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_flash_fwd

    import cp_attention

    names = bench_flash_fwd.default_backends(torch.device("cpu"))
    brgemm = cp_attention.build_info()["cpu_isa"] != "generic"
    assert names == ["cpu", "cpu_panels"] + (["cpu_brgemm"] if brgemm else [])


def test_measure_rows_stops_at_sigterm(monkeypatch):
    # SIGTERM (a step's time limit in gpu_check.sh) ends the measuring, not the process: the rows measured
    # before it are kept, none after, and the usual handler is back afterwards.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import _harness

    before = signal.getsignal(signal.SIGTERM)

    def produce(rows):
        rows.append({"shape": 1})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode, so this sleep is cut short
        rows.append({"shape": 2})

    t0 = time.monotonic()
    rows, cut_short = _harness.measure_rows("test", produce)
    assert (rows, cut_short) == ([{"shape": 1}], True) and time.monotonic() - t0 < 4
    assert signal.getsignal(signal.SIGTERM) is before
    assert _harness.measure_rows("test", lambda rows: rows.append(3)) == ([3], False)


def test_benchmark_cut_short_reports_what_it_measured(tmp_path):
    # A forward benchmark stopped by SIGTERM after its first shape prints and writes that row, marked
    # partial, and exits as `timeout` reports a stopped command; the GPU check's summary then names the
    # result partial and fails.
    out_dir = tmp_path / "out"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 1))
    script = os.path.join(ROOT, "benchmarks", "bench_flash_fwd.py")
    proc = subprocess.Popen([sys.executable, script, "--quick", "--out-dir", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.match(r"  \S+ B=\d+ H=\d+ D=\d+ S=\d+: ", line):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = "".join(seen) + rest
    assert proc.returncode == 124, text[-3000:]
    assert "bench_flash_fwd: stopped by SIGTERM (its time limit) with 1 rows measured" in text, text[-3000:]
    (result,) = out_dir.glob("flash_fwd-*.json")
    payload = json.loads(result.read_text())
    assert payload["partial"] is True and len(payload["rows"]) == 1, payload["rows"]

    summary = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check_summary.py"),
                              "--out-dir", str(out_dir), "--since", stamp, "--dry-run"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert summary.returncode == 1
    assert "partial results (a benchmark stopped at its time limit" in summary.stdout, summary.stdout
    assert "'flash_fwd'" in summary.stdout.split("partial results")[1]


def test_gpu_check_steps_keep_their_own_time_limits(tmp_path):
    # With one-second limits the probe's variant, the test shard and every benchmark are stopped at their
    # limits and say so; the steps after each still run, the summary last, and the check fails.
    env = {**os.environ, "GPU_CHECK_PROBE_S": "1", "GPU_CHECK_SHARD_S": "1", "GPU_CHECK_BENCH_S": "1"}
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--python", sys.executable,
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    out = proc.stdout
    assert re.search(r"^cpu +- +HANG ", out, re.M), out[-3000:]
    assert "shard cpu_sample stopped at its 1s limit" in out, out[-3000:]
    for script in ("bench_flash_fwd", "bench_merge", "bench_a2a_pack"):
        assert re.search(rf"FAILED \(exit 124\): timeout -k 10 1 \S+ benchmarks/{script}\.py", out), script
    assert out.index("=== benchmarks") < out.index("=== summary") and "gpu_check: FAIL" in out

    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**env, "GPU_CHECK_BENCH_S": "3m"})
    assert bad.returncode == 2 and "GPU_CHECK_BENCH_S must be a whole number of seconds" in bad.stderr


def test_flash_bwd_benchmark_quick_mode_runs():
    # As test_benchmark_quick_mode_runs, for the backward benchmark: gradients checked against torch's
    # before timing, fwd+bwd and bwd-only timings tabulated beside torch's, and each backward's peak memory.
    script = os.path.join(ROOT, "benchmarks", "bench_flash_bwd.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--no-json"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (
        f"bench_flash_bwd.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for column in ("torch f+b ms", "torch bwd ms", "ours bwd peak MB", "---"):
        assert column in proc.stdout, f"no {column!r} in bench_flash_bwd.py --quick:\n{proc.stdout[-2000:]}"


def test_cpu_isa_stand_in_holds_both_sides(tmp_path):
    # --cpu-isa avx2 reruns the benchmark with torch and oneDNN held to AVX2 and our dispatch to the avx2
    # copy, and records it: the JSON names the stand-in, our copy and the AVX2 peak (no AMX figure).
    if "avx2" not in runnable_cpu_isas():
        pytest.skip("no avx2 copy, or a CPU without AVX2")
    script = os.path.join(ROOT, "benchmarks", "bench_flash_fwd.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--no-acc", "--cpu-isa", "avx2", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (result,) = tmp_path.glob("flash_fwd-*.json")
    env = json.loads(result.read_text())["environment"]
    assert env["stand_in_cpu_isa"] == "avx2"
    assert env["build_info"]["cpu_isa"] == "avx2"
    peak = env["cpu_peak_gflops"]
    assert peak["isa"] == "avx2" and peak["bfloat16"] == peak["float32"], peak

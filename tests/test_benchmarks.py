"""The benchmarks stay runnable: each one's --quick mode runs end to end (it checks our results against
torch's before timing, so a wrong kernel fails here too). Timings are not asserted: speed is judged by the
benchmarks' own side-by-side ratios, never by tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_gpu_check_dry_run(tmp_path):
    # The GPU check's own plumbing (build info, test selection, every benchmark, the summary) on the CPU.
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--python", sys.executable,
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (f"gpu_check.sh --dry-run failed:\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-2000:]}")
    assert "gpu_check: PASS" in proc.stdout
    assert list(tmp_path.glob("gpu_check-dry-run-*.json")), "no summary JSON written"


def test_flash_bench_variant_sets_and_restores_kernel_choice(monkeypatch):
    # "cuda_mma" and "cuda_sm90" (and their fused steps) run the CUDA op with that kernel forced; other names
    # run as they are, and the caller's setting survives either.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_flash_fwd

    key = "CP_ATTENTION_CUDA_FWD_KERNEL"
    for before in (None, "auto"):
        if before is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, before)
        for name, kernel in (("cuda_mma", "mma"), ("cuda_mma_acc", "mma"), ("cuda_sm90", "sm90"),
                             ("cuda_sm90_acc", "sm90")):
            with bench_flash_fwd._context(name)():
                assert os.environ[key] == kernel
            assert os.environ.get(key) == before
        with bench_flash_fwd._context("cuda")():
            assert os.environ.get(key) == before

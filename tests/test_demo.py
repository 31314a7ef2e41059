"""`make demo` and `make demo-step` stay runnable: the pipeline demo (cp_attention.pipeline_demo) and the
transformer-step demo (cp_attention.demo) end to end in tiny configurations (they launch torchrun
themselves), and their argument checks. Timings are printed, never asserted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "1", "--single-layers", "1", "--heads", "4", "--head-dim", "16", "--height", "64",
        "--width", "64", "--text-tokens", "8", "--warmup", "0", "--iters", "1"]


PIPELINE_TINY = ["--height", "64", "--width", "64", "--steps", "2", "--heads", "4", "--head-dim", "16"]


def _demo(*args, timeout=300, module="cp_attention.demo"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _table_rows(stdout: str) -> list[str]:
    return [r for r in stdout.splitlines()
            if r.startswith("| ") and not r.startswith(("| mode", "| pipeline"))]


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_demo_tiny_passes_and_writes_images(world, tmp_path):
    pytest.importorskip("transformers")
    proc = _demo("--world-size", str(world), "--out-dir", str(tmp_path), *PIPELINE_TINY,
                 module="cp_attention.pipeline_demo")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pipeline demo failed (exit {proc.returncode}):\n{out[-4000:]}"
    assert proc.stdout.rstrip().endswith("PASS"), out[-3000:]
    from cp_attention.pipeline_demo import FLUX_MODES, QWEN_MODES

    rows = _table_rows(proc.stdout)
    expected = [("flux", "single")] + [("flux", m) for m, _ in FLUX_MODES[world]] + \
        [("qwen", "single")] + [("qwen", m) for m, _ in QWEN_MODES[world]]
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in rows] == expected, proc.stdout[-3000:]
    assert all(r.rstrip().endswith("| ok |") for r in rows), proc.stdout[-3000:]
    from PIL import Image

    for name, modes in (("flux", FLUX_MODES[world]), ("qwen", QWEN_MODES[world])):
        with Image.open(tmp_path / f"{name}.png") as img:  # a row per prompt, a column per mode
            assert img.size == (64 * (1 + len(modes)), 64 * 2)


@pytest.mark.parametrize("args,message", [
    (["--height", "72"], "positive multiples of 16"),
    (["--pipelines", "flux,sd3"], "--pipelines must name flux and/or qwen"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--world-size", "3"], "invalid choice"),
])
def test_pipeline_demo_rejects_bad_arguments_before_launching(args, message, capsys, monkeypatch):
    from cp_attention import pipeline_demo

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(pipeline_demo, "_launch",
                        lambda *a: pytest.fail("launched torchrun despite bad arguments"))
    try:
        code = pipeline_demo.main(args)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_demo_tiny_on_two_ranks_passes():
    proc = _demo("--world-size", "2", *TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"demo failed (exit {proc.returncode}):\n{out[-4000:]}"
    assert proc.stdout.rstrip().endswith("PASS"), out[-3000:]
    for row in ("| single         | native", "| single         | cp_attention", "| ring ", "| ulysses ",
                "| native-ulysses "):
        assert row in proc.stdout, f"missing table row {row!r}:\n{proc.stdout[-3000:]}"
    assert "[demo] ring (cp_attention attention" in proc.stdout  # progress lines


def test_demo_train_tiny_on_four_ranks_passes():
    # One training step per mode; four ranks, so that Unified (2 x 2) runs too.
    proc = _demo("--train", "--world-size", "4", *TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"demo --train failed (exit {proc.returncode}):\n{out[-4000:]}"
    assert proc.stdout.rstrip().endswith("PASS"), out[-3000:]
    assert "training step (forward + backward)" in proc.stdout
    assert "| grad err vs single | grad err vs fp64 | worst err/tol |" in proc.stdout, proc.stdout[-3000:]
    for row in ("| single         | native", "| single         | cp_attention", "| ring ", "| ulysses ",
                "| unified ", "| native-ulysses "):
        assert row in proc.stdout, f"missing table row {row!r}:\n{proc.stdout[-3000:]}"
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ") and not r.startswith("| mode")]
    assert len(rows) == 6 and all(line.rstrip().endswith("| ok |") for line in rows), proc.stdout[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--height", "112", "--width", "80"], "must both divide by the world size 4"),
    (["--modes", "ring,bogus"], "unknown mode"),
    (["--unified", "3x2"], "does not multiply to the world size 4"),
])
def test_demo_rejects_bad_arguments_before_launching(args, message, capsys, monkeypatch):
    from cp_attention import demo

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(demo, "_launch", lambda *a: pytest.fail("launched torchrun despite bad arguments"))
    assert demo.main(args) == 2
    assert message in capsys.readouterr().err


def test_demo_help_lists_options(capsys):
    from cp_attention import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--layers", "--heads", "--height", "--width", "--world-size", "--modes", "--unified",
                   "--train"):
        assert option in out

"""Plots the forward-kernel results stored in benchmarks/results/ as one PNG (the figure in README.md).

    .venv/bin/python benchmarks/plot_results.py                      # writes docs/img/results.png
    .venv/bin/python benchmarks/plot_results.py --out /tmp/r.png --results-dir benchmarks/results

Left: bf16 forward TFLOP/s on the newest GPU run of bench_flash_fwd.py (flash_fwd-nvidia-*.json), ours
(CUDA, Triton) beside torch's SDPA kernels (cuDNN, flash, memory-efficient), per head dim and sequence
length. Right: the newest CPU run (flash_fwd-amd-*.json or any other CPU flash_fwd file), our CPU kernel's
speed as a multiple of torch's fastest CPU flash kernel on each shape, float32 and bfloat16.

Only figures that are in the JSON files are drawn. matplotlib is not a dependency of cp_attention: install it
into the environment that runs this script (`.venv/bin/pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
DEFAULT_OUT = HERE.parent / "docs" / "img" / "results.png"

# GPU series: (row key prefix, label, colour). Rows hold "<prefix>_gflops".
GPU_SERIES = (
    ("cuda", "ours: CUDA", "#1f77b4"),
    ("triton", "ours: Triton", "#2ca02c"),
    ("sdpa_cudnn", "torch: cuDNN", "#7f7f7f"),
    ("sdpa_flash", "torch: flash", "#bcbcbc"),
    ("sdpa_efficient", "torch: mem-efficient", "#e0e0e0"),
)


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_results.py: matplotlib is not installed in this environment; it is not a dependency "
                 "of cp_attention. Install it with `.venv/bin/pip install matplotlib` and run this again.")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def newest(results_dir: Path, pattern: str, device: str | None = None) -> tuple[Path, dict] | None:
    """The newest result file matching `pattern` (by its recorded UTC date), optionally on one device type;
    stand-in runs (`--cpu-isa`) are left out."""
    found = []
    for path in results_dir.glob(pattern):
        if path.name.endswith(".tmp.json"):
            continue  # --quick runs
        data = json.loads(path.read_text())
        env = data.get("environment", {})
        if device is not None and env.get("device") != device:
            continue
        if env.get("stand_in_cpu_isa"):
            continue  # a --cpu-isa run: this CPU held to a narrower ISA, not a measurement of the machine
        found.append((env.get("date_utc", ""), path.name, path, data))
    if not found:
        return None
    _, _, path, data = max(found)
    return path, data


def label_of(env: dict) -> str:
    versions = env.get("versions", {})
    date = env.get("date_utc", "")[:10]
    name = env.get("device_name", env.get("device", "?"))
    if env.get("device") == "cpu":
        name = f"{env.get('cpu_count', '?')}-core {name}"
    return f"{name}, {date}, torch {versions.get('torch', '?')}"


def plot_gpu(ax, path: Path, data: dict) -> None:
    rows = [r for r in data["rows"] if r.get("dtype") == "bf16"]
    rows.sort(key=lambda r: (r["D"], r["S"]))
    series = [s for s in GPU_SERIES if any(f"{s[0]}_gflops" in r for r in rows)]
    width = 0.8 / max(1, len(series))
    for i, (key, label, colour) in enumerate(series):
        xs, ys = [], []
        for j, r in enumerate(rows):
            if r.get(f"{key}_gflops") is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r[f"{key}_gflops"] / 1000.0)
        bars = ax.bar(xs, ys, width, label=label, color=colour, edgecolor="#404040", linewidth=0.5)
        if key in ("cuda", "triton"):
            ax.bar_label(bars, fmt="%.0f", fontsize=6.5, padding=2, rotation=90)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"D {r['D']}\nS {r['S'] // 1024}k" for r in rows], fontsize=8)
    ax.set_ylabel("forward TFLOP/s (bf16)")
    ax.set_title(f"GPU forward: {label_of(data['environment'])}\nB x S = 16k tokens, H = 16 ({path.name})",
                 fontsize=8.5)
    ax.legend(fontsize=7.5, ncol=2, loc="upper left", frameon=False)
    ax.set_ylim(0, max(r.get("sdpa_cudnn_gflops", 0) for r in rows) / 1000.0 * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def cpu_ratio(row: dict) -> float | None:
    # Newer files name the backend in the key ("ratio_cpu_best_torch"); the first run had one backend.
    for key in ("ratio_cpu_best_torch", "ratio_best_torch"):
        if row.get(key) is not None:
            return row[key]
    return None


def plot_cpu(ax, path: Path, data: dict) -> None:
    colours = {"fp32": "#ff7f0e", "bf16": "#1f77b4"}
    dtypes = [d for d in ("fp32", "bf16") if any(r.get("dtype") == d for r in data["rows"])]
    shapes = []
    for r in data["rows"]:
        shape = (r["H"], r["D"], r["S"])
        if shape not in shapes:
            shapes.append(shape)
    width = 0.8 / max(1, len(dtypes))
    for i, dt in enumerate(dtypes):
        by_shape = {(r["H"], r["D"], r["S"]): cpu_ratio(r) for r in data["rows"] if r.get("dtype") == dt}
        xs = [j - 0.4 + width * (i + 0.5) for j, s in enumerate(shapes) if by_shape.get(s) is not None]
        ys = [by_shape[s] for s in shapes if by_shape.get(s) is not None]
        # Bars grow from 1.0 (parity), up where ours is faster, down where it is slower.
        ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=dt, color=colours.get(dt),
               edgecolor="#404040", linewidth=0.5)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{h}x{d}\nS {s // 1024}k" if s >= 1024 else f"{h}x{d}\nS {s}" for h, d, s in shapes],
                       fontsize=7)
    ax.set_ylabel("ours / fastest torch CPU flash (x)")
    ax.set_title(f"CPU forward: {label_of(data['environment'])}\nB = 1, H x D per shape; above 1: ours "
                 f"faster ({path.name})", fontsize=8.5)
    ax.legend(fontsize=7.5, loc="upper right", frameon=False)
    ax.set_ylim(0.5, 1.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the JSON results are")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PNG to write")
    p.add_argument("--dpi", type=int, default=130)
    args = p.parse_args(argv)

    gpu = newest(args.results_dir, "flash_fwd-*.json", device="cuda")
    cpu = newest(args.results_dir, "flash_fwd-*.json", device="cpu")
    if gpu is None and cpu is None:
        sys.exit(f"plot_results.py: no flash_fwd-*.json results in {args.results_dir}")
    plt = import_pyplot()
    panels = [x for x in ((plot_gpu, gpu), (plot_cpu, cpu)) if x[1] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (plot, (path, data)) in zip(axes[0], panels):
        plot(ax, path, data)
        print(f"plot_results.py: {path.name}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"plot_results.py: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

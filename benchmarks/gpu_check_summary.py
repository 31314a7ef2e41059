"""The last part of benchmarks/gpu_check.sh: reads the test report and the benchmark JSON files of one run,
prints a short table of what was measured (and which targets were met), and writes it as one JSON file."""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table  # noqa: E402


def newest(out_dir: Path, prefix: str, since: str) -> dict | None:
    """The newest result `prefix-*.json` (or .tmp.json) written at or after the run's start stamp."""
    found = []
    for path in out_dir.glob(f"{prefix}-*.json"):
        stamp = path.name.split("-")[-1].split(".")[0]
        if stamp >= since:
            found.append((stamp, path))
    if not found:
        return None
    path = max(found)[1]
    data = json.loads(path.read_text())
    data["_file"] = path.name
    return data


def test_counts(junit: Path) -> dict:
    if not junit.exists():
        return {"error": f"no test report at {junit.name}"}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: int(suite.get(k, 0)) for k in keys}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["time_s"] = float(suite.get("time", 0.0))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--since", required=True, help="UTC stamp of the run's start, YYYYmmddTHHMMSSZ")
    p.add_argument("--junit", required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    out_dir = Path(args.out_dir)

    tests = test_counts(Path(args.junit))
    print(f"tests: {tests}")
    flash = newest(out_dir, "flash_fwd", args.since)
    merge = newest(out_dir, "merge", args.since)
    pack = newest(out_dir, "a2a_pack", args.since)
    result = {"dry_run": args.dry_run, "tests": tests, "files": {}, "targets": {}}

    if flash:
        result["files"]["flash_fwd"] = flash["_file"]
        backends, bases = flash["backends"], flash["baselines"]
        unit, rate = ("TFLOP/s", 1e3) if flash["environment"]["device"].startswith("cuda") else ("GFLOP/s", 1)
        rows = []
        for r in flash["rows"]:
            row = {"dtype": r["dtype"], "B": r["B"], "D": r["D"], "S": r["S"]}
            for name in backends + [f"{b}_acc" for b in backends] + bases:
                if f"{name}_gflops" in r:
                    row[name] = r[f"{name}_gflops"] / rate
            rows.append(row)
        print(f"\nforward {unit} (fused step = {'/'.join(backends)}_acc)")
        names = [n for n in backends + [f"{b}_acc" for b in backends] + bases if any(n in r for r in rows)]
        print_table(rows, [("dtype", "dtype", ""), ("B", "B", "d"), ("D", "D", "d"), ("S", "S", "d")]
                    + [(n, n, ".1f") for n in names])
        for dtype, entry in flash.get("summary", {}).items():
            for name, met in entry.get("targets", {}).items():
                result["targets"][f"{dtype} {name}"] = met
    if merge:
        result["files"]["merge"] = merge["_file"]
        print("\nmerge GB/s")
        cols = [("dtype", "dtype", ""), ("shape", "shape", "")]
        for b in merge["backends"]:
            cols += [(f"{b}", f"{b}_gbps", ".0f"), (f"{b} in place", f"{b}_inplace_gbps", ".0f"),
                     (f"{b} % copy", f"{b}_inplace_pct_copy", ".0f")]
        print_table(merge["rows"], cols + [("torch", "torch_gbps", ".0f"), ("copy", "copy_gbps", ".0f")])
        for b in merge["backends"]:
            big = [r for r in merge["rows"] if r["MB"] >= 10]
            if big:
                result["targets"][f"merge {b} >= 80% of copy bandwidth (>= 10 MB)"] = min(
                    r[f"{b}_inplace_pct_copy"] for r in big) >= 80
    if pack:
        result["files"]["a2a_pack"] = pack["_file"]
        print("\nUlysses pack/unpack vs permute+contiguous (speedup, geomean): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in pack.get("summary", {}).items()))
    print("\ntargets" + (" (dry run: CPU figures, GPU targets do not apply)" if args.dry_run else ""))
    for name, met in result["targets"].items():
        print(f"  {'met    ' if met else 'NOT MET'}  {name}")
    missing = [n for n, d in (("flash_fwd", flash), ("merge", merge), ("a2a_pack", pack)) if d is None]
    if missing:
        print(f"missing benchmark results: {missing}")
    device = flash["environment"]["device"] if flash else "cpu"
    result["environment"] = environment(device if not args.dry_run else "cpu")
    stamp = args.since
    name = f"gpu_check-{'dry-run-' if args.dry_run else ''}{stamp}{'.tmp' if args.dry_run else ''}.json"
    (out_dir / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / name}")
    bad_tests = ("error" in tests or tests.get("failures", 0) or tests.get("errors", 0)
                 or not tests.get("tests"))
    sys.exit(1 if bad_tests or missing else 0)


if __name__ == "__main__":
    main()

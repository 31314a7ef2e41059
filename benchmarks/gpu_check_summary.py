"""The last part of benchmarks/gpu_check.sh: reads the kernel probe's, the tests' and the benchmarks' results
of one run, prints a short table of what was found and measured (and which targets were met), and writes it
as one JSON file."""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table  # noqa: E402
from kernel_probe import FAILED as PROBE_FAILED  # noqa: E402
from kernel_probe import TABLE_COLUMNS, _fmt_err  # noqa: E402


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


def shard_counts(specs: list[str]) -> dict:
    """Counts per test shard and in total, from `NAME=REPORT.xml:EXIT` specs. A shard that exited 2 (pytest
    interrupted: its time limit) or by a signal ran only part of its tests; `complete` says so."""
    shards, total = {}, {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0}
    complete = True
    for spec in specs:
        name, _, rest = spec.partition("=")
        path, _, rc = rest.rpartition(":")
        counts = test_counts(Path(path))
        counts["exit"] = int(rc)
        counts["complete"] = "error" not in counts and counts["exit"] in (0, 1, 5)
        complete &= counts["complete"]
        for k in total:
            total[k] += counts.get(k, 0)
        shards[name] = counts
    return {**total, "complete": complete, "shards": shards}


def probe_summary(probe: dict) -> dict:
    """The kernel probe's verdicts per variant (benchmarks/kernel_probe.py), printed as a table, the
    benchmarks left out because of them, and the unproven variants that passed: candidates for the record
    of cp_attention/kernel_variants.py once the tests agree (docs/gpu_check.md)."""
    keys = [key for _, key, _ in TABLE_COLUMNS]
    rows = [{k: r.get(k) for k in keys} for r in probe["rows"]]
    print(f"kernel probe ({probe['_file']})")
    print_table([{**r, "out_err": _fmt_err(r["out_err"]), "lse_err": _fmt_err(r["lse_err"])} for r in rows],
                TABLE_COLUMNS)
    skip, reasons = probe.get("skip_bench", []), probe.get("reasons", {})
    for name in skip:
        print(f"  benchmarks skipped {name}: {reasons.get(name, '')} failed")
    passed_unproven = [r["variant"] for r in rows if r["verdict"] == "PASS" and r.get("proven") == "no"]
    if passed_unproven:
        print(f"  passed, not yet in the record: {', '.join(passed_unproven)}")
    failed = [r["variant"] for r in rows if r["verdict"] in PROBE_FAILED]
    return {"file": probe["_file"], "rows": rows, "skip_bench": skip, "failed": failed,
            "passed_unproven": passed_unproven}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--since", required=True, help="UTC stamp of the run's start, YYYYmmddTHHMMSSZ")
    p.add_argument("--junit", action="append", default=[], metavar="NAME=REPORT.xml:EXIT",
                   help="one test shard's JUnit report and pytest exit status (repeatable)")
    p.add_argument("--log", default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    out_dir = Path(args.out_dir)

    probe = newest(out_dir, "kernel_probe", args.since)
    probe_result = probe_summary(probe) if probe else None
    if probe is None:
        print("kernel probe: no result")
    print()
    tests = shard_counts(args.junit)
    print("tests: " + ", ".join(f"{k} {tests[k]}" for k in ("passed", "failures", "errors", "skipped"))
          + ("" if tests["complete"] else " (INCOMPLETE: a shard hit its time limit or wrote no report)"))
    for name, c in tests["shards"].items():
        print(f"  {name}: " + (c["error"] if "error" in c else
                               f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
                               f"{c['skipped']} skipped in {c['time_s']:.0f} s") + f" (exit {c['exit']})")
    flash = newest(out_dir, "flash_fwd", args.since)
    merge = newest(out_dir, "merge", args.since)
    pack = newest(out_dir, "a2a_pack", args.since)
    result = {"dry_run": args.dry_run, "probe": probe_result, "tests": tests, "files": {}, "targets": {}}
    if probe:
        result["files"]["kernel_probe"] = probe["_file"]

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
        tuned = flash.get("triton_tuned_configs", {})
        if tuned:
            print("\nTriton autotuning: per key, the chosen tile and the fastest pointer / TMA trial (ms)")
        for key, entry in tuned.items():
            trials = entry.get("trials_ms", {}) if isinstance(entry, dict) else {}
            best = {kind: min((t for c, t in trials.items() if ("TMA: True" in c) == is_tma), default=None)
                    for kind, is_tma in (("pointer", False), ("TMA", True))}
            chosen = entry["chosen"] if isinstance(entry, dict) else entry
            print(f"  {key}: {chosen} | " + ", ".join(f"{k} {v}" for k, v in best.items()))
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
    missing = [n for n, d in (("kernel_probe", probe), ("flash_fwd", flash), ("merge", merge),
                              ("a2a_pack", pack)) if d is None]
    if missing:
        print(f"missing results: {missing}")
    # A benchmark stopped at its time limit writes the rows it measured, marked partial: the targets above
    # were judged on those rows only.
    partial = [n for n, d in (("flash_fwd", flash), ("merge", merge), ("a2a_pack", pack))
               if d and d.get("partial")]
    if partial:
        print(f"partial results (a benchmark stopped at its time limit; targets judged on what it measured): "
              f"{partial}")
    result["partial"] = partial
    device = flash["environment"]["device"] if flash else "cpu"
    result["environment"] = environment(device if not args.dry_run else "cpu")
    stamp = args.since
    name = f"gpu_check-{'dry-run-' if args.dry_run else ''}{stamp}{'.tmp' if args.dry_run else ''}.json"
    (out_dir / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / name}")
    bad_tests = not tests["complete"] or tests["failures"] or tests["errors"] or not tests["tests"]
    if probe_result and probe_result["failed"]:
        print(f"kernel probe FAILED: {', '.join(probe_result['failed'])}")
    bad_probe = bool(probe_result and probe_result["failed"])
    sys.exit(1 if bad_tests or bad_probe or missing or partial else 0)


if __name__ == "__main__":
    main()

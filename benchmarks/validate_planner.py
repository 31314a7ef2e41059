"""Checks the planner's cost model against measured context-parallel attention: for every ring, Ulysses and
Unified row of bench_cp.py results, the time that cp_attention.planner.cost.estimate predicts on a hardware
profile beside the time bench_cp.py measured, their ratio, and per problem whether the predicted ranking of
the modes is the measured one.

    python -m cp_attention.profile --world-size 4 --out profile.json
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_cp.py --out-dir /tmp/run1   # twice, for noise
    python benchmarks/validate_planner.py --profile profile.json --measured /tmp/run1/cp-ws4-*.json \\
        /tmp/run2/cp-ws4-*.json

Each measured row (mode ring, ulysses or unified; the "+exchange" variants are skipped, as the model has no
length exchange) becomes Workload(seq_len=S, heads=H, head_dim=D, kv_heads=H, batch=B, causal=False,
dtype, train=the run's --train) on one replica (data = 1) of mesh "RxU", placement "ulysses-inner"
(ContextParallel's mesh). The predicted time is the busiest rank's compute_ms + comm_ms (see the cost
module's docstring); bench_cp.py's ms is the slowest rank's median call.

Printed per measured file: a table of predicted against measured ms, the predicted compute and
communication terms beside a measured split of the same kind (compute: the run's single-process time scaled
to one rank's share, `single_scaled` below; the rest: measured - compute), the ranking of the modes per
problem (predicted and measured, the pairs in a different order, Kendall's tau), and the summary: the
largest |predicted / measured - 1| and how many rows lie within --tolerance. With several measured files
(repeated runs) also the run-to-run spread of each mode, and which measured pairs of modes the spread
resolves (their ranges over the runs do not overlap; also shown: whether every run orders them alike, a
weaker test that 2 / 2**runs of coin flips pass): a pair it does not resolve has no measured order to
predict.

single_scaled = single-process ms * c / P: one rank's 1/P of the work at the single-process speed, times
c = max(1, P / cpu_count) on a CPU where P ranks share fewer cores (bench_cp.py gives each rank
cores // P threads, at least 1), c = 1 elsewhere. It stands for a kernel that runs as fast on a rank's part
as on the whole problem; the difference to the predicted compute_ms is the profile's kernel rate (and
tile-fill model) against the bench's.

The JSON (benchmarks/results/planner-validation-<device>-<UTC time>.json, through _harness.write_json) holds
the environment (device, versions, commit), the profile's path and contents, each measured file's path and
environment, the rows, the rankings, the summary and the noise table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO_ROOT, print_table, write_json  # noqa: E402

from cp_attention.planner.cost import Workload, estimate  # noqa: E402
from cp_attention.planner.profiles import get_profile  # noqa: E402

MODES = ("ring", "ulysses", "unified")
PLACEMENT = "ulysses-inner"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", required=True,
                   help="hardware profile: a .json written by python -m cp_attention.profile (or a built-in "
                        "profile's name)")
    p.add_argument("--measured", required=True, nargs="+",
                   help="bench_cp.py result JSON(s); several files are repeated runs (their spread is the "
                        "noise)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="a prediction within this fraction of the measured time counts as a hit")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default: benchmarks/results)")
    p.add_argument("--no-json", action="store_true", help="print only, write no result file")
    return p.parse_args(argv)


def _shown_path(path: str) -> str:
    """The path relative to the repository where it lies inside it, else the file's name alone (a result
    should not record this machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return Path(path).name


def _mesh(text: str) -> tuple[int, int]:
    r, u = text.lower().split("x")
    return int(r), int(u)


def _core_factor(measured: dict, world: int) -> float:
    env = measured.get("environment", {})
    cores = env.get("cpu_count")
    if str(env.get("device", "cpu")).startswith("cpu") and cores:
        return max(1.0, world / cores)
    return 1.0


def _train(measured: dict, row: dict) -> bool:
    args = measured.get("args") or {}
    return bool(row.get("train", args.get("train", False)))


def predict_run(measured: dict, profile, run: int) -> list[dict]:
    """The validation rows of one bench_cp.py result: its ring / ulysses / unified rows with predictions."""
    rows = []
    single = {r["problem"]: r["ms"] for r in measured["rows"] if r["mode"] == "single-process"}
    for m in measured["rows"]:
        if m["mode"] not in MODES:
            continue
        R, U = _mesh(m["mesh"])
        world = int(m.get("world_size", R * U))
        if R * U != world:
            raise SystemExit(f"row {m['problem']} {m['mode']}: mesh {m['mesh']} is not the world size "
                             f"{world}")
        train = _train(measured, m)
        w = Workload(seq_len=int(m["S"]), heads=int(m["H"]), head_dim=int(m["D"]), kv_heads=int(m["H"]),
                     batch=int(m["B"]), causal=False, dtype=str(m["dtype"]), train=train)
        p = estimate(w, profile, 1, R, U, PLACEMENT)
        scaled = single[m["problem"]] * _core_factor(measured, world) / world if m["problem"] in single \
            else None
        rows.append({
            "run": run, "problem": m["problem"], "B": m["B"], "S": m["S"], "H": m["H"], "D": m["D"],
            "dtype": m["dtype"], "train": train, "world_size": world, "mode": m["mode"], "mesh": m["mesh"],
            "predicted_ms": p.time_ms, "compute_ms": p.compute_ms, "comm_ms": p.comm_ms,
            "a2a_ms": p.details["a2a_ms"], "ring_exposed_ms": p.details["ring_exposed_ms"],
            "ring_hop_ms": p.details["ring_hop_ms"], "step_ms": p.details["step_ms"],
            "measured_ms": m["ms"], "ratio": p.time_ms / m["ms"],
            "single_process_ms": single.get(m["problem"]), "single_scaled_ms": scaled,
            "measured_rest_ms": None if scaled is None else m["ms"] - scaled,
            "compute_vs_single_scaled": None if scaled is None else p.compute_ms / scaled,
        })
    return rows


def rank_order(times: dict[str, float]) -> list[str]:
    return sorted(times, key=lambda k: (times[k], k))


def swapped_pairs(a: list[str], b: list[str]) -> tuple[int, int]:
    """(pairs ordered differently, pairs) of two orders of the same items."""
    pos = {k: i for i, k in enumerate(b)}
    pairs = list(itertools.combinations(a, 2))
    return sum(pos[x] > pos[y] for x, y in pairs), len(pairs)


def rankings(rows: list[dict]) -> list[dict]:
    out = []
    for (run, problem), group in itertools.groupby(sorted(rows, key=lambda r: (r["run"], r["problem"])),
                                                   key=lambda r: (r["run"], r["problem"])):
        group = list(group)
        pred = rank_order({r["mode"]: r["predicted_ms"] for r in group})
        meas = rank_order({r["mode"]: r["measured_ms"] for r in group})
        swaps, pairs = swapped_pairs(pred, meas)
        fastest = {r["mode"]: r["measured_ms"] for r in group}
        out.append({"run": run, "problem": problem, "predicted": pred, "measured": meas, "same": pred == meas,
                    "swapped_pairs": swaps, "pairs": pairs,
                    "kendall_tau": 1 - 2 * swaps / pairs if pairs else float("nan"),
                    # How far apart the measured modes are: slowest / fastest - 1.
                    "measured_spread": max(fastest.values()) / min(fastest.values()) - 1})
    return out


def noise(rows: list[dict], runs: int) -> tuple[list[dict], list[dict]]:
    """Per (problem, mode): measured ms of every run and their spread; per problem and pair of modes: whether
    the runs resolve their order (the ranges over the runs do not overlap) and whether each run's prediction
    of that pair holds."""
    by = {}
    for r in rows:
        by.setdefault((r["problem"], r["mode"]), {})[r["run"]] = r
    spread = []
    for (problem, mode), per_run in by.items():
        ms = [per_run[i]["measured_ms"] for i in sorted(per_run)]
        spread.append({"problem": problem, "mode": mode, "mesh": next(iter(per_run.values()))["mesh"],
                       "measured_ms": ms, "min_ms": min(ms), "max_ms": max(ms),
                       "mean_ms": statistics.fmean(ms),
                       "run_spread": max(ms) / min(ms) - 1,
                       "predicted_ms": next(iter(per_run.values()))["predicted_ms"]})
    pairs = []
    for problem in sorted({p for p, _ in by}):
        modes = [m for m in MODES if (problem, m) in by]
        for a, b in itertools.combinations(modes, 2):
            ra, rb = by[(problem, a)], by[(problem, b)]
            ma, mb = [r["measured_ms"] for r in ra.values()], [r["measured_ms"] for r in rb.values()]
            resolved = max(ma) < min(mb) or max(mb) < min(ma)
            # Paired: the same order in every run (weaker: 2 / 2**runs by chance).
            signs = {ra[i]["measured_ms"] < rb[i]["measured_ms"] for i in ra if i in rb}
            faster_measured = a if statistics.fmean(ma) < statistics.fmean(mb) else b
            pa, pb = next(iter(ra.values()))["predicted_ms"], next(iter(rb.values()))["predicted_ms"]
            faster_predicted = a if pa < pb else b
            gap = abs(statistics.fmean(ma) - statistics.fmean(mb)) / min(statistics.fmean(ma),
                                                                          statistics.fmean(mb))
            pairs.append({"problem": problem, "pair": f"{a} / {b}", "runs": runs,
                          "measured_faster": faster_measured, "predicted_faster": faster_predicted,
                          "mean_gap": gap, "resolved_by_runs": resolved,
                          "same_order_every_run": len(signs) == 1,
                          "prediction_holds": faster_measured == faster_predicted,
                          "predicted_gap": abs(pa - pb) / min(pa, pb)})
    return spread, pairs


def summary(rows: list[dict], tol: float) -> dict:
    dev = [abs(r["ratio"] - 1) for r in rows]
    return {"rows": len(rows), "within_tolerance": sum(d <= tol for d in dev), "tolerance": tol,
            "max_abs_ratio_minus_1": max(dev) if dev else float("nan"),
            "geomean_ratio": math.exp(statistics.fmean(math.log(r["ratio"]) for r in rows)) if rows
            else float("nan")}


def _summary_line(s: dict, ranks: list[dict]) -> str:
    return (f"{s['within_tolerance']}/{s['rows']} within {s['tolerance']:.0%}, max |pred/meas - 1| "
            f"{s['max_abs_ratio_minus_1']:.1%}, geomean pred/meas {s['geomean_ratio']:.3f}; "
            f"rankings equal in {sum(r['same'] for r in ranks)}/{len(ranks)} (run, problem)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        profile = get_profile(args.profile)
    except ValueError as e:
        raise SystemExit(f"--profile: {e}") from None
    rows, sources = [], []
    for run, path in enumerate(args.measured):
        try:
            measured = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--measured {path}: {e}") from None
        run_rows = predict_run(measured, profile, run)
        if not run_rows:
            raise SystemExit(f"--measured {path}: no ring, ulysses or unified rows")
        rows += run_rows
        env = measured.get("environment", {})
        sources.append({"run": run, "path": _shown_path(path), "benchmark": measured.get("benchmark"),
                        "date_utc": env.get("date_utc"), "git_commit": env.get("git_commit"),
                        "git_dirty": env.get("git_dirty"), "device_name": env.get("device_name"),
                        "busy_cpus_at_start": env.get("busy_cpus_at_start"), "args": measured.get("args"),
                        "reference_rows": [{k: r.get(k) for k in ("problem", "mode", "mesh", "ms")}
                                           for r in measured["rows"] if r["mode"] not in MODES]})

    print(f"profile {profile.name} ({_shown_path(args.profile)}): attention "
          f"{json.dumps(profile.attention_tflops)} TFLOP/s, half_len {profile.kernel_half_len:.1f}, "
          f"overhead {profile.kernel_overhead_us:.1f} us, links "
          + ", ".join(f"{x.name} {x.latency_us:.0f} us + {x.bandwidth_gbs:.3f} GB/s" for x in profile.links)
          + f", overlap {profile.overlap}; placement {PLACEMENT}")
    ranks = rankings(rows)
    for src in sources:
        run = src["run"]
        mine = [r for r in rows if r["run"] == run]
        print(f"\nrun {run}: {src['path']} ({src['date_utc']}, busy CPUs at start {src['busy_cpus_at_start']}"
              f"{', train' if any(r['train'] for r in mine) else ''})")
        print_table(mine, [("problem", "problem", ""), ("mode", "mode", ""), ("mesh", "mesh", ""),
                           ("pred ms", "predicted_ms", ".2f"), ("meas ms", "measured_ms", ".2f"),
                           ("pred/meas", "ratio", ".3f"), ("pred compute", "compute_ms", ".2f"),
                           ("single scaled", "single_scaled_ms", ".2f"), ("pred comm", "comm_ms", ".2f"),
                           ("meas - scaled", "measured_rest_ms", ".2f"), ("a2a", "a2a_ms", ".2f"),
                           ("ring exposed", "ring_exposed_ms", ".2f")])
        print()
        mine_ranks = [r for r in ranks if r["run"] == run]
        print_table([dict(r, predicted=" < ".join(r["predicted"]), measured=" < ".join(r["measured"]))
                     for r in mine_ranks],
                    [("problem", "problem", ""), ("predicted order", "predicted", ""),
                     ("measured order", "measured", ""), ("same", "same", ""),
                     ("swapped", "swapped_pairs", "d"),
                     ("of", "pairs", "d"), ("tau", "kendall_tau", ".2f"),
                     ("meas slowest/fastest-1", "measured_spread", ".1%")])
        print(f"run {run}: " + _summary_line(summary(mine, args.tolerance), mine_ranks))

    total = summary(rows, args.tolerance)
    spread, pairs = noise(rows, len(sources))
    print("\nall runs: " + _summary_line(total, ranks))
    if len(sources) > 1:
        print("\nrun-to-run noise (measured ms per run):")
        print_table([dict(r, runs=" ".join(f"{x:.2f}" for x in r["measured_ms"])) for r in spread],
                    [("problem", "problem", ""), ("mode", "mode", ""), ("mesh", "mesh", ""),
                     ("measured ms per run", "runs", ""), ("max/min-1", "run_spread", ".1%"),
                     ("pred ms", "predicted_ms", ".2f")])
        print("\npairs of modes (means over the runs):")
        print_table(pairs, [("problem", "problem", ""), ("pair", "pair", ""),
                            ("meas faster", "measured_faster", ""), ("gap", "mean_gap", ".1%"),
                            ("resolved by runs", "resolved_by_runs", ""),
                            ("same order every run", "same_order_every_run", ""),
                            ("pred faster", "predicted_faster", ""),
                            ("pred gap", "predicted_gap", ".1%"), ("holds", "prediction_holds", "")])
        resolved = [p for p in pairs if p["resolved_by_runs"]]
        held = sum(p["prediction_holds"] for p in resolved)
        print(f"{len(resolved)}/{len(pairs)} measured pairs are resolved by the runs (ranges do not "
              f"overlap); the prediction holds for {held}/{len(resolved)} of them")

    if not args.no_json:
        write_json("planner-validation", rows,
                   {"args": {k: v for k, v in vars(args).items() if k not in ("profile", "measured")},
                    "profile_path": _shown_path(args.profile), "profile": profile.to_dict(),
                    "placement": PLACEMENT, "measured": sources, "summary": total, "rankings": ranks,
                    "noise": spread, "pairs": pairs},
                   out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

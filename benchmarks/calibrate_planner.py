"""Calibrates the planner's h100-sxm profile on two published 4 x H100 FLUX.1-dev tables and prints the
model's predictions against them.

    python benchmarks/calibrate_planner.py             # fit, compare, write the JSON
    python benchmarks/calibrate_planner.py --no-json   # print only
    python benchmarks/calibrate_planner.py --count-ops 4   # recount diffusers' operations (needs diffusers)

The two tables, whole pipeline calls of FLUX.1-dev at 1024 x 1024 (4096 image + 512 text tokens, 24 heads x
128, 57 attention layers), bf16, one image, no CFG, on 4 NVLink H100s:
- diffusers' context-parallel benchmark (docs/source/en/training/distributed_inference.md of
  huggingface/diffusers, "Unified Attention"; https://huggingface.co/docs/diffusers/main/en/training/
  distributed_inference), 50 steps, not compiled: Ulysses 4 6670.789 ms, ring 4 13076.492 ms,
  unified_balanced (Ulysses 2 x ring 2) 11068.705 ms per call. Its ring all-gathers the ring group's K/V
  (rotate_method="allgather") and merges each chunk in float32: implementation "diffusers".
- xDiT's FLUX.1-dev table (docs/performance/flux.md of xdit-project/xDiT, "Scalability of Flux.1 Dev";
  https://github.com/xdit-project/xDiT/blob/main/docs/performance/flux.md), 28 steps, torch.compile column:
  1 GPU 4.30 s, Ulysses-4 1.63 s, Ulysses-2 x Ring-2 1.80 s, Ring-4 1.98 s. USP over yunchang: P2P ring
  with a separate float32 merge per step, q, k, v one all-to-all each: implementation "xdit".

A row's prediction is cp_attention.planner.cli.pipeline_ms: the model's fixed cost per image plus steps x
(57 x the attention call cp_attention.plan predicts for the row's layout, placement "ulysses-inner", plus
2 x 6.46 B per-token parameters x 4608 / world tokens at the profile's gemm rate).

Fitted, in two stages, each by least squares on the relative errors (Gauss-Newton from the profile's values
before calibration, START; the time is linear in each except where a longer ring step hides more of a hop):
1. on xDiT's four rows (compiled): FLUX's fixed cost per image (cli.FLUX_FIXED_MS), the rate of the
   transformer's non-attention work (gemm_tflops, bf16 and fp16) and the fixed cost of one attention kernel
   call, i.e. of one ring step (kernel_overhead_us);
2. on diffusers' three rows (eager), with those fixed: launch_us, the cost of each operation an eager
   implementation launches around its collectives (diffusers' counts, cost.IMPLEMENTATIONS).
sync_us stays 0: fitted beside them (four parameters for four rows, printed and recorded as the
unconstrained fit) it takes about 9 us and moves the others, which says these rows do not tell a cost per
synchronisation point apart from the cost per kernel call. Not fitted: the attention rates and links (the
profile's sources), kernel_half_len, copy_gbs (2700 GB/s: an estimate, 80% of the H100's 3.35 TB/s), the
implementations' counts.

Writes benchmarks/results/planner-calibration-<UTC time>.json (no device in the name: this is arithmetic):
the environment (versions, commit), the tables with their sources, the fitted values beside the built-in
profile's, per row the published and predicted times with the terms, and the rank orders.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS_DIR, environment  # noqa: E402

from cp_attention.planner import IMPLEMENTATIONS, cli, plan  # noqa: E402
from cp_attention.planner.profiles import BUILTIN  # noqa: E402

SEQ, HEADS, HEAD_DIM = 4608, 24, 128
DIFFUSERS = ("diffusers docs, distributed inference, Unified Attention "
             "(https://huggingface.co/docs/diffusers/main/en/training/distributed_inference; "
             "huggingface/diffusers docs/source/en/training/distributed_inference.md; benchmark script: "
             "diffusers PR #12693): "
             "FLUX.1-dev 1024x1024, 50 steps, 4x H100, not compiled")
XDIT = ("xDiT docs, Flux.1 performance, Scalability of Flux.1 Dev "
        "(https://github.com/xdit-project/xDiT/blob/main/docs/performance/flux.md): FLUX.1-dev 1024x1024, "
        "28 steps, 4x H100 NVLink, torch.compile column")
# (table, label, ring, ulysses, steps, published ms, implementation, compiled)
ROWS = (
    ("xdit", "1 GPU", 1, 1, 28, 4300.0, "xdit", True),
    ("xdit", "Ulysses-4", 1, 4, 28, 1630.0, "xdit", True),
    ("xdit", "Ulysses-2 x Ring-2", 2, 2, 28, 1800.0, "xdit", True),
    ("xdit", "Ring-4", 4, 1, 28, 1980.0, "xdit", True),
    ("diffusers", "ulysses", 1, 4, 50, 6670.789, "diffusers", False),
    ("diffusers", "ring", 4, 1, 50, 13076.492, "diffusers", False),
    ("diffusers", "unified_balanced", 2, 2, 50, 11068.705, "diffusers", False),
)
FIELDS = ("table", "label", "ring", "ulysses", "steps", "published_ms", "implementation", "compiled")
STAGES = (("xdit", ("fixed_ms", "inv_gemm", "kernel_overhead_us")), ("diffusers", ("launch_us",)))
# Stage 1 with sync_us free as well, for the record.
UNCONSTRAINED = ("xdit", ("fixed_ms", "inv_gemm", "kernel_overhead_us", "sync_us"))
# Where the fits start: the h100-sxm profile before calibration (gemm 720 TFLOP/s, 12 us per kernel call,
# no sync or launch cost) and no fixed cost.
START = dict(fixed_ms=0.0, inv_gemm=1 / 720, kernel_overhead_us=12.0, sync_us=0.0, launch_us=0.0)
# A stand-in for "no matmul time" where 1 / gemm rate is 0.
_NO_GEMM = 1e30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-json", action="store_true", help="print only, write no result file")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default: benchmarks/results)")
    p.add_argument("--count-ops", type=int, metavar="WORLD", default=0,
                   help="instead: recount the operations diffusers' attention launches per call on a tiny "
                        "FLUX transformer over a fake process group of WORLD ranks (needs diffusers), beside "
                        "cost.IMPLEMENTATIONS' counts")
    return p.parse_args(argv)


def rows() -> list[dict]:
    return [dict(zip(FIELDS, r)) for r in ROWS]


def with_values(profile, values: dict):
    """The profile with the fitted fields replaced: inv_gemm (1 / the bf16 and fp16 gemm TFLOP/s),
    kernel_overhead_us, sync_us, launch_us (fixed_ms belongs to the model, not the profile)."""
    changes = {k: values[k] for k in ("kernel_overhead_us", "sync_us", "launch_us") if k in values}
    if "inv_gemm" in values:
        rate = 1.0 / values["inv_gemm"] if values["inv_gemm"] > 0 else _NO_GEMM
        changes["gemm_tflops"] = dict(profile.gemm_tflops, bfloat16=rate, float16=rate)
    return dataclasses.replace(profile, **changes)


def layout_plan(row: dict, profile):
    """The Plan of the row's layout (one replica, Ulysses groups on consecutive ranks, as both benchmarks
    place them)."""
    world = row["ring"] * row["ulysses"]
    plans = plan(world, seq_len=SEQ, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16, hardware=profile,
                 implementation=row["implementation"], compiled=row["compiled"])
    return next(p for p in plans if (p.ring_degree, p.ulysses_degree, p.data_degree) ==
                (row["ring"], row["ulysses"], 1) and p.placement == "ulysses-inner")


def predict_ms(row: dict, profile, fixed_ms: float) -> float:
    """The whole pipeline call of the row, ms."""
    model = dataclasses.replace(cli.MODELS["flux"], fixed_ms=fixed_ms)
    world = row["ring"] * row["ulysses"]
    return cli.pipeline_ms(layout_plan(row, profile), model, SEQ, 1, world, profile, "bfloat16", row["steps"])


def _evaluate(row: dict, profile, values: dict) -> float:
    sync = values.get("sync_us", profile.sync_us)
    if sync < 0:  # outside a profile's range; the time is linear in it (a cost per counted sync point)
        at = [_evaluate(row, profile, dict(values, sync_us=x)) for x in (0.0, 1.0)]
        return at[0] + sync * (at[1] - at[0])
    return predict_ms(row, with_values(profile, values), values.get("fixed_ms", 0.0))


def fit_stage(rows_: list[dict], profile, names: tuple, fixed: dict) -> dict:
    """Least squares on relative errors over rows_ for the parameters `names` (started at START), the
    others at `fixed`. Gauss-Newton: the time is linear in each parameter except where a longer ring step
    hides more of a hop, so a few steps settle it."""
    x = {n: START[n] for n in names}
    for _ in range(50):
        at = dict(fixed, **x)
        base = [_evaluate(r, profile, at) for r in rows_]
        steps = {n: 1e-4 * abs(x[n]) or 1e-4 for n in names}
        columns = [[(_evaluate(r, profile, dict(at, **{n: x[n] + steps[n]})) - b) / steps[n]
                    for r, b in zip(rows_, base)] for n in names]
        a = torch.tensor([[c[i] / r["published_ms"] for c in columns] for i, r in enumerate(rows_)],
                         dtype=torch.float64)
        y = torch.tensor([(r["published_ms"] - b) / r["published_ms"] for r, b in zip(rows_, base)],
                         dtype=torch.float64).unsqueeze(1)
        delta = torch.linalg.lstsq(a, y, driver="gelsd").solution.squeeze(1).tolist()
        x = {n: x[n] + d for n, d in zip(names, delta)}
        if all(abs(d) <= 1e-9 * max(abs(x[n]), 1e-9) for n, d in zip(names, delta)):
            break
    return dict(fixed, **x)


def fit(profile) -> dict:
    """Both stages, from the profile's unfitted values, sync_us held at 0."""
    values = {"sync_us": 0.0}
    for table, names in STAGES:
        values = fit_stage([r for r in rows() if r["table"] == table], profile, names, values)
    return values


def fit_unconstrained(profile) -> dict:
    """Stage 1 with sync_us free as well: as many parameters as rows."""
    table, names = UNCONSTRAINED
    return fit_stage([r for r in rows() if r["table"] == table], profile, names, {"launch_us": 0.0})


def builtin_values() -> dict:
    """The fitted quantities as the package holds them (h100-sxm, cli.FLUX_FIXED_MS)."""
    p = BUILTIN["h100-sxm"]
    return dict(fixed_ms=cli.FLUX_FIXED_MS, inv_gemm=1.0 / p.gemm_rate("bfloat16"),
                kernel_overhead_us=p.kernel_overhead_us, sync_us=p.sync_us, launch_us=p.launch_us)


def shown(values: dict) -> dict:
    """Values in their units: fixed_ms (ms), gemm_tflops (TFLOP/s), kernel_overhead_us, sync_us,
    launch_us (us)."""
    out = {k: v for k, v in values.items() if k != "inv_gemm"}
    out["gemm_tflops"] = 1.0 / values["inv_gemm"]
    return {k: out[k] for k in ("fixed_ms", "gemm_tflops", "kernel_overhead_us", "sync_us", "launch_us")
            if k in out}


def predicted_rows(profile, fixed_ms: float) -> list[dict]:
    out = []
    for r in rows():
        p = layout_plan(r, profile)
        world = r["ring"] * r["ulysses"]
        model = dataclasses.replace(cli.MODELS["flux"], fixed_ms=fixed_ms)
        step = cli.step_ms(p, model, SEQ, 1, world, profile, "bfloat16")
        ms = predict_ms(r, profile, fixed_ms)
        out.append(dict(r, layout=p.layout, predicted_ms=ms, ratio=ms / r["published_ms"],
                        rel_error=ms / r["published_ms"] - 1, step_ms=step, attention_ms_per_call=p.time_ms,
                        attention_steps_ms=model.layers * p.time_ms,
                        gemm_ms_per_step=step - model.layers * p.time_ms, compute_ms=p.compute_ms,
                        comm_ms=p.comm_ms, details={k: v for k, v in p.details.items()}))
    return out


def rank_orders(pred_rows: list[dict]) -> list[dict]:
    """Per table: the labels fastest first, published and predicted."""
    out = []
    for table in dict.fromkeys(r["table"] for r in pred_rows):
        mine = [r for r in pred_rows if r["table"] == table]
        published = [r["label"] for r in sorted(mine, key=lambda r: r["published_ms"])]
        predicted = [r["label"] for r in sorted(mine, key=lambda r: r["predicted_ms"])]
        out.append(dict(table=table, published=published, predicted=predicted, same=published == predicted))
    return out


def print_markdown(pred_rows: list[dict], orders: list[dict]) -> None:
    print("| table | layout (ring x Ulysses) | steps | published s | predicted s | "
          "predicted / published - 1 |")
    print("|---|---|---|---|---|---|")
    for r in pred_rows:
        print(f"| {r['table']} | {r['label']} ({r['ring']}x{r['ulysses']}) | {r['steps']} | "
              f"{r['published_ms'] / 1e3:.2f} | {r['predicted_ms'] / 1e3:.2f} | {r['rel_error']:+.1%} |")
    print()
    for o in orders:
        print(f"{o['table']}: published {' < '.join(o['published'])}; predicted {' < '.join(o['predicted'])}"
              f" ({'same order' if o['same'] else 'different order'})")


def write_result(payload: dict, out_dir: str | None) -> Path:
    """benchmarks/results/planner-calibration-<UTC time>.json, the environment first."""
    directory = Path(out_dir) if out_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"planner-calibration-{stamp}.json"
    payload = dict(benchmark="planner-calibration", environment=environment("cpu"), **payload)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


# Dispatcher-level operations that launch no kernel, left out of the counts.
_VIEWS = {"view", "unsqueeze", "t", "permute", "split", "unbind", "slice", "split_with_sizes", "transpose",
          "squeeze", "expand", "_unsafe_view", "reshape", "alias", "select", "as_strided", "detach"}


def _count_forward(ring: int, ulysses: int, blocks: int) -> int:
    """Operations (views left out) one forward of a FLUX transformer of `blocks` double- and `blocks`
    single-stream blocks (24 heads x 8, bf16, 64 + 16 tokens) dispatches on CPU, diffusers' context
    parallelism over ring x ulysses of the fake world (the cuDNN backend's kernel stood in by zeros), or
    plain SDPA at 1 x 1."""
    from collections import Counter

    from diffusers import ContextParallelConfig, FluxTransformer2DModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops[func.overloadpacket.__name__] += 1
            if func.overloadpacket.__name__ == "_scaled_dot_product_cudnn_attention":
                q = kwargs.get("query", args[0] if args else None)
                B, H, S, D = q.shape
                zero = torch.zeros((), dtype=torch.int64)
                out, lse = torch.zeros(B, H, S, D, dtype=q.dtype), torch.zeros(B, H, S, 1)
                return out, lse, None, None, S, S, zero, zero, None
            return func(*args, **kwargs)

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=blocks, num_single_layers=blocks,
                                   attention_head_dim=8, num_attention_heads=HEADS, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model = model.eval().to(torch.bfloat16)
    if ring * ulysses > 1:
        model.set_attention_backend("_native_cudnn")
        config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
        config.mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
        model.enable_parallelism(config=config)
    bf16 = dict(dtype=torch.bfloat16)
    inputs = (torch.randn(1, 64, 16, **bf16), torch.randn(1, 16, 32, **bf16), torch.randn(1, 32, **bf16),
              torch.tensor([0.5]), torch.zeros(64, 3), torch.zeros(16, 3), torch.tensor([3.5]))
    with torch.no_grad():
        for _ in range(2):  # the first call sets things up lazily; the second is counted
            with Count() as count:
                model(*inputs, return_dict=False)
    return sum(n for name, n in count.ops.items() if name not in _VIEWS)


def _per_call(ring: int, ulysses: int) -> float:
    """Operations of one attention call and its block: a forward of two blocks of each kind less one of one
    block of each kind, halved (the embedders and the context-parallel hooks drop out)."""
    return (_count_forward(ring, ulysses, 2) - _count_forward(ring, ulysses, 1)) / 2


def count_ops(world: int) -> list[dict]:
    """Per layout of `world` fake ranks: diffusers' operations per attention call beyond plain SDPA's, and
    cost.IMPLEMENTATIONS' count."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.accelerator.device_count = lambda: 1  # diffusers picks device rank % count; CPU has none
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    base = _per_call(1, 1)
    out = []
    for ulysses in (u for u in range(1, world + 1) if world % u == 0):
        ring = world // ulysses
        counted = _per_call(ring, ulysses) - base
        out.append(dict(ring=ring, ulysses=ulysses, counted=counted,
                        model=IMPLEMENTATIONS["diffusers"].launched_ops(ring, ulysses)))
        print(f"ring {ring} x Ulysses {ulysses}: counted {counted:g} per call, cost.IMPLEMENTATIONS "
              f"{out[-1]['model']}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.count_ops:
        rows_ = count_ops(args.count_ops)
        return 0 if all(r["counted"] == r["model"] for r in rows_) else 1
    profile = BUILTIN["h100-sxm"]
    fitted = fit(profile)
    free = fit_unconstrained(profile)
    held = builtin_values()
    print("fitted (stage 1 on xDiT's compiled rows, stage 2 on diffusers' eager rows) and built in:")
    for name, value in shown(fitted).items():
        print(f"  {name}: fitted {value:.4g}, built in {shown(held)[name]:.4g}")
    print("stage 1 with sync_us free too: " + ", ".join(f"{k} {v:.4g}" for k, v in shown(free).items())
          + " (held at 0: four rows do not separate it from kernel_overhead_us)")
    drift = max(abs(fitted[k] / held[k] - 1) if held[k] else (0.0 if fitted[k] == 0 else math.inf)
                for k in held)
    if drift > 0.01:
        print(f"warning: the built-in values differ from the fit by up to {drift:.1%}; the table below uses "
              f"the built-in ones")
    pred_rows = predicted_rows(profile, cli.FLUX_FIXED_MS)
    orders = rank_orders(pred_rows)
    print(f"\nh100-sxm as built in (fixed cost {cli.FLUX_FIXED_MS:.0f} ms per image):\n")
    print_markdown(pred_rows, orders)
    worst = max(abs(r["rel_error"]) for r in pred_rows)
    print(f"\nlargest |predicted / published - 1|: {worst:.1%}")
    if not args.no_json:
        write_result(dict(
            sources={"diffusers": DIFFUSERS, "xdit": XDIT},
            model=dict(name="flux", seq_len=SEQ, **dataclasses.asdict(cli.MODELS["flux"])),
            stages=[dict(table=t, fitted=list(n)) for t, n in STAGES],
            implementations={n: dataclasses.asdict(IMPLEMENTATIONS[n]) for n in ("xdit", "diffusers")},
            fitted=shown(fitted), built_in=shown(held), unconstrained_stage_1=shown(free),
            profile=profile.to_dict(),
            largest_abs_rel_error=worst, rank_orders=orders, rows=pred_rows), args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `host` profile against the live engine it describes: predicted against measured step times.

Issue 12 asks that, with the `host` profile, the emulator predict the live engine's own step times across
batch shapes within a median absolute error of 10%. The workloads below run in vLLM's offline engine on
`--device maia` with `maia_profile: host` (``maia_serving.vllm.step_timing``: one fresh process, engine
core in process, eager, no prefix caching, a warm-up and then rounds in which every workload takes its
turn); every charged step's emulated time and measured wall time (the scheduler's hand-off to the result)
are grouped by shape, and each shape's emulated median compared with its median in the fastest round (as
`calibrate-host` fits the engine's time: a shared host's neighbours only ever slow a round down); the error
against every round's median is printed beside it.

Three predictions per shape: the device's work alone (torch's rates as `calibrate-host` measures them);
with the engine's own time per step as the cached profile holds it (`calibrate-host --engine-model`,
fitted in another process, earlier); and with the engine's time fitted in this very run on the calibration
workloads (``calibrate.ENGINE_WORKLOADS``, run alongside), whose shapes are not among those checked. The
last separates the model's error from the host's drift between two processes on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from common import write_json

from maia_serving.emulator.hardware import host_profile_path
from maia_serving.serving.profiles import load_profile
from maia_serving.tools.calibrate_host import (
    ENGINE_ROUNDS,
    ENGINE_WORKLOADS,
    EngineTime,
    fit_engine_time,
    round_spread,
    shape_timings,
)
from maia_serving.vllm import step_timing

ROOT = Path(__file__).resolve().parent.parent
# name: (prompts, prompt tokens, output tokens); decode shapes come from every workload's later steps.
WORKLOADS = {
    "1x64": (1, 64, 48),
    "8x64": (8, 64, 48),
    "32x64": (32, 64, 48),
    "64x128": (64, 128, 24),
    "1x1024": (1, 1024, 8),
    "4x512": (4, 512, 8),
}


def _rows(shapes, engine: EngineTime, fitted: EngineTime) -> list[dict]:
    rows = []
    for shape in shapes:
        device_s = shape.predicted_s - engine.of(shape.seqs, shape.tokens)
        row = {
            "kind": shape.kind,
            "seqs": shape.seqs,
            "tokens": shape.tokens,
            "steps": shape.steps,
            "measured_ms": 1e3 * shape.measured_s,
            "all_rounds_ms": 1e3 * shape.all_steps_s,
            "device_ms": 1e3 * device_s,
            "profiled_ms": 1e3 * shape.predicted_s,
            "fitted_ms": 1e3 * (device_s + fitted.of(shape.seqs, shape.tokens)),
        }
        for key in ("device", "profiled", "fitted"):
            row[f"{key}_error"] = row[f"{key}_ms"] / row["measured_ms"] - 1
        row["profiled_all_rounds_error"] = row["profiled_ms"] / row["all_rounds_ms"] - 1
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "demo"))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=ENGINE_ROUNDS)
    args = parser.parse_args()
    profile = load_profile("host")
    engine = EngineTime(profile.step_overhead_s, profile.step_overhead_per_seq_s, profile.step_overhead_per_token_s)
    calibration = {f"{p}x{t}" for p, t, _ in ENGINE_WORKLOADS}
    steps = step_timing.run(
        args.model, [*ENGINE_WORKLOADS, *(WORKLOADS[name] for name in args.workloads)], rounds=args.rounds
    )
    # The calibration workloads' shapes with the cached engine time taken out: what calibrate-host fits on.
    device_only = [
        replace(s, predicted_s=s.predicted_s - engine.of(s.seqs, s.tokens))
        for s in shape_timings([s for s in steps if s["workload"] in calibration])
    ]
    fitted = fit_engine_time(device_only)
    shapes = shape_timings([s for s in steps if s["workload"] not in calibration])
    rows = _rows(shapes, engine, fitted)
    print(
        f"{args.model}, host profile ({host_profile_path()}), {len(rows)} step shapes, each at its fastest of "
        f"{args.rounds} rounds (the round's median); the slowest round {100 * round_spread(shapes):.0f}% over "
        "the fastest (median shape)"
    )
    for label, e in (("in the profile", engine), ("fitted in this run", fitted)):
        print(
            f"engine time {label}: {1e3 * e.fixed_s:.3f} ms a step + {1e6 * e.per_seq_s:.1f} us a sequence + "
            f"{1e6 * e.per_token_s:.2f} us a token"
        )
    print(
        f"{'step':>8s} {'seqs':>5s} {'tokens':>6s} {'steps':>5s} {'measured ms':>11s} {'device':>7s} {'error':>6s} "
        f"{'profiled':>8s} {'error':>6s} {'fitted':>7s} {'error':>6s} {'all rounds':>10s} {'error':>6s}"
    )
    for r in rows:
        print(
            f"{r['kind']:>8s} {r['seqs']:5d} {r['tokens']:6d} {r['steps']:5d} {r['measured_ms']:11.2f} "
            f"{r['device_ms']:7.2f} {100 * r['device_error']:+5.0f}% {r['profiled_ms']:8.2f} "
            f"{100 * r['profiled_error']:+5.0f}% {r['fitted_ms']:7.2f} {100 * r['fitted_error']:+5.0f}% "
            f"{r['all_rounds_ms']:10.2f} {100 * r['profiled_all_rounds_error']:+5.0f}%"
        )
    summary = {}
    for kind in ("decode", "prefill", None):
        chosen = [r for r in rows if kind in (None, r["kind"])]
        summary[kind or "all"] = {
            key: statistics.median(abs(r[f"{key}_error"]) for r in chosen)
            for key in ("device", "profiled", "fitted", "profiled_all_rounds")
        }
        m = summary[kind or "all"]
        print(
            f"{kind or 'all':>8s}: median absolute error {100 * m['profiled']:.0f}% with the profile's engine time "
            f"(goal <= 10%; {100 * m['profiled_all_rounds']:.0f}% against every round's median), "
            f"{100 * m['fitted']:.0f}% with the engine's time fitted in this run, {100 * m['device']:.0f}% with "
            "the device's work alone"
        )
    if not engine.of(1, 1):
        print("(no engine time in the host profile: `maia-serving calibrate-host --engine-model models/demo`)")
    write_json(
        "host_fidelity",
        {
            "model": args.model,
            "engine_time": engine.__dict__,
            "fitted": fitted.__dict__,
            "rows": rows,
            "median_abs_error": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

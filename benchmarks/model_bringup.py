"""`maia-serving profile` on the built-in models at their full sizes: per image (or denoising step, or prompt)
latency at batch 1 on Maia 100, Maia 200 and H100, and the throughput at the best batch that fits each chip.

Each model and batch is recorded once on the meta device (`profile --meta`: the live run's FLOPs and memory,
its latency within 2%, tests/unit/torch/test_torch_meta.py) and priced on each profile, at batches doubling
until none fits a chip's HBM (or --max-batch). The best batch is the smallest that fits with 98% of the most
throughput any fitting batch reaches: past it, a larger batch buys latency, not images per second.

Then the cross-check: each published GPU measurement of these models in data/published_models.yaml (none of
them used to build the profiles) against the emulated time of the same model, batch and GPU.

    cd benchmarks && ../.venv-vllm/bin/python model_bringup.py            # writes out/model_bringup.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import common  # noqa: F401  (the repository root on the path)
import torch
import yaml

from maia_serving.emulator.hardware import load_profile
from maia_serving.tools.profile_model import load_example, measure_meta, report

# (model, --input-shape): each at the size its users run it (Llama: a 512-token prompt's prefill).
MODELS = [
    ("yolov8n", None),
    ("yolov8x", None),
    ("vit-base-16", None),
    ("vit-large-16", None),
    ("unet-sd15", None),
    ("llama-3-8b", 512),
]
PROFILES = ["maia100", "maia200", "h100-sxm"]


@dataclass
class Row:
    model: str
    profile: str
    unit: str
    batch1_ms: float
    batch1_per_s: float
    best_batch: int
    best_per_s: float
    largest_fitting: int
    best_peak_gib: float
    best_where: str


def sweep(name: str, shape: int | None, max_batch: int, dtype: str) -> list[Row]:
    profiles = [load_profile(p) for p in PROFILES]
    by_batch = {}
    batch = 1
    while batch <= max_batch:
        measured = measure_meta(load_example(name, batch, shape, meta=True), getattr(torch, dtype))
        by_batch[batch] = [report(measured, p, "bf16") for p in profiles]
        if not any(r.fits for r in by_batch[batch]):
            break
        batch *= 2
    rows = []
    for i, profile in enumerate(profiles):
        first = by_batch[1][i]
        fitting = {b: reports[i] for b, reports in by_batch.items() if reports[i].fits}
        most = max((r.throughput_per_s for r in fitting.values()), default=0.0)
        best = min((b for b, r in fitting.items() if r.throughput_per_s >= 0.98 * most), default=0)
        chosen = fitting.get(best, first)
        rows.append(
            Row(
                name,
                profile.name,
                measured.unit,
                first.latency_ms,
                first.throughput_per_s,
                best,
                chosen.throughput_per_s,
                max(fitting, default=0),
                chosen.peak_memory_bytes / 2**30,
                chosen.where,
            )
        )
    return rows


def cross_check() -> list[dict[str, object]]:
    """Each published case against the emulated step of the same model, batch and profile (BF16: the sources'
    FP16 runs at the same peak)."""
    data = yaml.safe_load((common.OUT.parent / "data" / "published_models.yaml").read_text())
    rows = []
    for case in data["cases"]:
        measured = measure_meta(load_example(case["model"], case["batch"], None, meta=True), torch.bfloat16)
        emulated = report(measured, load_profile(case["profile"]), "bf16").latency_ms
        rows.append({**case, "emulated_ms": emulated, "ratio": emulated / case["step_ms"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--models", nargs="+", default=[m for m, _ in MODELS])
    args = parser.parse_args()
    shapes = dict(MODELS)
    rows = []
    for name in args.models:
        rows += sweep(name, shapes.get(name), args.max_batch, args.dtype)
        print(f"{name}: done", flush=True)
    print("| model | profile | batch 1 | per s at batch 1 | best batch | per s there | peak | where the time goes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.model} | {r.profile} | {r.batch1_ms:.3g} ms | {r.batch1_per_s:.4g} | {r.best_batch} | "
            f"{r.best_per_s:.4g} | {r.best_peak_gib:.3g} GiB | {r.largest_fitting} | {r.best_where} |"
        )
    checks = cross_check()
    print("\n| case | software | published | emulated | emulated / published |\n|---|---|---:|---:|---:|")
    for c in checks:
        print(f"| {c['id']} | {c['software']} | {c['step_ms']} ms | {c['emulated_ms']:.3g} ms | {c['ratio']:.2f} |")
    common.OUT.mkdir(exist_ok=True)
    result = {"rows": [r.__dict__ for r in rows], "cross_check": checks}
    (common.OUT / "model_bringup.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""How fast `maia-serving simulate` runs: 10,000 requests (goal: at most 10 s each workload on this host).

Each row simulates the same 10,000 requests (input 512, output 128 by default) on one device,
from the workload to the report (`summarize`), and prints the host's CPU seconds (which other
tenants of a shared machine do not move) beside wall seconds. Rates from all at once to a
nearly idle device: the slow end is many small steps, one per emulated decode; one row runs two pipeline
stages (two batches in flight, each stage priced apart). ``--moe`` adds rows
for Qwen3-30B-A3B under expert parallelism on 8 H100s, routed uniformly and with a per-layer load
(``--expert-load``'s pricing: 128 experts x 48 layers, the slowest path the cost model has); the load
is synthetic (Zipf-like shares, each layer's order shuffled by a fixed seed), for speed, not figures.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import replace

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.cost.routing import from_counts
from maia_serving.emulator.sim.report import summarize
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic

# (profile, request rate, gpu_memory_utilization): 0.35 leaves Llama-3-8B on a Maia 100 KV for about 50
# sequences of 640 tokens, so 256 at once preempt.
CASES = [
    ("maia200", math.inf, 0.9),
    ("maia200", 10.0, 0.9),
    ("maia200", 5.0, 0.9),
    ("maia200", 2.0, 0.9),
    ("maia200", 0.5, 0.9),
    ("maia100", math.inf, 0.9),
    ("maia100", math.inf, 0.35),
]

MOE_MODEL, MOE_PROFILE, MOE_CHIPS = "qwen3-30b-a3b", "h100-sxm", 8


def zipf_load(model, seed: int = 0):
    """Per-layer counts ~ 1 / (rank + 10), each layer's ranks shuffled: a skewed, seeded routing."""
    rng = random.Random(seed)
    n, layers = model.moe.num_experts, model.num_moe_layers
    counts = []
    for _ in range(layers):
        ranks = list(range(n))
        rng.shuffle(ranks)
        counts.append([1000.0 / (r + 10) for r in ranks])
    return from_counts(counts, n, model.moe.top_k, layers, "synthetic Zipf load", "simulator_speed.py")


def moe_cases() -> list:
    """(label, profile, model, config, rate) for the --moe rows."""
    model = load_model_shape(MOE_MODEL)
    skewed = replace(model, moe=replace(model.moe, load=zipf_load(model)))
    config = ServingConfig(tensor_parallel_size=MOE_CHIPS, enable_expert_parallel=True)
    return [
        (f"{MOE_MODEL} EP{MOE_CHIPS} {routing}", MOE_PROFILE, shape, config, rate)
        for routing, shape in (("uniform", model), ("per-layer load", skewed))
        for rate in (math.inf, 10.0)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--num-prompts", type=int, default=10_000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    parser.add_argument("--moe", action="store_true", help="also the MoE rows (module doc)")
    args = parser.parse_args()
    model = load_model_shape(args.model)
    cases = [
        (profile, profile, model, ServingConfig(gpu_memory_utilization=utilization), rate)
        for profile, rate, utilization in CASES
    ]
    # Pipeline stages price each stage's share and the hops between them: their own path in the cost model.
    cases.append(("maia200 PP2", "maia200", model, ServingConfig(pipeline_parallel_size=2), 5.0))
    if args.moe:
        cases += moe_cases()
    print(
        f"{args.model}, {args.num_prompts} x ({args.input_len} in, {args.output_len} out), "
        f"prefix caching {'on' if args.prefix_caching else 'off'}\n"
    )
    print(
        "| case | request rate | gpu_memory_utilization | steps | preemptions | emulated s | output tok/s "
        "| host CPU s | host wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, profile, shape, config, rate in cases:
        requests = synthetic(args.num_prompts, args.input_len, args.output_len, rate)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sim = simulate_device(load_profile(profile), shape, config, requests, args.prefix_caching)
        report = summarize(sim)
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        print(
            f"| {label} | {rate:g} | {config.gpu_memory_utilization} | {report.num_steps} | {report.num_preemptions} "
            f"| {report.duration_s:.1f} | {report.output_throughput_tok_s:.0f} | {cpu_s:.2f} | {wall_s:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

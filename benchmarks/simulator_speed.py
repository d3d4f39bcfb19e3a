"""How fast `maia-serving simulate` runs: 10,000 requests (goal: at most 10 s each workload on this host).

Each row simulates the same 10,000 requests (input 512, output 128 by default) on one device,
from the workload to the report (`summarize`), and prints the host's CPU seconds (which other
tenants of a shared machine do not move) beside wall seconds. Rates from all at once to a
nearly idle device: the slow end is many small steps, one per emulated decode.
"""

from __future__ import annotations

import argparse
import math
import time

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.report import summarize
from maia_serving.emulator.simulate import simulate_device
from maia_serving.emulator.workload import synthetic

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--num-prompts", type=int, default=10_000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    args = parser.parse_args()
    model = load_model_shape(args.model)
    print(f"{args.model}, {args.num_prompts} x ({args.input_len} in, {args.output_len} out), "
          f"prefix caching {'on' if args.prefix_caching else 'off'}\n")
    print("| device | request rate | gpu_memory_utilization | steps | preemptions | emulated s | output tok/s "
          "| host CPU s | host wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for profile, rate, utilization in CASES:
        requests = synthetic(args.num_prompts, args.input_len, args.output_len, rate)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sim = simulate_device(load_profile(profile), model, ServingConfig(gpu_memory_utilization=utilization),
                              requests, args.prefix_caching)
        report = summarize(sim)
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"| {profile} | {rate:g} | {utilization} | {report.num_steps} | {report.num_preemptions} "
              f"| {report.duration_s:.1f} | {report.output_throughput_tok_s:.0f} | {cpu_s:.2f} | {wall_s:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of `vllm serve --device maia` against vLLM's own CPU platform, one run.

Both servers run the same demo model side by side; load rounds alternate between
them (the idle one waits) so that the host's drifting speed hits both alike, and
each platform's figure is the median of its rounds. Also reports the emulator's
overhead (CPU time the engine spent charging steps, from the maia server's own
/metrics) and the emulated figures. Goals: ratio >= 0.95, overhead <= 2%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from common import OUT, run_load, write_json

from maia_serving.tools.training.demo import build_demo_model
from tests.utils.launch import Server, free_port, scrape, vllm_serve_cmd

ROOT = Path(__file__).resolve().parent.parent


def server(model: Path, device: str | None, profile: str, attention: str) -> Server:
    port = free_port()
    extra = ["--served-model-name", "demo", "--max-model-len", "1024", "--enforce-eager"]
    if device:
        extra += ["--additional-config", f'{{"maia_profile": "{profile}"}}']
    # The built-in CPU platform must not pick ours up from the environment.
    env = {
        "VLLM_CPU_CI_ENV": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "MAIA_SERVING_DEVICE": device or "",
        "MAIA_SERVING_ATTENTION": attention,
    }
    return Server(
        vllm_serve_cmd(model, port, *extra, device=device), port, OUT / f"server-{device or 'cpu'}.log", env=env
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="maia200")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--attention",
        choices=["maia", "vllm-cpu"],
        default="maia",
        help="attention backend of the maia server (MAIA_SERVING_ATTENTION)",
    )
    args = parser.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        build_demo_model(model)
    labels = {"cpu": "cpu (vLLM built-in)", "maia": f"maia ({args.profile}, {args.attention} attn)"}
    rounds: dict[str, list] = {"cpu": [], "maia": []}
    with ExitStack() as stack:
        servers = {
            "cpu": stack.enter_context(server(model, None, args.profile, args.attention)),
            "maia": stack.enter_context(server(model, "maia", args.profile, args.attention)),
        }
        for i in range(args.rounds):
            for name in ("cpu", "maia") if i % 2 == 0 else ("maia", "cpu"):
                rounds[name].append(
                    run_load(
                        servers[name].url,
                        "demo",
                        args.requests,
                        args.concurrency,
                        args.max_tokens,
                        servers[name].proc.pid,
                    )
                )
        m = scrape(servers["maia"].url)
    median = {k: statistics.median(r.output_tokens_per_s for r in v) for k, v in rounds.items()}
    per_cpu = {k: statistics.median(r.output_tokens_per_cpu_s for r in v) for k, v in rounds.items()}
    # Rounds i of both platforms ran back to back: their ratio cancels the host's drift.
    pair_ratios = [m_.output_tokens_per_s / c.output_tokens_per_s for m_, c in zip(rounds["maia"], rounds["cpu"])]
    ratio = statistics.median(pair_ratios)
    cpu_ratio = per_cpu["maia"] / per_cpu["cpu"]
    steps = m["maia:emulated_step_seconds_count"]
    overhead = m["maia:emulator_overhead_seconds_total"] / m["maia:host_step_seconds_total"]
    print(
        f"workload: {args.rounds} alternating rounds x {args.requests} requests, concurrency "
        f"{args.concurrency}, {args.max_tokens} output tokens each, demo model"
    )
    print(f"{'platform':<24}{'median tok/s':>14}{'tok per CPU-s':>15}   rounds (tok/s)")
    for name, label in labels.items():
        print(
            f"{label:<24}{median[name]:>14.1f}{per_cpu[name]:>15.1f}   "
            + ", ".join(f"{r.output_tokens_per_s:.0f}" for r in rounds[name])
        )
    print(
        f"throughput ratio maia/cpu, median of back-to-back pairs: {ratio:.3f} (goal >= 0.95; pairs: "
        + ", ".join(f"{r:.2f}" for r in pair_ratios)
        + ")"
    )
    print(f"tokens per server CPU-second, maia/cpu: {cpu_ratio:.3f}")
    print(
        f"emulator overhead: {overhead * 100:.2f}% of host step time over {steps:.0f} steps "
        f"({m['maia:emulator_overhead_seconds_total'] / steps * 1e6:.1f} us CPU per step; goal <= 2%)"
    )
    print(
        f"emulated: {m['maia:emulated_busy_seconds_total'] * 1e3:.3f} ms busy on {args.profile} for "
        f"{m['maia:host_step_seconds_total']:.2f} s of host steps"
    )
    path = write_json(
        "serve_throughput",
        {
            "args": vars(args),
            "rounds": rounds,
            "median_tok_s": median,
            "ratio": ratio,
            "pair_ratios": pair_ratios,
            "cpu_time_ratio": cpu_ratio,
            "overhead_share": overhead,
            "maia_metrics": m,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

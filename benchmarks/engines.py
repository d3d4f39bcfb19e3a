"""SGLang on maia against vLLM on maia and vLLM's built-in CPU platform, in one run.

Three servers of the same demo model with the same limits; load rounds rotate between
them (the others wait) so the host's drifting speed hits all alike. Reports each
server's median throughput (wall and per server CPU-second), the ratios, and the two
maia servers' emulated figures side by side (same profile, same workload), then plots
them. SGLang's own CPU engine cannot run from PyPI packages (its CPU kernels are not
published), so vLLM's CPU platform is the host baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from common import OUT, run_load, write_json

from maia_serving.tools.training.demo import build_demo_model
from tests.utils.launch import Server, free_port, scrape, sglang_serve_cmd, vllm_serve_cmd

ROOT = Path(__file__).resolve().parent.parent
MAX_LEN = "1024"
LABELS = {"sglang-maia": "SGLang on maia", "vllm-maia": "vLLM on maia", "vllm-cpu": "vLLM CPU (built-in)"}


def servers(model: Path, profile: str) -> dict[str, Server]:
    limits_vllm = [
        "--served-model-name",
        "demo",
        "--max-model-len",
        MAX_LEN,
        "--enforce-eager",
        "--max-num-batched-tokens",
        "2048",
        "--max-num-seqs",
        "64",
    ]
    limits_sglang = [
        "--served-model-name",
        "demo",
        "--context-length",
        MAX_LEN,
        "--enable-metrics",
        "--chunked-prefill-size",
        "2048",
        "--max-running-requests",
        "64",
    ]
    vllm_env = {"VLLM_CPU_CI_ENV": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = {}
    port = free_port()
    out["sglang-maia"] = Server(
        sglang_serve_cmd(model, port, *limits_sglang),
        port,
        OUT / "engines-sglang-maia.log",
        env={"MAIA_SERVING_PROFILE": profile, "MAIA_SERVING_HOST_KV_GIB": "1"},
    )
    port = free_port()
    out["vllm-maia"] = Server(
        vllm_serve_cmd(model, port, *limits_vllm, "--additional-config", f'{{"maia_profile": "{profile}"}}'),
        port,
        OUT / "engines-vllm-maia.log",
        env={**vllm_env, "MAIA_SERVING_DEVICE": "maia"},
    )
    port = free_port()
    # The built-in CPU platform must not pick ours up from the environment.
    out["vllm-cpu"] = Server(
        vllm_serve_cmd(model, port, *limits_vllm, device=None),
        port,
        OUT / "engines-vllm-cpu.log",
        env={**vllm_env, "MAIA_SERVING_DEVICE": ""},
    )
    return out


def emulated(m: dict[str, float]) -> dict[str, float]:
    def mean(name: str) -> float:
        count = m.get(f"{name}_count", 0)
        return m[f"{name}_sum"] / count if count else float("nan")

    return {
        "steps": m["maia:emulated_step_seconds_count"],
        "busy_s": m["maia:emulated_busy_seconds_total"],
        "host_step_s": m["maia:host_step_seconds_total"],
        "ttft_s": mean("maia:emulated_time_to_first_token_seconds"),
        "tpot_s": mean("maia:emulated_time_per_output_token_seconds"),
        "e2e_s": mean("maia:emulated_e2e_request_latency_seconds"),
        "kv_tokens": m['maia:kv_cache_tokens{holder="emulated"}'],
        "overhead_share": m["maia:emulator_overhead_seconds_total"] / m["maia:host_step_seconds_total"],
    }


def plot(median: dict[str, float], emu: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(median)
    a.bar([LABELS[n] for n in names], [median[n] for n in names], color=["#4c72b0", "#dd8452", "#8c8c8c"])
    a.set_ylabel("output tokens/s (host, median)")
    a.set_title("Measured on the host")
    a.tick_params(axis="x", labelrotation=10)
    maia = [n for n in names if n in emu]
    width = 0.35
    for i, (key, label) in enumerate((("ttft_s", "TTFT"), ("tpot_s", "TPOT"))):
        b.bar([j + i * width for j in range(len(maia))], [emu[n][key] * 1e6 for n in maia], width, label=label)
    b.set_xticks([j + width / 2 for j in range(len(maia))], [LABELS[n] for n in maia])
    b.set_ylabel("emulated microseconds (mean)")
    b.set_title("Emulated on the same profile")
    b.legend(loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="maia200")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        build_demo_model(model)
    rounds: dict[str, list] = {name: [] for name in LABELS}
    with ExitStack() as stack:
        running = {name: stack.enter_context(srv) for name, srv in servers(model, args.profile).items()}
        order = list(LABELS)
        for i in range(args.rounds):
            for name in order[i % 3 :] + order[: i % 3]:
                srv = running[name]
                rounds[name].append(
                    run_load(srv.url, "demo", args.requests, args.concurrency, args.max_tokens, srv.proc.pid)
                )
        time.sleep(0.5)  # SGLang's scheduler writes its metric files just after answering
        emu = {name: emulated(scrape(running[name].url)) for name in ("sglang-maia", "vllm-maia")}
    median = {k: statistics.median(r.output_tokens_per_s for r in v) for k, v in rounds.items()}
    per_cpu = {k: statistics.median(r.output_tokens_per_cpu_s for r in v) for k, v in rounds.items()}

    def pair_ratio(a: str, b: str) -> float:
        """Median over rounds of a/b: each round of the two ran within the same rotation."""
        return statistics.median(x.output_tokens_per_s / y.output_tokens_per_s for x, y in zip(rounds[a], rounds[b]))

    ratios = {
        f"{a} / {b}": (pair_ratio(a, b), per_cpu[a] / per_cpu[b])
        for a, b in (("sglang-maia", "vllm-maia"), ("sglang-maia", "vllm-cpu"), ("vllm-maia", "vllm-cpu"))
    }
    print(
        f"workload: {args.rounds} rotating rounds x {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.max_tokens} output tokens each, demo model, profile {args.profile}"
    )
    print(f"{'server':<22}{'median tok/s':>14}{'tok per CPU-s':>15}   rounds (tok/s)")
    for name, label in LABELS.items():
        print(
            f"{label:<22}{median[name]:>14.1f}{per_cpu[name]:>15.1f}   "
            + ", ".join(f"{r.output_tokens_per_s:.0f}" for r in rounds[name])
        )
    print(f"\n{'ratio':<28}{'wall (median of rounds)':>24}{'per CPU-s':>12}")
    for name, (wall, cpu) in ratios.items():
        print(f"{name:<28}{wall:>24.3f}{cpu:>12.3f}")
    print(f"\nemulated on {args.profile} (means per request; same workload on both engines):")
    print(f"{'':<16}{'steps':>8}{'busy':>12}{'TTFT':>12}{'TPOT':>12}{'e2e':>12}{'KV tokens':>14}{'overhead':>10}")
    for name, e in emu.items():
        print(
            f"{LABELS[name]:<16}{e['steps']:>8.0f}{e['busy_s'] * 1e3:>10.3f}ms{e['ttft_s'] * 1e6:>10.1f}us"
            f"{e['tpot_s'] * 1e6:>10.1f}us{e['e2e_s'] * 1e3:>10.3f}ms{e['kv_tokens']:>14.0f}"
            f"{e['overhead_share'] * 100:>9.2f}%"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    figure = ROOT / "benchmarks" / "plots" / "engines.png"
    plot(median, emu, figure)
    path = write_json(
        "engines",
        {
            "args": vars(args),
            "rounds": rounds,
            "median_tok_s": median,
            "tok_per_cpu_s": per_cpu,
            "ratios": ratios,
            "emulated": emu,
        },
    )
    print(f"results: {path}\nplot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak both maia servers with clients that give up, and vLLM's own CPU platform for reference.

Each server gets the same seeded load (tests.utils.loadgen): streaming and plain
completions and chats at high concurrency, with a share of the streaming clients closing
the connection after two chunks and a share of the plain ones timing out. Reported per
server: requests, concurrency, what the clients did, failures (goal 0), whether anything
is left running or holding KV blocks afterwards, and the process tree's RSS before and
after. Writes out/reliability.json and prints the table for RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import OUT, write_json

from maia_serving.tools.training.demo import build_demo_model
from tests.utils.launch import Server, free_port, metric, scrape, sglang_serve_cmd, vllm_serve_cmd
from tests.utils.loadgen import Load, run_load

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
}


def servers(model: Path) -> dict[str, tuple[str, Server]]:
    vllm_limits = ["--served-model-name", "demo", "--max-model-len", "512", "--enforce-eager"]
    env = {"VLLM_CPU_CI_ENV": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "MAIA_SERVING_PROFILE": "maia100"}
    out = {}
    port = free_port()
    out["vLLM on maia"] = (
        "vllm",
        Server(vllm_serve_cmd(model, port, *vllm_limits), port, OUT / "reliability-vllm-maia.log", env=env),
    )
    port = free_port()
    out["SGLang on maia"] = (
        "sglang",
        Server(
            sglang_serve_cmd(model, port, "--served-model-name", "demo", "--context-length", "512", "--enable-metrics"),
            port,
            OUT / "reliability-sglang-maia.log",
            env=env,
        ),
    )
    port = free_port()
    out["vLLM CPU (built-in)"] = (
        "vllm",
        Server(
            vllm_serve_cmd(model, port, *vllm_limits, device=None),
            port,
            OUT / "reliability-vllm-cpu.log",
            env={**env, "MAIA_SERVING_DEVICE": ""},
        ),
    )
    return out


def settle(url: str, engine: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url, prefix="")
        if sum(metric(samples, n) for n in IN_FLIGHT[engine]) == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def soak(name: str, engine: str, server: Server, load: Load, rounds: int) -> dict:
    """``rounds`` times the load, RSS after each: growth that keeps going would be a leak."""
    with server:
        run_load(server.url, "demo", Load(num_requests=8, concurrency=4, seed=99))  # warm-up
        rss = [server.rss_bytes()]
        reports = []
        for i in range(rounds):
            reports.append(run_load(server.url, "demo", Load(**{**load.__dict__, "seed": load.seed + i})))
            samples = settle(server.url, engine)
            rss.append(server.rss_bytes())
        outcomes = sum((r.outcomes for r in reports), start=reports[0].outcomes.__class__())
        requests = rounds * load.num_requests
        row = {
            "server": name,
            "requests": requests,
            "concurrency": load.concurrency,
            **{k: outcomes[k] for k in ("ok", "disconnected", "timed_out", "failed")},
            "failures": [f for r in reports for f in r.failures][:5],
            "wall_s": round(sum(r.wall_s for r in reports), 1),
            "cancelled_share": (outcomes["disconnected"] + outcomes["timed_out"]) / requests,
            "alive": server.proc.poll() is None,
            "left_in_flight": sum(metric(samples, n) for n in IN_FLIGHT[engine]),
            "kv_blocks_used_after": metric(samples, "maia:kv_cache_blocks_used"),
            "emulation_errors": metric(samples, "maia:emulation_errors_total"),
            "rss_mib": [round(b / 2**20) for b in rss],
        }
    print(json.dumps(row))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| server | requests | concurrency | ok | disconnected | timed out | cancelled | failed | left in flight "
        "| KV used after | RSS after warm-up, then each round (MiB) |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['requests']} | {r['concurrency']} | {r['ok']} | {r['disconnected']} "
            f"| {r['timed_out']} | {r['cancelled_share']:.0%} | {r['failed']} | {r['left_in_flight']:.0f} "
            f"| {r['kv_blocks_used_after']:.0f} | {' → '.join(map(str, r['rss_mib']))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "model.safetensors").exists():
        build_demo_model(model)
    load = Load(num_requests=args.requests, concurrency=args.concurrency, seed=args.seed)
    rows = [soak(name, engine, server, load, args.rounds) for name, (engine, server) in servers(model).items()]
    write_json("reliability", {"load": load.__dict__, "rounds": args.rounds, "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()

"""Live and offline agree: static batches through `vllm serve --device maia` with a proxy shape, and
through `maia-serving simulate` with the same shape, profile, limits and workload.

For each (shape, profile) one server of the demo model priced as that shape; each workload is
replayed twice through it: as a plain client sends it (one HTTP request holding every prompt),
and paused-then-resumed so that the engine sees the whole batch at once, as the simulator does
(maia_serving.replay). Prints the emulated busy time, mean TTFT and mean TPOT of both sides, and
the live/simulated ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import OUT

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.simulate import simulate_device
from maia_serving.emulator.workload import synthetic
from maia_serving.launch import Server, free_port, metric, scrape, vllm_serve_cmd
from maia_serving.models.demo import build_demo_model
from maia_serving.replay import Figures, replay_at_once, simulated_figures

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_model_len": 512, "max_num_batched_tokens": 2048, "max_num_seqs": 64}
SERVERS = [("llama-3-8b", "maia200"), ("llama-3-8b", "maia100")]
WORKLOADS = [(8, 128, 64), (32, 256, 32)]  # (requests, input, output); 32 x 256 prefills in chunks of 2048


def _row(shape: str, profile: str, workload: tuple[int, int, int], how: str, live: Figures, sim: Figures) -> str:
    ratio = live.ratio_to(sim)
    return (f"| {shape} on {profile} | {workload[0]} x ({workload[1]} in, {workload[2]} out) | {how} "
            f"| {live.num_steps} / {sim.num_steps} "
            f"| {live.busy_s * 1e3:.2f} / {sim.busy_s * 1e3:.2f} ({ratio['busy_s']:.3f}) "
            f"| {live.ttft_s * 1e3:.2f} / {sim.ttft_s * 1e3:.2f} ({ratio['ttft_s']:.3f}) "
            f"| {live.tpot_s * 1e3:.3f} / {sim.tpot_s * 1e3:.3f} ({ratio['tpot_s']:.3f}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        build_demo_model(args.model)
    flags = [arg for key, value in LIMITS.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    print("| priced as | workload | replay | steps live / sim | busy ms live / sim (ratio) "
          "| mean TTFT ms live / sim (ratio) | mean TPOT ms live / sim (ratio) |")
    print("|---|---|---|---|---|---|---|")
    for shape, profile in SERVERS:
        port = free_port()
        config = f'{{"maia_profile": "{profile}", "maia_model": "{shape}"}}'
        cmd = vllm_serve_cmd(args.model, port, "--served-model-name", "demo", *flags, "--enforce-eager",
                             "--additional-config", config)
        env = {"VLLM_CPU_CI_ENV": "1", "VLLM_SERVER_DEV_MODE": "1"}
        with Server(cmd, port, OUT / f"live-vs-simulate-{shape}-{profile}.log", env=env) as server:
            start = scrape(server.url)
            block_size = round(metric(start, "maia:kv_cache_tokens", holder="emulated")
                               / metric(start, "maia:kv_cache_blocks", holder="emulated"))
            serving = ServingConfig(**LIMITS, block_size=block_size, gpu_memory_utilization=0.92)
            for workload in WORKLOADS:
                sim = simulated_figures(simulate_device(load_profile(profile), load_model_shape(shape), serving,
                                                        synthetic(*workload)))
                for how, pause in (("one HTTP request", False), ("paused, then resumed", True)):
                    live = replay_at_once(server.url, "demo", *workload, pause=pause)
                    print(_row(shape, profile, workload, how, live, sim), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Live and offline agree: static batches through `vllm serve --device maia` (and SGLang) with a proxy
shape, and through `maia-serving simulate` with the same shape, profile, limits and workload.

For each (engine, shape, profile) one server of the demo model priced as that shape; each workload
is replayed through it as a plain client sends it (one HTTP request holding every prompt) and, on
vLLM, also paused-then-resumed so that the engine sees the whole batch at once, as the simulator
does (tests.utils.replay; SGLang already receives such a batch in one message). Prints the
emulated busy time, mean TTFT and mean TPOT of both sides, and the live/simulated ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import OUT

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.hardware import NO_FRONT_END
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic
from maia_serving.tools.training.demo import build_demo_model
from tests.utils.launch import Server, free_port, metric, scrape, sglang_serve_cmd, vllm_serve_cmd
from tests.utils.replay import Figures, replay_at_once, simulated_figures

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_model_len": 512, "max_num_batched_tokens": 2048, "max_num_seqs": 64}
SERVERS = [("vllm", "llama-3-8b", "maia200"), ("vllm", "llama-3-8b", "maia100"), ("sglang", "llama-3-8b", "maia200")]
# How each engine gets the batch: SGLang receives a batch of token-id prompts in one message already.
REPLAYS = {
    "vllm": (("one HTTP request", False), ("paused, then resumed", True)),
    "sglang": (("one HTTP request", False),),
}
SGLANG_FLAGS = {
    "max_model_len": "--context-length",
    "max_num_batched_tokens": "--chunked-prefill-size",
    "max_num_seqs": "--max-running-requests",
}
WORKLOADS = [(8, 128, 64), (32, 256, 32)]  # (requests, input, output); 32 x 256 prefills in chunks of 2048


def _row(
    engine: str, shape: str, profile: str, workload: tuple[int, int, int], how: str, live: Figures, sim: Figures
) -> str:
    ratio = live.ratio_to(sim)
    return (
        f"| {engine} | {shape} on {profile} | {workload[0]} x ({workload[1]} in, {workload[2]} out) | {how} "
        f"| {live.num_steps} / {sim.num_steps} "
        f"| {live.busy_s * 1e3:.2f} / {sim.busy_s * 1e3:.2f} ({ratio['busy_s']:.3f}) "
        f"| {live.ttft_s * 1e3:.2f} / {sim.ttft_s * 1e3:.2f} ({ratio['ttft_s']:.3f}) "
        f"| {live.tpot_s * 1e3:.3f} / {sim.tpot_s * 1e3:.3f} ({ratio['tpot_s']:.3f}) |"
    )


def _server(engine: str, model: Path, shape: str, profile: str) -> Server:
    """A proxy-shape server of ``model`` with LIMITS; vLLM in dev mode, for /pause."""
    port = free_port()
    log = OUT / f"live-vs-simulate-{engine}-{shape}-{profile}.log"
    if engine == "sglang":
        flags = [arg for key, value in LIMITS.items() for arg in (SGLANG_FLAGS[key], str(value))]
        cmd = sglang_serve_cmd(model, port, "--served-model-name", "demo", *flags, "--enable-metrics")
        return Server(cmd, port, log, env={"MAIA_SERVING_PROFILE": profile, "MAIA_SERVING_MODEL": shape})
    flags = [arg for key, value in LIMITS.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    config = f'{{"maia_profile": "{profile}", "maia_model": "{shape}"}}'
    cmd = vllm_serve_cmd(
        model, port, "--served-model-name", "demo", *flags, "--enforce-eager", "--additional-config", config
    )
    return Server(cmd, port, log, env={"VLLM_CPU_CI_ENV": "1", "VLLM_SERVER_DEV_MODE": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        build_demo_model(args.model)
    print(
        "| engine | priced as | workload | replay | steps live / sim | busy ms live / sim (ratio) "
        "| mean TTFT ms live / sim (ratio) | mean TPOT ms live / sim (ratio) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for engine, shape, profile in SERVERS:
        with _server(engine, args.model, shape, profile) as server:
            start = scrape(server.url)
            block_size = round(
                metric(start, "maia:kv_cache_tokens", holder="emulated")
                / metric(start, "maia:kv_cache_blocks", holder="emulated")
            )
            serving = ServingConfig(**LIMITS, block_size=block_size, gpu_memory_utilization=0.92)
            for workload in WORKLOADS:
                sim = simulated_figures(
                    simulate_device(
                        load_profile(profile),
                        load_model_shape(shape),
                        serving,
                        synthetic(*workload),
                        front_end=NO_FRONT_END,  # the engine's own figures: from when it has the batch
                    )
                )
                for how, pause in REPLAYS[engine]:
                    live = replay_at_once(server.url, "demo", *workload, pause=pause)
                    print(_row(engine, shape, profile, workload, how, live, sim), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

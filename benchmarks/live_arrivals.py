"""Live and offline agree under an arrival rate: Poisson arrivals sent in real time to `vllm serve --device maia`
(the demo model priced as a proxy shape), and the same arrivals, as they really left, through `simulate`.

Once with the host as fast as it can (MAIA_SERVING_PACE=0) and once paced (=1: each busy step lasts its
emulated time on the host's clock). Prints the emulated busy time, mean TTFT and mean TPOT of both sides and
their ratios, and the client's own stopwatch (mean TTFT and TPOT of the streamed tokens).
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
from tests.utils.launch import Server, free_port, metric, scrape, vllm_serve_cmd
from tests.utils.replay import replay_trace, simulated_figures

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_model_len": 512, "max_num_batched_tokens": 2048, "max_num_seqs": 64}


def serve(model: Path, shape: str, profile: str, pace: bool, name: str = "live-arrivals") -> Server:
    """`vllm serve --device maia` of ``model`` priced as ``shape`` on ``profile``, paced or not, logging to out/."""
    port = free_port()
    flags = [arg for key, value in LIMITS.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    config = f'{{"maia_profile": "{profile}", "maia_model": "{shape}"}}'
    cmd = vllm_serve_cmd(
        model, port, "--served-model-name", "demo", *flags, "--enforce-eager", "--additional-config", config
    )
    log = OUT / f"{name}-{shape}-{profile}-pace{int(pace)}.log"
    return Server(cmd, port, log, env={"VLLM_CPU_CI_ENV": "1", "MAIA_SERVING_PACE": str(int(pace))})


def arguments(doc: str, input_len: int, output_len: int, rates: list[float]) -> argparse.Namespace:
    """The command line of a live run under Poisson arrivals (this one and client_ttft.py), the demo model built."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--profile", default="maia100")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=input_len)
    parser.add_argument("--output-len", type=int, default=output_len)
    parser.add_argument("--rates", type=float, nargs="+", default=rates)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        build_demo_model(args.model)
    return args


def serving_of(url: str) -> ServingConfig:
    """The emulator's config of a server started by ``serve``: its limits, vLLM's default memory share, and the
    KV block size it reports."""
    start = scrape(url)
    block_size = round(
        metric(start, "maia:kv_cache_tokens", holder="emulated")
        / metric(start, "maia:kv_cache_blocks", holder="emulated")
    )
    return ServingConfig(**LIMITS, block_size=block_size, gpu_memory_utilization=0.92)


def main() -> int:
    args = arguments(__doc__, 128, 32, [2.0, 8.0, 32.0])
    profile, shape = load_profile(args.profile), load_model_shape(args.shape)
    print(
        f"{args.shape} on {args.profile}, {args.num_prompts} x ({args.input_len} in, {args.output_len} out), "
        f"Poisson arrivals (seed 0)\n"
    )
    print(
        "| rate req/s | paced | busy ms live / sim (ratio) | mean TTFT ms live / sim (ratio) "
        "| mean TPOT ms live / sim (ratio) | client TTFT / TPOT ms |"
    )
    print("|---|---|---|---|---|---|")
    for pace in (False, True):
        with serve(args.model, args.shape, args.profile, pace) as server:
            serving = serving_of(server.url)
            for rate in args.rates:
                trace = replay_trace(
                    server.url, "demo", synthetic(args.num_prompts, args.input_len, args.output_len, request_rate=rate)
                )
                sim = simulated_figures(  # the engine's own figures: client_ttft.py adds the front end
                    simulate_device(profile, shape, serving, list(trace.sent), front_end=NO_FRONT_END)
                )
                live, ratio = trace.emulated, trace.emulated.ratio_to(sim)
                print(
                    f"| {rate:g} | {'yes' if pace else 'no'} "
                    f"| {live.busy_s * 1e3:.1f} / {sim.busy_s * 1e3:.1f} ({ratio['busy_s']:.3f}) "
                    f"| {live.ttft_s * 1e3:.2f} / {sim.ttft_s * 1e3:.2f} ({ratio['ttft_s']:.3f}) "
                    f"| {live.tpot_s * 1e3:.3f} / {sim.tpot_s * 1e3:.3f} ({ratio['tpot_s']:.3f}) "
                    f"| {trace.client_ttft_s * 1e3:.2f} / {trace.client_tpot_s * 1e3:.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

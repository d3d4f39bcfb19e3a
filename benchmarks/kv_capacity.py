"""KV capacity and serving throughput of each KV format against BF16, on `vllm serve --device maia`.

For the same host budget (VLLM_CPU_KVCACHE_SPACE) and profile, how many KV tokens the engine
actually allocated with each cache format (goals: FP8 >= 1.98x BF16, MXFP4 >= 3.7x), the
emulated device's own capacity, and the serving throughput of each on the host, in rounds
rotating between the servers (goal: every format >= 0.95x of BF16 per CPU-second). FP8 and
NVFP4 serve the calibrated copy of the demo model (their scales), the MX formats the model as
it is. Also the emulated capacity for real shapes, from the same capacity model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from common import OUT, run_load, write_json

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile, plan_memory
from maia_serving.tools.training.demo import build_demo_model
from tests.utils.launch import Server, free_port, scrape, vllm_serve_cmd

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 'maia:kv_cache_blocks{{holder="{}"}}'


def calibrated(model: Path) -> Path:
    from maia_serving.tools.calibrate_kv import calibrate_kv
    from maia_serving.tools.training.tokenizer import stdlib_files

    out = OUT / "demo-kv-fp8"
    if not (out / "config.json").exists():
        calibrate_kv(model, stdlib_files(3), out, max_tokens=4096, seq_len=512, progress=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="maia200")
    parser.add_argument("--host-kv-gib", default="1")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["fp8", "mxfp8", "mxfp6", "mxfp4", "nvfp4"],
        help="KV formats served beside BF16 (auto)",
    )
    args = parser.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        build_demo_model(model)
    formats = ["auto", *args.formats]
    models = {f: calibrated(model) if f in ("fp8", "nvfp4") else model for f in formats}
    env = {"VLLM_CPU_CI_ENV": "1", "VLLM_CPU_KVCACHE_SPACE": args.host_kv_gib, "MAIA_SERVING_KV_CACHE_DTYPE": ""}
    rounds: dict[str, list] = {f: [] for f in formats}
    blocks: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = {}
        for fmt, path in models.items():
            port = free_port()
            cmd = vllm_serve_cmd(
                path,
                port,
                "--served-model-name",
                "demo",
                "--max-model-len",
                "1024",
                "--enforce-eager",
                "--kv-cache-dtype",
                fmt,
                "--additional-config",
                f'{{"maia_profile": "{args.profile}"}}',
            )
            servers[fmt] = stack.enter_context(Server(cmd, port, OUT / f"server-kv-{fmt}.log", env=env))
        for i in range(args.rounds):  # each round starts one server later: none always runs first
            for fmt in formats[i % len(formats) :] + formats[: i % len(formats)]:
                srv = servers[fmt]
                rounds[fmt].append(
                    run_load(srv.url, "demo", args.requests, args.concurrency, args.max_tokens, srv.proc.pid)
                )
        for fmt, srv in servers.items():
            m = scrape(srv.url)
            blocks[fmt] = {h: m[BLOCK.format(h)] for h in ("engine", "emulated")}
    block_size = 128  # vLLM's CPU default, which the maia platform keeps
    ratio = {f: {h: blocks[f][h] / blocks["auto"][h] for h in ("engine", "emulated")} for f in formats}
    tput = {k: statistics.median(r.output_tokens_per_s for r in v) for k, v in rounds.items()}
    per_cpu = {k: statistics.median(r.output_tokens_per_cpu_s for r in v) for k, v in rounds.items()}
    print(
        f"demo model on {args.profile}, host KV budget {args.host_kv_gib} GiB, block size {block_size}, "
        f"{args.rounds} rotating rounds x {args.requests} requests x {args.max_tokens} tokens"
    )
    print(
        f"{'kv cache':<10}{'engine KV tokens':>18}{'emulated KV tokens':>20}{'x BF16':>8}{'tok/s':>10}"
        f"{'tok/CPU-s':>11}{'x BF16 per CPU-s':>18}"
    )
    for fmt in formats:
        engine, emulated = blocks[fmt]["engine"] * block_size, blocks[fmt]["emulated"] * block_size
        print(
            f"{fmt:<10}{engine:>18,.0f}{emulated:>20,.0f}{ratio[fmt]['engine']:>8.3f}{tput[fmt]:>10.1f}"
            f"{per_cpu[fmt]:>11.1f}{per_cpu[fmt] / per_cpu['auto']:>18.3f}"
        )
    print("goals: FP8 >= 1.98x and MXFP4 >= 3.7x the BF16 tokens; every format >= 0.95x BF16's tokens per CPU-s")
    shapes = []
    real = ("auto", "fp8", "mxfp6", "mxfp4")
    print("\nemulated capacity of real shapes (max model len 8192, gpu_memory_utilization 0.9), KV tokens:")
    print(f"{'model':<14}{'device':<10}{'tp':>3}" + "".join(f"{f:>14}" for f in real) + f"{'mxfp4 x':>9}")
    for name, device, tp in (
        ("llama-3-8b", "maia100", 1),
        ("llama-3-8b", "maia200", 1),
        ("llama-3-70b", "maia100", 4),
        ("llama-3-70b", "maia200", 1),
        ("llama-3-70b", "h100-sxm", 4),
    ):
        shape, profile = load_model_shape(name), load_profile(device)
        tokens = {
            dt: plan_memory(
                shape, profile, ServingConfig(tensor_parallel_size=tp, kv_cache_dtype=dt, max_model_len=8192)
            ).kv_tokens
            for dt in real
        }
        shapes.append({"model": name, "device": device, "tp": tp, "kv_tokens": tokens})
        print(
            f"{name:<14}{device:<10}{tp:>3}"
            + "".join(f"{tokens[f]:>14,}" for f in real)
            + f"{tokens['mxfp4'] / max(tokens['auto'], 1):>9.2f}"
        )
    path = write_json(
        "kv_capacity",
        {
            "args": vars(args),
            "blocks": blocks,
            "ratio": ratio,
            "rounds": rounds,
            "throughput_tok_s": tput,
            "tok_per_cpu_s": per_cpu,
            "shapes": shapes,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

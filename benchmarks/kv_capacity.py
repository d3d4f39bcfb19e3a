"""KV capacity and serving throughput, FP8 against BF16, on `vllm serve --device maia`.

For the same host budget (VLLM_CPU_KVCACHE_SPACE) and profile, how many KV tokens the
engine actually allocated with each cache dtype (goal: FP8 >= 1.98x BF16), the
emulated device's own capacity, and the serving throughput of each on the host.
Also the emulated capacity for real shapes, from the same capacity model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from common import OUT, run_load, write_json

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile, plan_memory
from maia_serving.launch import Server, free_port, scrape, vllm_serve_cmd
from maia_serving.models.demo import build_demo_model

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 'maia:kv_cache_blocks{{holder="{}"}}'


def calibrated(model: Path) -> Path:
    from maia_serving.calibration import calibrate_kv
    from maia_serving.models.tokenizer import stdlib_files

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
    args = parser.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        build_demo_model(model)
    models = {"auto": model, "fp8": calibrated(model)}
    env = {"VLLM_CPU_CI_ENV": "1", "VLLM_CPU_KVCACHE_SPACE": args.host_kv_gib}
    rounds: dict[str, list] = {k: [] for k in models}
    blocks: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = {}
        for dtype, path in models.items():
            port = free_port()
            cmd = vllm_serve_cmd(path, port, "--served-model-name", "demo", "--max-model-len", "1024",
                                 "--enforce-eager", "--kv-cache-dtype", dtype,
                                 "--additional-config", f'{{"maia_profile": "{args.profile}"}}')
            servers[dtype] = stack.enter_context(Server(cmd, port, OUT / f"server-kv-{dtype}.log", env=env))
        for i in range(args.rounds):
            for dtype in (models if i % 2 == 0 else reversed(list(models))):
                srv = servers[dtype]
                rounds[dtype].append(run_load(srv.url, "demo", args.requests, args.concurrency, args.max_tokens,
                                              srv.proc.pid))
        for dtype, srv in servers.items():
            m = scrape(srv.url)
            blocks[dtype] = {h: m[BLOCK.format(h)] for h in ("engine", "emulated")}
    block_size = 128  # vLLM's CPU default, which the maia platform keeps
    ratio = {h: blocks["fp8"][h] / blocks["auto"][h] for h in ("engine", "emulated")}
    tput = {k: statistics.median(r.output_tokens_per_s for r in v) for k, v in rounds.items()}
    per_cpu = {k: statistics.median(r.output_tokens_per_cpu_s for r in v) for k, v in rounds.items()}
    print(f"demo model on {args.profile}, host KV budget {args.host_kv_gib} GiB, block size {block_size}")
    print(f"{'kv cache':<10}{'engine KV tokens':>18}{'emulated KV tokens':>20}{'tok/s':>10}{'tok/CPU-s':>11}")
    for dtype in models:
        engine, emulated = blocks[dtype]["engine"] * block_size, blocks[dtype]["emulated"] * block_size
        print(f"{dtype:<10}{engine:>18,.0f}{emulated:>20,.0f}{tput[dtype]:>10.1f}{per_cpu[dtype]:>11.1f}")
    print(f"FP8/BF16 KV tokens: engine {ratio['engine']:.3f}x, emulated {ratio['emulated']:.3f}x (goal >= 1.98x)")
    print(f"FP8/BF16 throughput: {tput['fp8'] / tput['auto']:.3f}x wall, "
          f"{per_cpu['fp8'] / per_cpu['auto']:.3f}x per CPU-s")
    shapes = []
    print("\nemulated capacity of real shapes (max model len 8192, gpu_memory_utilization 0.9):")
    print(f"{'model':<14}{'device':<10}{'tp':>3}{'BF16 KV tokens':>16}{'FP8 KV tokens':>16}{'ratio':>7}")
    for name, device, tp in (("llama-3-8b", "maia100", 1), ("llama-3-8b", "maia200", 1),
                             ("llama-3-70b", "maia100", 4), ("llama-3-70b", "maia200", 1),
                             ("llama-3-70b", "h100-sxm", 4)):
        shape, profile = load_model_shape(name), load_profile(device)
        plans = {dt: plan_memory(shape, profile, ServingConfig(tensor_parallel_size=tp, kv_cache_dtype=dt,
                                                               max_model_len=8192)) for dt in ("auto", "fp8")}
        row = {"model": name, "device": device, "tp": tp, "bf16_tokens": plans["auto"].kv_tokens,
               "fp8_tokens": plans["fp8"].kv_tokens}
        shapes.append(row)
        print(f"{name:<14}{device:<10}{tp:>3}{row['bf16_tokens']:>16,}{row['fp8_tokens']:>16,}"
              f"{row['fp8_tokens'] / max(row['bf16_tokens'], 1):>7.2f}")
    path = write_json("kv_capacity", {"args": vars(args), "blocks": blocks, "ratio": ratio, "rounds": rounds,
                                      "throughput_tok_s": tput, "tok_per_cpu_s": per_cpu, "shapes": shapes})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: serve the demo model with `vllm serve ... --device maia` (or, with
``--engine sglang``, SGLang's launch_server ``--device maia``) priced as Llama-3-8B on a
Maia 200 (a proxy shape: the tiny model runs, every step is priced as the real one), ask it
one chat question through the openai client, print the answer and the emulated figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from openai import OpenAI

from maia_serving.formats.units import format_seconds
from maia_serving.tools.training.demo import build_demo_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the server harness lives in tests/utils, outside the package
from tests.utils.launch import Server, free_port, scrape, sglang_serve_cmd, vllm_serve_cmd  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "demo"))
    parser.add_argument("--profile", default="maia200")
    parser.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument(
        "--priced-as",
        default="llama-3-8b",
        help="the shape every step is priced as (a built-in name or a config.json); '' for the demo model itself",
    )
    args = parser.parse_args()
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"building the demo model in {model}")
        build_demo_model(model)
    port = free_port()
    if args.engine == "vllm":
        config = {"maia_profile": args.profile, **({"maia_model": args.priced_as} if args.priced_as else {})}
        cmd = vllm_serve_cmd(
            model,
            port,
            "--served-model-name",
            "demo",
            "--max-model-len",
            "1024",
            "--enforce-eager",
            "--additional-config",
            json.dumps(config),
        )
        env = {"VLLM_CPU_CI_ENV": "1"}
    else:
        cmd = sglang_serve_cmd(
            model, port, "--served-model-name", "demo", "--context-length", "1024", "--enable-metrics"
        )
        env = {"MAIA_SERVING_PROFILE": args.profile, "MAIA_SERVING_MODEL": args.priced_as}
    print("$", " ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd))
    log = ROOT / "models" / f"demo-{args.engine}-server.log"
    with Server(cmd, port, log, env=env) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        question = "Write a Python function that adds two numbers."
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
        )
        print(f"\nuser: {question}\nassistant (random demo weights): {reply.choices[0].message.content!r}")
        print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
        time.sleep(0.2)  # SGLang's scheduler writes its metric files just after answering
        m = scrape(server.url)
        info = next(k for k in m if k.startswith("maia:device_info"))
        steps = m["maia:emulated_step_seconds_count"]
        print(f"\nemulated device: {info}")
        print(
            f"steps charged: {steps:.0f}; emulated busy time {m['maia:emulated_busy_seconds_total'] * 1e3:.3f} ms "
            f"vs host {m['maia:host_step_seconds_total'] * 1e3:.1f} ms"
        )
        ttft = m["maia:emulated_time_to_first_token_seconds_sum"] / m["maia:emulated_time_to_first_token_seconds_count"]
        tpot_sum = m["maia:emulated_time_per_output_token_seconds_sum"]
        tpot = tpot_sum / m["maia:emulated_time_per_output_token_seconds_count"]
        print(f"emulated TTFT {format_seconds(ttft)}, TPOT {format_seconds(tpot)}")
        emulated_blocks = m['maia:kv_cache_blocks{holder="emulated"}']
        engine_blocks = m['maia:kv_cache_blocks{holder="engine"}']
        print(
            f"emulated HBM {m['maia:hbm_used_bytes'] / 2**30:.3f} / {m['maia:hbm_total_bytes'] / 2**30:.0f} GiB; "
            f"KV blocks: {emulated_blocks:.0f} on the emulated device, {engine_blocks:.0f} on the host"
        )
        print(f"server log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

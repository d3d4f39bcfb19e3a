"""KV-cache accuracy through a live `vllm serve`: held-out perplexity and greedy agreement vs BF16.

For a trained model (default models/trained, from `maia-serving train-model`) and its
heldout.txt, each configuration gets its own server, started as a user would
(`vllm serve MODEL --device maia --kv-cache-dtype ...`) and asked over HTTP:

- BF16: the model as trained, ``--kv-cache-dtype auto``;
- FP8 E4M3 per-tensor: the `calibrate-kv` copy (scales from calibration.txt), "fp8";
- FP8 E4M3 per-head: the same copy with ``MAIA_SERVING_KV_SCALES=per_head`` (the maia
  backend reads the sidecar; vLLM's CPU platform cannot, so it is skipped there);
- FP8 E5M2: its own `calibrate-kv --format e5m2` copy, "fp8_e5m2";
- FP8 E4M3 scale 1.0: the uncalibrated model with "fp8";
- MXFP8, MXFP6, MXFP4 (post-training: their E8M0 block scales need no calibration) and NVFP4
  (tensor scales from the E4M3 copy's sidecar), `--kv-cache-dtype mxfp4` etc. on --device maia;
- MXFP4 after QAT: the `maia-serving qat-kv --format mxfp4` checkpoint (``--qat-model``), when it exists.

Perplexity comes from ``prompt_logprobs`` over non-overlapping windows of the held-out
tokens (context length less one: vLLM must have room to generate a token); top-1
agreement is the share of those positions whose most likely next token is BF16's; greedy
agreement is the share of held-out prompts whose 32-token greedy continuation equals
BF16's (a weak model has many near-ties, so one flipped token changes the rest). The server's
log line ``Maia KV cache ...`` is kept as the proof of the scales it quantized with.

``--device maia`` (default); ``--device cpu`` runs vLLM's built-in CPU platform, whose FP8 cache
needs AVX-512 or AMX (a configuration that fails is reported with its error, the others still run).

``--engine sglang`` asks SGLang's server (``--device maia``) the same through its native ``/generate``
(``return_logprob`` from position 0: its OpenAI API has no prompt logprobs).

Writes benchmarks/out/kv_accuracy.json and benchmarks/out/kv_accuracy.png (``kv_accuracy_sglang.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import OUT, write_json

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_MODEL = ROOT / "models" / "trained"
DEVICES = ("maia", "cpu")


@dataclass(frozen=True)
class KvConfig:
    name: str
    label: str
    kv_cache_dtype: str
    checkpoint: str  # "base" (as trained), "qat" (--qat-model), or the calibrate-kv format: "e4m3", "e5m2"
    env: tuple[tuple[str, str], ...] = ()
    maia_only: bool = False


CONFIGS = (
    KvConfig("bf16", "BF16", "auto", "base"),
    KvConfig("fp8_e4m3_per_tensor", "FP8 E4M3 per-tensor", "fp8", "e4m3"),
    KvConfig(
        "fp8_e4m3_per_head",
        "FP8 E4M3 per-head",
        "fp8",
        "e4m3",
        (("MAIA_SERVING_KV_SCALES", "per_head"),),
        maia_only=True,
    ),
    KvConfig("fp8_e5m2", "FP8 E5M2 calibrated", "fp8_e5m2", "e5m2"),
    KvConfig("fp8_e4m3_scale1", "FP8 E4M3 scale 1.0", "fp8", "base"),
    KvConfig("mxfp8", "MXFP8", "mxfp8", "base", maia_only=True),
    KvConfig("mxfp6", "MXFP6 (E3M2)", "mxfp6", "base", maia_only=True),
    KvConfig("mxfp4", "MXFP4", "mxfp4", "base", maia_only=True),
    KvConfig("nvfp4", "NVFP4", "nvfp4", "e4m3", maia_only=True),
    KvConfig("mxfp4_qat", "MXFP4 after QAT", "mxfp4", "qat", maia_only=True),
)


@dataclass
class ConfigResult:
    name: str
    label: str
    model: str
    kv_cache_dtype: str
    status: str = "ok"  # ok | skipped | error
    error: str | None = None
    nll_sum: float = 0.0
    tokens_scored: int = 0
    perplexity: float | None = None
    top1_match_share: float | None = None  # next-token argmax = BF16's, over every scored position
    greedy_match_share: float | None = None
    greedy_mean_common_prefix_tokens: float | None = None
    top1_token_ids: list[int] = field(default_factory=list, repr=False)
    greedy_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    scales_log: str | None = None  # the server's "Maia KV cache ..." lines: what it quantized with
    startup_s: float = 0.0
    logprobs_s: float = 0.0
    greedy_s: float = 0.0
    wall_s: float = 0.0


# --- one live server per configuration ------------------------------------------------


def root_error(log: str) -> str:
    """The first ``SomethingError: message`` line of a failed server's log: the root cause
    (the engine re-raises it as "Engine core initialization failed" further down)."""
    found = re.findall(r"^(?:.*\] )?(\w+(?:Error|Exception): .+)$", log, flags=re.MULTILINE)
    return found[0].strip() if found else log.strip().splitlines()[-1] if log.strip() else "no output"


def server_env(config: KvConfig) -> dict[str, str]:
    """The host budget of the other benchmarks; only this configuration's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAIA_SERVING_DEVICE", "MAIA_SERVING_KV_SCALES", "MAIA_SERVING_KV_CACHE_DTYPE")
    }
    env.update(VLLM_CPU_CI_ENV="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    env.update(dict(config.env))
    return env


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _complete(url: str, body: dict) -> dict:
    return _post(f"{url}/v1/completions", {"model": "m", **body})["choices"][0]


def _generate(url: str, body: dict) -> dict:
    """SGLang's native ``/generate`` (its OpenAI API returns no prompt logprobs)."""
    return _post(f"{url}/generate", body)


def measure_sglang(url: str, workload: dict) -> dict:
    """``measure``'s figures through SGLang: each window's input-token logprobs (``logprob_start_len`` 0,
    the top one beside the actual token's) and greedy continuations as token ids."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        scored = list(
            pool.map(
                lambda w: _generate(
                    url,
                    {
                        "input_ids": w,
                        "return_logprob": True,
                        "logprob_start_len": 0,
                        "top_logprobs_num": 1,
                        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                    },
                ),
                workload["windows"],
            )
        )
        t1 = time.perf_counter()
        greedy = list(
            pool.map(
                lambda p: _generate(
                    url,
                    {
                        "input_ids": p,
                        "sampling_params": {
                            "max_new_tokens": workload["gen_tokens"],
                            "temperature": 0,
                            "ignore_eos": True,
                        },
                    },
                ),
                workload["prompts"],
            )
        )
    t2 = time.perf_counter()
    nll, top1 = 0.0, []
    for answer, window in zip(scored, workload["windows"]):
        meta = answer["meta_info"]
        # Entry i is the logprob of token i given the tokens before it (entry 0 has none).
        if [entry[1] for entry in meta["input_token_logprobs"]] != list(window):
            raise RuntimeError("SGLang scored other tokens than the window's")
        for entry, top in zip(meta["input_token_logprobs"][1:], meta["input_top_logprobs"][1:]):
            nll -= entry[0]
            top1.append(int(top[0][1]))
    return {
        "nll_sum": nll,
        "tokens_scored": len(top1),
        "top1_token_ids": top1,
        "greedy_token_ids": [g["output_ids"] for g in greedy],
        "logprobs_s": t1 - t0,
        "greedy_s": t2 - t1,
    }


def measure(url: str, workload: dict) -> dict:
    """Prompt logprobs over the windows and greedy continuations of the prompts, over HTTP."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        scored = list(
            pool.map(
                lambda w: _complete(url, {"prompt": w, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}),
                workload["windows"],
            )
        )
        t1 = time.perf_counter()
        greedy = list(
            pool.map(
                lambda p: _complete(
                    url,
                    {
                        "prompt": p,
                        "max_tokens": workload["gen_tokens"],
                        "temperature": 0,
                        "ignore_eos": True,
                        "return_token_ids": True,
                    },
                ),
                workload["prompts"],
            )
        )
    t2 = time.perf_counter()
    nll, top1 = 0.0, []
    for choice, window in zip(scored, workload["windows"]):
        for logprobs, token in zip(choice["prompt_logprobs"][1:], window[1:]):
            nll -= logprobs[str(token)]["logprob"]
            top1.append(int(next(t for t, lp in logprobs.items() if lp["rank"] == 1)))
    return {
        "nll_sum": nll,
        "tokens_scored": len(top1),
        "top1_token_ids": top1,
        "greedy_token_ids": [c["token_ids"] for c in greedy],
        "logprobs_s": t1 - t0,
        "greedy_s": t2 - t1,
    }


def sglang_command(config: KvConfig, model: Path, port: int, max_model_len: int) -> tuple[list[str], dict[str, str]]:
    """An SGLang server on maia for ``config``: FP8 under SGLang's own spellings, the block-scaled
    formats through MAIA_SERVING_KV_CACHE_DTYPE (as the README documents), radix cache off."""
    from tests.utils.launch import sglang_serve_cmd

    # SGLang keeps a few positions of the context free for output (a 256 context takes 250 input tokens):
    # allowed a longer context, it scores vLLM's 255-token windows, and no position past 256 is used.
    env = {**server_env(config), "MAIA_SERVING_HOST_KV_GIB": "1", "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
    kv = {"fp8": "fp8_e4m3"}.get(config.kv_cache_dtype, config.kv_cache_dtype)
    if kv.startswith(("mx", "nv")):
        env["MAIA_SERVING_KV_CACHE_DTYPE"], kv = kv, "auto"
    return sglang_serve_cmd(
        model,
        port,
        "--served-model-name",
        "m",
        "--context-length",
        str(max_model_len + 8),
        "--kv-cache-dtype",
        kv,
        "--disable-radix-cache",
        "--random-seed",
        "0",
    ), env


def run_config(
    config: KvConfig, model: Path, device: str, workload: dict, logs: Path, timeout_s: int, engine: str = "vllm"
) -> ConfigResult:
    from tests.utils.launch import Server, ServerFailed, free_port, vllm_serve_cmd

    result = ConfigResult(config.name, config.label, str(model), config.kv_cache_dtype)
    if config.maia_only and device != "maia":
        result.status, result.error = "skipped", f"{config.label} needs the maia attention backend (--device maia)"
        return result
    start = time.perf_counter()
    port = free_port()
    if engine == "sglang":
        cmd, env = sglang_command(config, model, port, workload["max_model_len"])
    else:
        cmd = vllm_serve_cmd(
            model,
            port,
            "--served-model-name",
            "m",
            "--max-model-len",
            str(workload["max_model_len"]),
            "--kv-cache-dtype",
            config.kv_cache_dtype,
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--seed",
            "0",
            device="maia" if device == "maia" else None,
        )
        env = server_env(config)
    log = logs / f"{engine}-{config.name}.log"
    try:
        with Server(cmd, port, log, env=env, timeout_s=timeout_s) as server:
            result.startup_s = time.perf_counter() - start
            data = (measure_sglang if engine == "sglang" else measure)(server.url, workload)
    except ServerFailed:
        result.status, result.error = "error", root_error(log.read_text())
        result.wall_s = time.perf_counter() - start
        return result
    result.wall_s = time.perf_counter() - start
    for key, value in data.items():
        setattr(result, key, value)
    result.perplexity = math.exp(result.nll_sum / result.tokens_scored)
    result.scales_log = (
        "\n".join(sorted({m.group(1) for m in re.finditer(r"(Maia KV cache [^\n]*scales[^\n]*)", log.read_text())}))
        or None
    )
    return result


def compare_with_bf16(results: list[ConfigResult]) -> None:
    """Top-1 and greedy agreement with the BF16 configuration, in place."""
    base = next((r for r in results if r.name == "bf16" and r.status == "ok"), None)
    if base is None:
        return
    for r in results:
        if r.status != "ok":
            continue
        r.top1_match_share = sum(a == b for a, b in zip(r.top1_token_ids, base.top1_token_ids)) / len(
            base.top1_token_ids
        )
        same, prefix = 0, 0
        for a, b in zip(r.greedy_token_ids, base.greedy_token_ids):
            same += a == b
            prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        r.greedy_match_share = same / len(base.greedy_token_ids)
        r.greedy_mean_common_prefix_tokens = prefix / len(base.greedy_token_ids)


def build_workload(model: Path, max_windows: int, num_prompts: int, prompt_tokens: int, gen_tokens: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from maia_serving.tools.training.train import HELDOUT_FILE, text_windows

    heldout = model / HELDOUT_FILE
    if not heldout.exists():
        raise FileNotFoundError(
            f"{heldout} does not exist: build the model with `maia-serving train-model --out {model}`"
        )
    context = AutoConfig.from_pretrained(model).max_position_embeddings
    ids = AutoTokenizer.from_pretrained(model)(heldout.read_text(), add_special_tokens=False)["input_ids"]
    windows = text_windows(ids, context - 1)  # vLLM needs room for one generated token
    if max_windows:
        windows = windows[:max_windows]
    if prompt_tokens + gen_tokens > context:
        raise ValueError(f"--prompt-tokens + --gen-tokens must fit the context of {context} tokens")
    step = max(1, len(windows) // num_prompts)
    prompts = [w[:prompt_tokens] for w in windows[::step][:num_prompts]]
    return {"windows": windows, "prompts": prompts, "gen_tokens": gen_tokens, "max_model_len": context}


def calibrate(model: Path, work: Path, fmt: str, max_tokens: int) -> Path:
    from maia_serving.tools.calibrate_kv import calibrate_kv
    from maia_serving.tools.training.train import CALIBRATION_FILE

    out = work / f"{model.name}-kv-{fmt}"
    calibrate_kv(model, [model / CALIBRATION_FILE], out, max_tokens=max_tokens, fmt=fmt, overwrite=True)
    return out


def qat_recovery(results: list[ConfigResult]) -> float | None:
    """The share of MXFP4's post-training perplexity loss against BF16 that QAT wins back (goal: >= 0.5)."""
    ppl = {r.name: r.perplexity for r in results if r.perplexity}
    if not {"bf16", "mxfp4", "mxfp4_qat"} <= ppl.keys() or ppl["mxfp4"] <= ppl["bf16"]:
        return None
    return (ppl["mxfp4"] - ppl["mxfp4_qat"]) / (ppl["mxfp4"] - ppl["bf16"])


def table(results: list[ConfigResult]) -> str:
    base = next((r.perplexity for r in results if r.name == "bf16" and r.perplexity), None)
    rows = [
        [
            "configuration",
            "kv_cache_dtype",
            "perplexity",
            "vs BF16",
            "top-1 = BF16",
            "greedy = BF16",
            "common prefix",
            "wall s",
        ]
    ]
    for r in results:
        if r.status != "ok":
            rows.append([r.label, r.kv_cache_dtype, r.status, "", "", "", "", f"{r.wall_s:.0f}"])
            continue
        delta = f"{100 * (r.perplexity / base - 1):+.3f}%" if base else ""
        top1 = f"{100 * r.top1_match_share:.2f}%" if r.top1_match_share is not None else ""
        match = f"{100 * r.greedy_match_share:.0f}%" if r.greedy_match_share is not None else ""
        prefix = f"{r.greedy_mean_common_prefix_tokens:.1f}" if r.greedy_mean_common_prefix_tokens is not None else ""
        rows.append([r.label, r.kv_cache_dtype, f"{r.perplexity:.3f}", delta, top1, match, prefix, f"{r.wall_s:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.label}: {r.status}: {r.error}" for r in results if r.status != "ok"]
    return "\n".join(lines + notes)


def plot(results: list[ConfigResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r.label.replace(" ", "\n", 2) for r in ok]
    ax1.bar_label(ax1.bar(labels, [r.perplexity for r in ok], color="tab:blue"), fmt="%.2f", fontsize=8)
    base = next((r.perplexity for r in ok if r.name == "bf16"), None)
    if base:
        ax1.axhline(base, color="black", linewidth=0.8, linestyle="--", label="BF16")
        ppls = [r.perplexity for r in ok]
        ax1.set_ylim(min(ppls) * 0.98, max(ppls) * 1.02)
        ax1.legend()
    ax1.set_ylabel("held-out perplexity (lower is better)")
    x = range(len(ok))
    for offset, key, name, color in (
        (-0.2, "top1_match_share", "next-token top-1 (% of positions)", "tab:green"),
        (0.2, "greedy_match_share", "32-token greedy output (% of prompts)", "tab:olive"),
    ):
        bars = ax2.bar(
            [i + offset for i in x], [100 * (getattr(r, key) or 0) for r in ok], 0.4, label=name, color=color
        )
        ax2.bar_label(bars, fmt="%.0f", fontsize=7)
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("same as BF16 (%)")
    ax2.legend(fontsize=7, loc="lower left")
    ax2.set_ylim(0, 105)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", choices=DEVICES, default="maia")
    parser.add_argument(
        "--engine",
        choices=("vllm", "sglang"),
        default="vllm",
        help="sglang: SGLang's server on --device maia, asked through its native /generate",
    )
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], default=[c.name for c in CONFIGS])
    parser.add_argument(
        "--max-windows",
        type=int,
        default=64,
        help="held-out windows to score; 0: all (167 for models/trained, ~9 min in all)",
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument(
        "--qat-model",
        type=Path,
        default=ROOT / "models" / "trained-qat-mxfp4",
        help="the `maia-serving qat-kv --format mxfp4` checkpoint (skipped when it does not exist)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "models" / "kv-accuracy", help="where the calibrated checkpoints go"
    )
    parser.add_argument("--timeout-s", type=int, default=300, help="for each server to start")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = args.model.resolve()
    workload = build_workload(model, args.max_windows, args.prompts, args.prompt_tokens, args.gen_tokens)
    configs = [c for c in CONFIGS if c.name in args.configs]
    if "bf16" not in args.configs:
        print("note: without bf16 there is no reference for the deltas and greedy agreement")
    checkpoints = {"base": model, "qat": args.qat_model.resolve()}
    if not (checkpoints["qat"] / "config.json").exists():
        print(
            f"note: no QAT checkpoint at {checkpoints['qat']}: write it with `maia-serving qat-kv --model {model} "
            f"--format mxfp4 --data {model / 'calibration.txt'} --out {checkpoints['qat']}`"
        )
        configs = [c for c in configs if c.checkpoint != "qat"]
    for fmt in sorted({c.checkpoint for c in configs} - {"base", "qat"}):
        checkpoints[fmt] = calibrate(model, args.work_dir, fmt, args.calibration_tokens)
    logs = OUT / "kv_accuracy-logs"
    logs.mkdir(parents=True, exist_ok=True)

    results = []
    for config in configs:
        print(f"[{config.name}] {config.kv_cache_dtype} on {checkpoints[config.checkpoint]} ...", flush=True)
        results.append(
            run_config(config, checkpoints[config.checkpoint], args.device, workload, logs, args.timeout_s, args.engine)
        )
        r = results[-1]
        print(
            f"[{config.name}] {r.status} in {r.wall_s:.0f} s"
            + (f": perplexity {r.perplexity:.3f}" if r.perplexity else f": {r.error}"),
            flush=True,
        )
    compare_with_bf16(results)

    tokens = sum(len(w) - 1 for w in workload["windows"])
    title = (
        f"{model.name} on {args.engine} --device {args.device}: {len(workload['windows'])} held-out windows "
        f"({tokens} tokens scored), {len(workload['prompts'])} greedy prompts"
    )
    print(f"\n{title}\n{table(results)}")
    recovery = qat_recovery(results)
    if recovery is not None:
        print(f"QAT wins back {100 * recovery:.0f}% of MXFP4's post-training perplexity loss against BF16 (goal: 50%)")
    training = model / "training.json"
    if training.exists() and not args.max_windows:  # train-model scored the same windows
        ref = json.loads(training.read_text())
        print(
            f"transformers on the same windows: perplexity {ref['heldout_ppl_hf_bf16']:.3f} (bf16), "
            f"{ref['heldout_ppl_hf_fp32']:.3f} (fp32)"
        )
    report = {
        "model": str(model),
        "engine": args.engine,
        "device": args.device,
        "windows": len(workload["windows"]),
        "window_tokens": len(workload["windows"][0]),
        "tokens_scored": tokens,
        "prompts": len(workload["prompts"]),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "calibration_tokens": args.calibration_tokens,
        "hf_reference": json.loads(training.read_text()) if training.exists() else None,
        "results": [{k: v for k, v in asdict(r).items() if not k.endswith("token_ids")} for r in results],
        "qat_recovery": recovery,
        "total_s": time.perf_counter() - start,
    }
    name = "kv_accuracy" if args.engine == "vllm" else f"kv_accuracy_{args.engine}"
    path = write_json(name, report)
    plot(results, title, OUT / f"{name}.png")
    print(f"\nwrote {path} and {OUT / f'{name}.png'} in {report['total_s']:.0f} s")
    return 0 if any(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""SGLang on maia and vLLM on maia: the same tokens and the same emulated KV capacity.

A briefly trained model (not the random demo model, whose flat logits turn every
rounding difference into a different token): greedy decoding of the same prompts on
both engines, in BF16, with the same profile and limits.
"""

import time
from pathlib import Path

import pytest

from maia_serving.launch import Server, free_port, scrape, sglang_serve_cmd, vllm_serve_cmd

PROMPTS = [f"def {name}(self" for name in ("run", "close", "read", "write", "add", "copy", "get", "set")] + [
    "import os\n", "class Parser:\n    def", "for line in", "if __name__ ==", "return self.", "    raise",
    "from collections import", "with open("]
MAX_TOKENS = 24
PROFILE = "maia100"
LIMITS_VLLM = ("--max-model-len", "256", "--max-num-batched-tokens", "2048", "--max-num-seqs", "64")
MODELS = Path(__file__).resolve().parents[2] / "models"
LIMITS_SGLANG = ("--context-length", "256", "--chunked-prefill-size", "2048", "--max-running-requests", "64")


@pytest.fixture(scope="module")
def trained_model():
    """models/trained when `make bench` made it; else a 60-step training (about 70 s, cached)."""
    from maia_serving.models.train import TrainConfig, train_model

    for path in (MODELS / "trained", MODELS / "trained-60"):
        if (path / "model.safetensors").exists():
            return path
    train_model(path, TrainConfig(steps=60))
    return path


# Two log-probabilities closer than this are a tie at BF16 precision: the engines' different
# rounding outside attention (GEMM order, norms, rotary) may pick either.
NEAR_TIE_NATS = 0.15


def greedy(server: Server) -> list[tuple[list[str], list[dict[str, float]]]]:
    """Per prompt: the greedy tokens and, at each, the top-5 log-probabilities."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    out = []
    for prompt in PROMPTS:
        choice = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           logprobs=5).choices[0]
        out.append((list(choice.logprobs.tokens), [dict(t) for t in choice.logprobs.top_logprobs]))
    return out


@pytest.fixture(scope="module")
def runs(trained_model, logs_dir):
    out = {}
    port = free_port()
    cmd = vllm_serve_cmd(trained_model, port, "--served-model-name", "m", *LIMITS_VLLM, "--enforce-eager",
                         "--additional-config", f'{{"maia_profile": "{PROFILE}"}}')
    with Server(cmd, port, logs_dir / "parity-vllm.log", env={"VLLM_CPU_CI_ENV": "1"}) as server:
        out["vllm"] = (greedy(server), scrape(server.url))
    port = free_port()
    cmd = sglang_serve_cmd(trained_model, port, "--served-model-name", "m", *LIMITS_SGLANG, "--enable-metrics")
    with Server(cmd, port, logs_dir / "parity-sglang.log", env={"MAIA_SERVING_PROFILE": PROFILE}) as server:
        texts = greedy(server)
        time.sleep(0.2)
        out["sglang"] = (texts, scrape(server.url))
    return out


def test_same_greedy_tokens_in_bf16_up_to_near_ties(runs):
    """Most sequences agree token for token; where one parts, it is at a near-tie.

    The attention numerics are shared (maia_serving.ops); the rest of each engine's model
    rounds differently in BF16, so where the two best tokens are within NEAR_TIE_NATS
    either engine may pick either, and the sequences part there. Seen: 0 of 12 prompts x
    32 tokens parted on the 60-step model; 2 of 16 on the 400-step one, each at a tie.
    """
    report, identical = [], 0
    for prompt, (v_tokens, v_top), (s_tokens, s_top) in zip(PROMPTS, runs["vllm"][0], runs["sglang"][0]):
        if v_tokens == s_tokens:
            identical += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(v_tokens, s_tokens)) if a != b)
        a, b = v_tokens[i], s_tokens[i]
        gaps = [abs(top[a] - top[b]) for top in (v_top[i], s_top[i]) if a in top and b in top]
        report.append(f"{prompt!r} parts at token {i}: vllm {a!r} / sglang {b!r}, log-prob gap {gaps}")
        assert gaps and min(gaps) < NEAR_TIE_NATS, "\n".join(report)
    print(f"{identical} of {len(PROMPTS)} identical;", *report, sep="\n")
    assert identical >= len(PROMPTS) * 3 // 4, "\n".join(report)


def test_same_emulated_kv_capacity(runs):
    """vLLM pages the CPU KV cache in blocks of 128 tokens, SGLang's emulated device in 16:
    the capacities agree to within one vLLM block."""
    vllm, sglang = runs["vllm"][1], runs["sglang"][1]
    key = 'maia:kv_cache_tokens{holder="emulated"}'
    assert vllm[key] > 0 and abs(vllm[key] - sglang[key]) < 128, (vllm[key], sglang[key])
    assert vllm["maia:hbm_total_bytes"] == sglang["maia:hbm_total_bytes"] == 64e9

"""A re-sharded checkpoint served by `vllm serve DST --device maia --load-format sharded_state -tp 2`
gives the original's greedy tokens: the demo model (GQA, 4 heads over 2 KV heads) and a tied-embedding
sibling, whose TP-2 files hold the head once, as `lm_head.weight`."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from maia_serving.launch import Server, free_port, vllm_serve_cmd
from maia_serving.models.reshard import reshard

PROMPTS = ["def main():", "import sys", "class Foo:"]
LIMITS = ("--max-model-len", "256", "--max-num-batched-tokens", "2048", "--max-num-seqs", "8")
ENV = {"VLLM_CPU_CI_ENV": "1", "MAIA_SERVING_LOG_INTERVAL_S": "1"}
# Two ranks on two cores: one core each (vLLM's auto binding asserts on a single NUMA node).
TP2_ENV = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % (os.cpu_count() or 1)) for i in range(2))}


def _greedy(model, log, env: dict, *extra: str) -> list[str]:
    from openai import OpenAI

    port = free_port()
    cmd = vllm_serve_cmd(model, port, "--served-model-name", "demo", *LIMITS, "--enforce-eager",
                         "--additional-config", '{"maia_profile": "maia100"}', *extra)
    with Server(cmd, port, log, env=env) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        return [client.completions.create(model="demo", prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in PROMPTS]


def _tied_sibling(demo_model, out):
    """The demo model with its embedding also as the output head (no lm_head.weight)."""
    shutil.copytree(demo_model, out)
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_sharded_state_tp2_serves_the_originals_tokens(demo_model, logs_dir, tmp_path, variant):
    original = demo_model if variant == "gqa" else _tied_sibling(demo_model, tmp_path / "tied")
    reshard(original, tmp_path / "tp2", 2)
    if variant == "tied":
        assert "model.embed_tokens.weight" not in load_file(tmp_path / "tp2" / "model-rank-0-part-0.safetensors")
    want = _greedy(original, logs_dir / f"reshard-{variant}-original.log", ENV)
    got = _greedy(tmp_path / "tp2", logs_dir / f"reshard-{variant}-tp2.log", TP2_ENV,
                  "--load-format", "sharded_state", "--tensor-parallel-size", "2")
    assert got == want
    assert all(want)

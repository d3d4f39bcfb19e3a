"""A re-sharded checkpoint served by `vllm serve DST --device maia --load-format sharded_state` computes what the
original does: each greedy token it serves is, up to a tie, the best one of transformers' float32 forward pass of
the original checkpoint over the served sequence (tests/utils/greedy_reference.py; no engine runs the originals).

The demo model (GQA, 4 heads over 2 KV heads) at TP 4 (each KV head on two ranks), a tied-embedding sibling at
PP 2 (the head once, as `lm_head.weight`, on the last stage; the embedding on the first; its TP slicing is the
demo model's, checked rank by rank in the unit tests), the Mixtral sibling at TP 2 (each expert's width split into
vLLM's fused w13 / w2 parameters), and the demo model re-sharded at TP 2 with FP8 weights, whose tokens are those
of its dequantized weights.

One server per case, so each case is one that no other covers: the plain demo model at TP 2 loads as the FP8
one does and at PP 2 as the tied one does (tests/unit/tools/test_reshard.py checks every layout's slices)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from maia_serving.tools.checkpoints.reshard import reshard
from tests.utils.greedy_reference import assert_computes_the_checkpoint, served_greedy
from tests.utils.launch import Server, free_port, vllm_serve_cmd

LIMITS = ("--max-model-len", "256", "--max-num-batched-tokens", "2048", "--max-num-seqs", "8")
EAGER = {"VLLM_CPU_CI_ENV": "1"}  # the eager compile backend: startup near 30 s


def _env(tp: int, pp: int) -> dict[str, str]:
    """One core a rank, round robin (vLLM's auto binding asserts on a single NUMA node). PP runs compiled:
    eager, vLLM's CPU model runner fails its second stage (`assert self.intermediate_tensors is not None`)."""
    env = {"MAIA_SERVING_LOG_INTERVAL_S": "1", **(EAGER if pp == 1 else {})}
    if tp * pp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp * pp))
    return env


def _greedy(model, log, tp: int, pp: int, *extra: str) -> list[tuple[list[int], list[int]]]:
    port = free_port()
    cmd = vllm_serve_cmd(
        model,
        port,
        "--served-model-name",
        "demo",
        *LIMITS,
        "--tensor-parallel-size",
        str(tp),
        "--pipeline-parallel-size",
        str(pp),
        *(["--enforce-eager"] if pp == 1 else []),
        "--additional-config",
        '{"maia_profile": "maia100"}',
        *extra,
    )
    with Server(cmd, port, log, env=_env(tp, pp)) as server:
        return served_greedy(server)


def _tied_sibling(demo_model, out):
    """The demo model with its embedding also as the output head (no lm_head.weight)."""
    shutil.copytree(demo_model, out)
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return out


def _dequantized_sibling(demo_model, out):
    """The demo model with each linear weight as FP8 computes with it: its E4M3 value times its row's scale (the
    row's largest magnitude over 448), in BF16. Written here apart from reshard's own quantizer."""
    shutil.copytree(demo_model, out)
    tensors = load_file(out / "model.safetensors")
    for name, weight in tensors.items():
        if name.endswith("_proj.weight"):
            scale = weight.float().abs().amax(1, keepdim=True) / 448
            e4m3 = (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name] = (e4m3.float() * scale).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def variants(demo_model, moe_model, tmp_path_factory) -> dict:
    """Each variant's checkpoint to re-shard, its weight dtype, and the checkpoint whose computation it should
    serve (itself; for FP8, its dequantized sibling)."""
    tied = _tied_sibling(demo_model, tmp_path_factory.mktemp("tied") / "model")
    dequantized = _dequantized_sibling(demo_model, tmp_path_factory.mktemp("dequantized") / "model")
    return {
        "gqa": (demo_model, "auto", demo_model),
        "tied": (tied, "auto", tied),
        "moe": (moe_model, "auto", moe_model),
        "fp8": (demo_model, "fp8", dequantized),
    }


@pytest.mark.parametrize("variant,tp,pp", [("gqa", 4, 1), ("tied", 1, 2), ("moe", 2, 1), ("fp8", 2, 1)])
def test_sharded_state_serves_the_originals_tokens(variants, logs_dir, tmp_path, variant, tp, pp):
    model, weight_dtype, reference = variants[variant]
    reshard(model, tmp_path / "sharded", tp, pp, weight_dtype=weight_dtype)
    first = "model-rank-0-part-0.safetensors" if pp == 1 else "model-pp-0-tp-0-part-0.safetensors"
    assert ("model.embed_tokens.weight" in load_file(tmp_path / "sharded" / first)) == (variant != "tied" or pp > 1)
    got = _greedy(
        tmp_path / "sharded",
        logs_dir / f"reshard-{variant}-tp{tp}-pp{pp}.log",
        tp,
        pp,
        "--load-format",
        "sharded_state",
    )
    assert_computes_the_checkpoint(got, reference)

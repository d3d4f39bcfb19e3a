"""The maia torch device: what the emulation costs on the host, and whether its prices agree with the serving
path's cost model.

1. Host overhead: the same model's forward on the CPU and on maia (median of repeats, wall seconds on this
   host), a CNN and a transformers Llama; and one small operator's overhead in microseconds (the record
   and pricing of each operator are the device's cost; the CPU kernel is the same). Goal: maia within 1.3x
   of the CPU.
2. One cost model, two ways in: a transformers Llama prefill priced per aten operator on maia against the
   serving cost model's price for the same shape and step (`emulator.cost.step_cost`), both on Maia 200 in
   BF16, itemized by kind (GEMMs, attention, the rest, launches).

    cd benchmarks && ../.venv-vllm/bin/python torch_device.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict

import common  # noqa: F401  (the repository root on the path)
import torch
from torch import nn

import maia_serving.torch as maia_torch
from maia_serving.emulator.cost.model import StepShape, step_cost
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.model_shape import shape_from_config


def timed(fn, repeats: int) -> float:
    fn()  # warm: allocator, first-call paths
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cnn() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    for c_in, c_out in ((32, 64), (64, 128), (128, 128)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def llama(config: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).eval().to(torch.bfloat16)


def overhead(repeats: int) -> dict:
    """Wall seconds on the CPU, on maia (aliasing fallback), and on maia through PyTorch's own copying
    ``at::native::cpu_fallback``."""
    from maia_serving.torch import extension

    rows = {}
    for name, model, x in (
        ("cnn (4 conv blocks, batch 16, 64x64)", cnn(), torch.randn(16, 3, 64, 64)),
        ("llama (1024 x 8 layers, bf16, 256 tokens)", llama(LLAMA), torch.randint(0, 32000, (1, 256))),
    ):
        on_maia, x_maia = copy.deepcopy(model).to("maia"), x.to("maia")
        with torch.no_grad():
            cpu_s = timed(lambda m=model, x=x: m(x), repeats)
            run_maia = lambda m=on_maia, x=x_maia: (m(x), maia_torch.clock_s())  # noqa: E731 (priced as it goes)
            maia_s = timed(run_maia, repeats)
            extension.load_built().use_copying_fallback(True)
            copying_s = timed(run_maia, repeats)
            extension.load_built().use_copying_fallback(False)
        rows[name] = {
            "cpu_s": cpu_s,
            "maia_s": maia_s,
            "ratio": maia_s / cpu_s,
            "maia_copying_fallback_s": copying_s,
            "copying_ratio": copying_s / cpu_s,
        }
    a, b = torch.randn(1024), torch.randn(1024)
    am, bm = a.to("maia"), b.to("maia")
    n = 2000
    cpu_op = timed(lambda: [torch.add(a, b) for _ in range(n)], 5) / n
    maia_op = timed(lambda: ([torch.add(am, bm) for _ in range(n)], maia_torch.clock_s()), 5) / n
    rows["add of 1024 floats, per operator"] = {"cpu_us": cpu_op * 1e6, "maia_us": maia_op * 1e6}
    return rows


KINDS = {"mm": "gemm", "addmm": "gemm", "bmm": "gemm", "_scaled_dot_product_fused_attention_overrideable": "attention"}
SERVING_KINDS = {
    "qkv_proj": "gemm",
    "o_proj": "gemm",
    "gate_up_proj": "gemm",
    "down_proj": "gemm",
    "lm_head": "gemm",
    "attention": "attention",
}


def cross_check(tokens: int) -> dict:
    """Per kind: emulated seconds on the torch device and in the serving cost model (compute or memory time
    of its operators; launches apart)."""
    maia_torch.set_profile("maia200")
    profile = load_profile("maia200")
    model = llama(LLAMA).to("maia")
    ids = torch.randint(0, LLAMA["vocab_size"], (1, tokens), device="maia")
    with torch.no_grad(), maia_torch.profile() as prof:
        model(ids, logits_to_keep=1)  # as an engine's prefill: the LM head for the last token only
    torch_kinds: dict[str, float] = defaultdict(float)
    for op in prof.ops:
        name = op.op.partition("::")[2].partition(".")[0]
        torch_kinds[KINDS.get(name, "other")] += max(op.compute_s, op.memory_s) + op.link_s
        torch_kinds["launch"] += op.launch_s
    serving = step_cost(profile, shape_from_config(LLAMA), StepShape.of([(tokens, tokens)]))
    serving_kinds: dict[str, float] = defaultdict(float)
    for op in serving.ops:
        serving_kinds[SERVING_KINDS.get(op.name, "other")] += op.time_s
    serving_kinds["launch"] = serving.launch_s
    kinds = sorted(set(torch_kinds) | set(serving_kinds))
    return {
        "tokens": tokens,
        "torch_device_s": prof.total_s,
        "serving_s": serving.total_s,
        "torch_operators": len(prof.ops),
        "by_kind": {k: {"torch_device_s": torch_kinds[k], "serving_s": serving_kinds[k]} for k in kinds},
        "without_launches": {
            "torch_device_s": prof.total_s - torch_kinds["launch"],
            "serving_s": serving.total_s - serving.launch_s,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"overhead": overhead(args.repeats), "cross_check": cross_check(args.tokens)}
    common.OUT.mkdir(exist_ok=True)
    (common.OUT / "torch_device.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Llama as transformers builds it (``LlamaForCausalLM``), sized from the emulator's own shapes
(``emulator/shapes/llama-3-8b.json``: the published config.json's architecture fields), so `profile` and the
serving emulator price the same model; and a tiny one of the same family for tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch

from maia_serving.zoo import BuiltIn, Example, logits

TINY = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
# Meta's model card: 8B parameters (8.03 B in its safetensors index).
PUBLISHED = {"llama-3-8b": 8_030_261_248}


def config_of(name: str) -> dict[str, Any]:
    if name == "llama-tiny":
        return TINY
    text = (resources.files("maia_serving.emulator") / "shapes" / f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_llama(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).eval()


def builtins() -> list[BuiltIn]:
    def build(name: str) -> Callable[[int, int | None], Example]:
        def make(batch: int, shape: int | None) -> Example:
            config = config_of(name)
            tokens = torch.randint(0, config["vocab_size"], (batch, shape or 128))
            return Example(build_llama(config), (tokens,), "sequences", batch, logits)

        return make

    return [
        BuiltIn("llama-tiny", "Llama, 2 layers of width 128 (tests)", build("llama-tiny")),
        BuiltIn(
            "llama-3-8b",
            "Llama 3 8B (a 128-token prefill)",
            build("llama-3-8b"),
            PUBLISHED["llama-3-8b"],
            "Meta Llama 3 model card; safetensors index",
        ),
    ]

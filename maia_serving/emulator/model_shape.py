"""ModelShape: the few numbers of a decoder-only transformer the emulator needs.

Read from a Hugging Face ``config.json`` (or a directory holding one), so the
capacity and cost models work from a shape alone, without weights or an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# Bytes per element of the dtypes the engines use, by the names they use for them.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "int8": 1,
    "fp4": 0.5,
}

# `--kv-cache-dtype` values; "auto" stores the KV cache in the model's dtype.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")


def dtype_bytes(name: str) -> float:
    """Element size of ``name`` (e.g. "bfloat16", "fp8_e4m3"); a clear error otherwise."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def kv_cache_bytes_per_element(kv_cache_dtype: str, model_dtype: str) -> float:
    """Bytes per stored KV element for a ``--kv-cache-dtype`` value."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"unknown kv cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}"
        )
    return dtype_bytes(model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype)


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Llama-style decoder (gated MLP, GQA, optional tied embeddings)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    max_position_embeddings: int

    @property
    def dtype_bytes(self) -> float:
        return dtype_bytes(self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention projections, gated MLP, two norms."""
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        """Input embedding plus LM head (counted once when tied) plus the final norm."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def weight_bytes(self) -> float:
        return self.num_params() * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "num_params": self.num_params()}


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """Build a ModelShape from a parsed HF ``config.json``; names the missing key if any."""
    text = config.get("text_config", config)
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        shape = ModelShape(
            name=name,
            hidden_size=hidden,
            num_layers=int(text["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype=str(text.get("torch_dtype") or text.get("dtype") or "bfloat16"),
            max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        )
    except KeyError as exc:
        raise ValueError(f"config.json of {name!r} lacks {exc.args[0]!r}; is it a decoder LLM?") from exc
    dtype_bytes(shape.dtype)
    return shape


def builtin_model_names() -> list[str]:
    folder = resources.files("maia_serving.emulator") / "models"
    return sorted(Path(str(p)).stem for p in folder.iterdir() if str(p).endswith(".json"))


def load_model_shape(spec: str | Path) -> ModelShape:
    """A shape from a model directory, a ``config.json`` path, or a built-in name."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        builtin = Path(str(resources.files("maia_serving.emulator") / "models" / f"{spec}.json"))
        if not builtin.exists():
            raise FileNotFoundError(
                f"no model config at {spec!r}: give a model directory, a config.json, or one of "
                f"the built-in shapes: {', '.join(builtin_model_names())}"
            )
        path = builtin
    name = path.parent.name if path.name == "config.json" else path.stem
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a valid config.json (a JSON object is expected)")
    try:
        return shape_from_config(config, name=name)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None

"""Models built locally: no model hub is reachable from where this runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaShape:
    """The LlamaConfig fields our locally built models choose; the defaults are the demo's."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention wants a multiple of 32
    max_position_embeddings: int = 2048

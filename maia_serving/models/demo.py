"""The demo model: a tiny Llama with random weights, for plumbing, not for quality.

Deterministic: the same seed and the same Python give the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maia_serving.models.tokenizer import stdlib_files, train_tokenizer


@dataclass(frozen=True)
class DemoShape:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention wants a multiple of 32
    max_position_embeddings: int = 2048


def build_demo_model(out: Path, seed: int = 0, shape: DemoShape = DemoShape(),
                     tokenizer_files: int = 60) -> Path:
    """Write config, bf16 safetensors weights and a tokenizer with a chat template."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size, stdlib_files(tokenizer_files))
    config = LlamaConfig(
        **shape.__dict__,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

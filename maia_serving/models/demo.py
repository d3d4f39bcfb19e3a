"""The demo model: a tiny Llama with random weights, for plumbing, not for quality.

Deterministic: the same seed and the same Python give the same files.
"""

from __future__ import annotations

from pathlib import Path

from maia_serving.models import LlamaShape
from maia_serving.models.outdir import output_dir
from maia_serving.models.tokenizer import stdlib_files, train_tokenizer

DEMO_SHAPE = LlamaShape()


def build_demo_model(out: Path, seed: int = 0, shape: LlamaShape = DEMO_SHAPE,
                     tokenizer_files: int = 60, overwrite: bool = False) -> Path:
    """Write config, bf16 safetensors weights and a tokenizer with a chat template."""
    with output_dir(out, overwrite) as work:
        _write_demo_model(work, seed, shape, tokenizer_files)
    return out


def _write_demo_model(out: Path, seed: int, shape: LlamaShape, tokenizer_files: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

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

"""The demo models: tiny random transformers, for plumbing, not for quality.

``llama`` is the demo model; ``sliding-window`` (Mistral: every layer windowed),
``hybrid-window`` (Olmo-3: a windowed layer, then a full one; SGLang's code windows it, not
Mistral) and ``moe`` (Mixtral) share its shape and tokenizer and bring the model families the
engines treat apart: attention over the last few keys only, and routed experts.
Deterministic: the same seed and the same Python give the same files.
"""

from __future__ import annotations

from pathlib import Path

from maia_serving.tools.outdir import output_dir
from maia_serving.tools.training import LlamaShape
from maia_serving.tools.training.tokenizer import stdlib_files, train_tokenizer

DEMO_SHAPE = LlamaShape()
# Small enough that a short prompt outgrows it, so the window changes what the model sees.
DEMO_SLIDING_WINDOW = 16
DEMO_EXPERTS, DEMO_EXPERTS_PER_TOKEN = 4, 2
# The families' extra config fields and their transformers classes (config, model).
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "sliding-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": DEMO_SLIDING_WINDOW}),
    "hybrid-window": (
        "Olmo3Config",
        "Olmo3ForCausalLM",
        {
            "sliding_window": DEMO_SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "moe": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            "num_local_experts": DEMO_EXPERTS,
            "num_experts_per_tok": DEMO_EXPERTS_PER_TOKEN,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        },
    ),
}


def build_demo_model(
    out: Path,
    seed: int = 0,
    shape: LlamaShape = DEMO_SHAPE,
    tokenizer_files: int = 60,
    overwrite: bool = False,
    family: str = "llama",
) -> Path:
    """Write config, bf16 safetensors weights and a tokenizer with a chat template."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    with output_dir(out, overwrite) as work:
        _write_demo_model(work, seed, shape, tokenizer_files, family)
    return out


def _write_demo_model(out: Path, seed: int, shape: LlamaShape, tokenizer_files: int, family: str) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig

    config_name, model_name, extra = FAMILIES[family]
    tokenizer = train_tokenizer(shape.vocab_size, stdlib_files(tokenizer_files))
    config = getattr(transformers, config_name)(
        **shape.__dict__,
        **extra,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

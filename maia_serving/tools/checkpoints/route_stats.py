"""``maia-serving route-stats``: count which experts a MoE checkpoint's routers choose on some text,
as the ``--expert-load`` file of ``simulate`` and ``plan`` (``emulator/routing.py``).

The model runs in transformers on the host (float32, no cache) over windows of the text, asked for its
router logits (``output_router_logits``, which transformers' MoE families return per MoE layer); a
token's experts are its ``top_k`` largest logits, which is the choice of a softmax-then-top-k router
(Mixtral, Qwen2/3-MoE, gpt-oss). Routers that bias or group their choice (DeepSeek-V3's
``e_score_correction_bias``, group-limited routing) choose otherwise, and are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# config.json keys of routers whose choice is not the top-k logits.
_OTHER_ROUTERS = ("topk_group", "n_group", "routed_scaling_factor")


def route_counts(
    model_dir: Path, data: list[Path], max_tokens: int = 65536, seq_len: int = 256, progress: bool = True
) -> dict:
    """Per MoE layer, how many of ``data``'s tokens (at most ``max_tokens``) chose each expert."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maia_serving.emulator.model_shape import load_model_shape
    from maia_serving.tools.training.qat import data_stream

    model_dir = Path(model_dir)
    shape = load_model_shape(model_dir)
    if shape.moe is None:
        raise ValueError(
            f"{model_dir}: {shape.name} has no routed experts (a dense model); route-stats counts a "
            "MoE model's expert choices"
        )
    config = json.loads((model_dir / "config.json").read_text())
    other = [k for k in _OTHER_ROUTERS if config.get(k) not in (None, 1, 1.0)]
    if other:
        raise ValueError(
            f"{model_dir}: its router chooses by more than its top-k logits ({', '.join(other)} in "
            "config.json); route-stats counts softmax-then-top-k routers only"
        )
    if max_tokens < 1 or seq_len < 2:
        raise ValueError("--max-tokens must be at least 1 and windows at least 2 tokens")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = data_stream(tokenizer, data, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = min(seq_len, model.config.max_position_embeddings)
    experts, top_k = shape.moe.num_experts, shape.moe.top_k
    counts = torch.zeros(shape.num_moe_layers, experts, dtype=torch.long)
    with torch.no_grad():
        for start in tqdm(range(0, len(stream), seq), desc="route-stats", unit="window", disable=not progress):
            out = model(input_ids=stream[None, start : start + seq], use_cache=False, output_router_logits=True)
            logits = getattr(out, "router_logits", None)
            if not logits or len(logits) != shape.num_moe_layers:
                raise ValueError(
                    f"{model_dir}: transformers returned {len(logits or ())} router outputs for "
                    f"{shape.num_moe_layers} MoE layers; this model type does not report its routing"
                )
            for layer, layer_logits in enumerate(logits):
                chosen = layer_logits.reshape(-1, experts).topk(top_k, dim=-1).indices
                counts[layer] += torch.bincount(chosen.flatten(), minlength=experts)
    files = ", ".join(p.name for p in data[:3]) + (f" and {len(data) - 3} more" if len(data) > 3 else "")
    return {
        "source": f"maia-serving route-stats: {model_dir.name}, {len(stream)} tokens of {files}",
        "model": str(model_dir),
        "tokens": len(stream),
        "top_k": top_k,
        "layers": counts.tolist(),
    }

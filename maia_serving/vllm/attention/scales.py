"""KV-cache scales for the maia backend: per-tensor from the checkpoint (what vLLM
loads into ``layer._k_scale``), per-head from the ``maia_kv_scales.json`` sidecar that
``maia-serving calibrate-kv`` writes beside it."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

SIDECAR = "maia_kv_scales.json"
# "per_head" makes the backend use the sidecar's per-(layer, KV head) scales.
SCALES_ENV = "MAIA_SERVING_KV_SCALES"
SCALE_MODES = ("per_tensor", "per_head")


def scale_mode() -> str:
    mode = os.environ.get(SCALES_ENV, "per_tensor").strip().lower() or "per_tensor"
    if mode not in SCALE_MODES:
        raise ValueError(f"{SCALES_ENV}={mode!r} is not valid; allowed: {', '.join(SCALE_MODES)}")
    return mode


def checkpoint_has_kv_scales(hf_config: object) -> bool:
    """Whether the checkpoint declares calibrated KV scales (a kv_cache_scheme or fp8 kv)."""
    quant = getattr(hf_config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = getattr(quant, "to_dict", lambda: {})()
    return bool(quant.get("kv_cache_scheme")) or quant.get("kv_cache_quant_algo") is not None


@lru_cache(maxsize=4)
def load_sidecar(model_dir: str) -> dict | None:
    path = Path(model_dir) / SIDECAR
    return json.loads(path.read_text()) if path.exists() else None


def layer_index(layer_name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", layer_name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return int(match.group(1))


def per_head_scales(model_dir: str, layer_name: str, num_kv_heads: int, tp_rank: int,
                    tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of one layer's per-head K and V scales from the sidecar."""
    sidecar = load_sidecar(model_dir)
    if sidecar is None:
        raise FileNotFoundError(
            f"{SCALES_ENV}=per_head but {Path(model_dir) / SIDECAR} does not exist; run "
            f"`maia-serving calibrate-kv --model {model_dir} --data FILE --out DIR` and serve DIR"
        )
    entry = sidecar["layers"][str(layer_index(layer_name))]
    total = len(entry["k"])
    # A rank holds heads [rank * n, (rank + 1) * n), or all of them when they are replicated.
    first = 0 if total == num_kv_heads else tp_rank * num_kv_heads
    if first + num_kv_heads > total:
        raise ValueError(f"{SIDECAR} has {total} KV heads for {layer_name}; rank {tp_rank} of {tp_size} "
                         f"needs heads {first}..{first + num_kv_heads - 1}")
    k = torch.tensor(entry["k"][first:first + num_kv_heads], dtype=torch.float32)
    v = torch.tensor(entry["v"][first:first + num_kv_heads], dtype=torch.float32)
    return k, v

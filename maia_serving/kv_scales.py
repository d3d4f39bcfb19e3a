"""KV-cache scales for the maia attention backends (vLLM and SGLang alike).

Per-tensor scales come from the checkpoint or a scales file, through the engine (vLLM's
``layer._k_scale``, SGLang's ``layer.k_scale``); per-head ones from the
``maia_kv_scales.json`` sidecar that ``maia-serving calibrate-kv`` writes beside the
weights. Imports no engine."""

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
    """Whether the checkpoint declares calibrated KV scales (a kv_cache_scheme or fp8 kv).

    ``hf_config`` is a transformers config or the parsed config.json."""
    if isinstance(hf_config, dict):
        quant = hf_config.get("quantization_config") or {}
    else:
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


def calibrate_command(model_dir: str) -> str:
    return f"maia-serving calibrate-kv --model {model_dir} --data FILE.txt --out {model_dir}-kv-fp8"


def require_sidecar(model_dir: str) -> dict:
    """The sidecar, or an error that says how to make one."""
    sidecar = load_sidecar(model_dir)
    if sidecar is None:
        raise ValueError(f"{SCALES_ENV}=per_head needs {SIDECAR} in {model_dir}; run "
                         f"`{calibrate_command(model_dir)}` and serve the output directory")
    return sidecar


def missing_scales_warning(cache_dtype: str, model_dir: str) -> str:
    """The loud warning for an FP8 cache without calibrated scales (never a quiet 1.0)."""
    bar = "!" * 80
    return (f"\n{bar}\nKV cache {cache_dtype} but {model_dir} has no calibrated KV-cache scales: every "
            "scale is 1.0, which clips keys and values beyond the format's range and wastes its "
            f"precision below it.\nCalibrate: {calibrate_command(model_dir)}\n"
            f"then serve the output directory.\n{bar}")


def per_head_scales(model_dir: str, layer: int, num_kv_heads: int, tp_rank: int,
                    tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of layer ``layer``'s per-head K and V scales from the sidecar."""
    entry = require_sidecar(model_dir)["layers"][str(layer)]
    total = len(entry["k"])
    # A rank holds heads [rank * n, (rank + 1) * n), or all of them when they are replicated.
    first = 0 if total == num_kv_heads else tp_rank * num_kv_heads
    if first + num_kv_heads > total:
        raise ValueError(f"{SIDECAR} has {total} KV heads for layer {layer}; rank {tp_rank} of {tp_size} "
                         f"needs heads {first}..{first + num_kv_heads - 1}")
    k = torch.tensor(entry["k"][first:first + num_kv_heads], dtype=torch.float32)
    v = torch.tensor(entry["v"][first:first + num_kv_heads], dtype=torch.float32)
    return k, v

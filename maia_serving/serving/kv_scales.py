"""KV-cache scales for the maia attention backends (vLLM and SGLang alike).

Per-tensor scales come from the checkpoint or a scales file, through the engine (vLLM's
``layer._k_scale``, SGLang's ``layer.k_scale``); per-head ones from the
``maia_kv_scales.json`` sidecar that ``maia-serving calibrate-kv`` writes beside the
weights. Every file is read and checked before the engine loads anything: a file that
does not parse, lacks a layer or holds a scale that is not a positive number stops the
server with the file's name, never a silent 1.0. Imports no engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from maia_serving import envs

if TYPE_CHECKING:
    import torch

SIDECAR = "maia_kv_scales.json"

logger = logging.getLogger(__name__)


class ScalesFileError(ValueError):
    """A scales file that cannot be used; the message names the file and what is wrong."""


def scale_mode() -> str:
    mode: str = envs.get(envs.MAIA_SERVING_KV_SCALES)  # a _choice setting: one of its strings
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


def calibrate_command(model_dir: str) -> str:
    return f"maia-serving calibrate-kv --model {model_dir} --data FILE.txt --out {model_dir}-kv-fp8"


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalesFileError(
            f"{what} {path} does not exist; write it with `{calibrate_command('MODEL')}` "
            f"(kv_cache_scales.json and {SIDECAR} in the output)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScalesFileError(
            f"{what} {path} cannot be read as JSON ({exc}); write it again with `{calibrate_command(str(path.parent))}`"
        ) from None


def _scale(value: object, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ScalesFileError(f"{path}: {where} is {value!r}, not a positive finite scale")
    return float(value)


def _layers(doc: object, path: Path, key_path: tuple[str, ...], num_layers: int) -> dict[str, object]:
    """``doc[key_path]``, a mapping with one entry per layer ``0..num_layers-1``."""
    node = doc
    for key in key_path:
        if not isinstance(node, dict) or key not in node:
            raise ScalesFileError(f"{path} has no {'.'.join(key_path)} (read {key!r})")
        node = node[key]
    if not isinstance(node, dict):
        raise ScalesFileError(f"{path}: {'.'.join(key_path)} must map layer numbers to scales")
    missing = [i for i in range(num_layers) if str(i) not in node]
    if missing:
        raise ScalesFileError(
            f"{path} lacks scales for layer(s) {missing[:8]} of the model's {num_layers}; "
            "was it calibrated for another model?"
        )
    return node


@lru_cache(maxsize=4)
def load_sidecar(model_dir: str, num_layers: int, num_kv_heads: int) -> dict[int, tuple[list[float], list[float]]]:
    """Per layer, the K and V scale of every KV head, from ``model_dir``'s sidecar (checked)."""
    path = Path(model_dir) / SIDECAR
    if not path.exists():
        raise ScalesFileError(
            f"{envs.MAIA_SERVING_KV_SCALES}=per_head needs {SIDECAR} in {model_dir}; run "
            f"`{calibrate_command(model_dir)}` and serve the output directory"
        )
    layers = _layers(_read_json(path, "the per-head scales file"), path, ("layers",), num_layers)
    out: dict[int, tuple[list[float], list[float]]] = {}
    for i in range(num_layers):
        entry = layers[str(i)]
        pair: list[list[float]] = []
        for kind in ("k", "v"):
            values = entry.get(kind) if isinstance(entry, dict) else None
            if not isinstance(values, list) or len(values) != num_kv_heads:
                raise ScalesFileError(
                    f"{path}: layer {i} needs {num_kv_heads} {kind.upper()} scales (one per KV "
                    f"head), found {values!r:.80}"
                )
            pair.append([_scale(x, path, f"layer {i} {kind}[{h}]") for h, x in enumerate(values)])
        out[i] = (pair[0], pair[1])
    return out


def load_sglang_scales_file(path: str | Path, num_layers: int) -> dict[int, float]:
    """Per layer, the scale in an SGLang ``--quantization-param-path`` file (tensor-parallel rank 0)."""
    path = Path(path)
    layers = _layers(
        _read_json(path, "--quantization-param-path"), path, ("kv_cache", "scaling_factor", "0"), num_layers
    )
    return {i: _scale(layers[str(i)], path, f"layer {i}") for i in range(num_layers)}


def model_dims(hf_config: dict[str, Any]) -> tuple[int, int]:
    """(layers, KV heads) of a parsed config.json."""
    text = hf_config.get("text_config") or hf_config
    layers = text["num_hidden_layers"]
    return layers, text.get("num_key_value_heads") or text["num_attention_heads"]


def check_fp8_scales(
    cache_dtype: str, model_dir: str, hf_config: dict[str, Any], scales_file: str | None = None
) -> str:
    """Which scales an FP8 KV cache will use, after checking every file they come from:
    "per_head" (the sidecar), "file" (an engine's scales file), "checkpoint", or "none"
    (after the loud warning). Engine-specific rules are the adapters' to add."""
    layers, kv_heads = model_dims(hf_config)
    if scale_mode() == "per_head":
        load_sidecar(model_dir, layers, kv_heads)
        return "per_head"
    if scales_file:
        load_sglang_scales_file(scales_file, layers)
        return "file"
    if checkpoint_has_kv_scales(hf_config):
        return "checkpoint"
    logger.warning(missing_scales_warning(cache_dtype, model_dir))
    return "none"


def show_scales(scale: object) -> str:
    """A scale (float or tensor of per-head values) for the log line both backends write."""
    values = scale.reshape(-1).tolist() if hasattr(scale, "reshape") else [scale]
    return ",".join(f"{x:.4g}" for x in values)


def layer_index(layer_name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", layer_name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return int(match.group(1))


def missing_scales_warning(cache_dtype: str, model_dir: str) -> str:
    """The loud warning for an FP8 cache without calibrated scales (never a quiet 1.0)."""
    bar = "!" * 80
    return (
        f"\n{bar}\nKV cache {cache_dtype} but {model_dir} has no calibrated KV-cache scales: every "
        "scale is 1.0, which clips keys and values beyond the format's range and wastes its "
        f"precision below it.\nCalibrate: {calibrate_command(model_dir)}\n"
        f"then serve the output directory.\n{bar}"
    )


def per_head_scales(
    model_dir: str, num_layers: int, total_kv_heads: int, layer: int, num_kv_heads: int, tp_rank: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of layer ``layer``'s per-head K and V scales from the sidecar, as tensors."""
    import torch

    k, v = load_sidecar(model_dir, num_layers, total_kv_heads)[layer]
    # A rank holds heads [rank * n, (rank + 1) * n); with more ranks than heads, consecutive
    # ranks hold replicas of one head.
    if tp_size > total_kv_heads:
        first = tp_rank * total_kv_heads // tp_size
    else:
        first = 0 if total_kv_heads == num_kv_heads else tp_rank * num_kv_heads
    if first + num_kv_heads > total_kv_heads:
        raise ValueError(
            f"{SIDECAR} has {total_kv_heads} KV heads for layer {layer}; rank {tp_rank} of {tp_size} "
            f"needs heads {first}..{first + num_kv_heads - 1}"
        )
    return (
        torch.tensor(k[first : first + num_kv_heads], dtype=torch.float32),
        torch.tensor(v[first : first + num_kv_heads], dtype=torch.float32),
    )


def check_nvfp4_scales(model_dir: str, hf_config: dict[str, Any]) -> None:
    """An NVFP4 cache's tensor scales come from the calibrated sidecar: it must exist and match the model."""
    if not (Path(model_dir) / SIDECAR).exists():
        raise ScalesFileError(
            f"an nvfp4 KV cache needs calibrated tensor scales, and {model_dir} has no {SIDECAR}; "
            f"run `{calibrate_command(model_dir)}` and serve the output directory"
        )
    load_sidecar(model_dir, *model_dims(hf_config))


@lru_cache(maxsize=4)
def _sidecar_format(model_dir: str) -> str:
    """The FP8 format the sidecar's scales were calibrated for (read once, not once per layer)."""
    # Untyped JSON: load_sidecar checks its shape; a document that is no mapping fails on .get, as before.
    doc = cast(dict[str, object], _read_json(Path(model_dir) / SIDECAR, "the per-head scales file"))
    return str(doc.get("format", "e4m3"))


def nvfp4_tensor_scales(
    model_dir: str, num_layers: int, total_kv_heads: int, layer: int, num_kv_heads: int, tp_rank: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor] | tuple[float, float]:
    """NVFP4's tensor scales for this rank's heads of ``layer``: ``t = amax / (6 x 448)`` from the
    sidecar's calibrated absmax, so the largest block's E4M3 scale is E4M3's largest (E2M1's 6
    times it covers amax). One per KV head with MAIA_SERVING_KV_SCALES=per_head, else the
    layer's largest, as a per-tensor FP8 scale is."""
    from maia_serving.ops.fp8 import get_fp8_format
    from maia_serving.ops.mx import MX_FORMATS

    calibrated = get_fp8_format(_sidecar_format(model_dir))
    nvfp4 = MX_FORMATS["nvfp4"]
    to_tensor_scale = calibrated.max_value / (nvfp4.element.max_value * get_fp8_format("e4m3").max_value)
    scales = [
        s * to_tensor_scale
        for s in per_head_scales(model_dir, num_layers, total_kv_heads, layer, num_kv_heads, tp_rank, tp_size)
    ]
    if scale_mode() == "per_head":
        return scales[0], scales[1]
    return float(scales[0].max()), float(scales[1].max())

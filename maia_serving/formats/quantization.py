"""What a checkpoint's ``quantization_config`` says its linear layers are stored in.

Three layouts are read: compressed-tensors (llm-compressor's FP8, INT8 and W4A16 schemes),
``fp8`` (vLLM's Fp8Config, DeepSeek-V3's 128x128 blocks) and ``mxfp4`` (gpt-oss). Any other
``quant_method``, or a setting these do not say how to price, is a clear error rather than a
guess; a compressed-tensors config without ``config_groups`` (a KV-cache-only scheme, as
``calibrate-kv`` writes) leaves the weights unquantized.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from maia_serving.formats import precision
from maia_serving.formats.precision import DType, WeightQuant

KNOWN_METHODS = ("compressed-tensors", "fp8", "mxfp4")

# Which group of linear layers an ignore / modules_to_not_convert entry names, by its module path.
_IGNORED_GROUPS: tuple[tuple[str, str | None], ...] = (
    (r"lm_head", "lm_head"),
    (r"embed_tokens", None),  # embeddings are never quantized by these schemes
    (r"self_attn", "attention"),
    (r"(mlp|block_sparse_moe)\.(gate|router)\b", "router"),
    (r"(?<!shared_)experts", "experts"),
)


def _ignored_group(entry: str) -> str | None:
    if re.search(r"layers\.\d", entry):
        raise ValueError(f"quantization_config leaves {entry!r} unquantized: one layer's exception is not modelled")
    for pattern, group in _IGNORED_GROUPS:
        if re.search(pattern, entry):
            return group
    raise ValueError(
        f"quantization_config leaves {entry!r} unquantized, which names no layer group the emulator "
        f"knows (lm_head, embed_tokens, self_attn, the router, experts)"
    )


def _unquantized(entries: list[str] | None) -> frozenset[str]:
    groups = {_ignored_group(str(e)) for e in entries or []}
    return frozenset(g for g in groups if g is not None)


def _compressed_tensors_dtype(args: dict[str, Any], what: str) -> DType:
    """The format of one compressed-tensors ``QuantizationArgs`` (weights or input activations)."""
    bits, kind = args.get("num_bits"), args.get("type")
    group = args.get("group_size")
    if (bits, kind) == (8, "float"):
        fmt = precision.dtype("fp8_e4m3")
        block = args.get("block_structure")
        return replace(fmt, block_size=block[0] * block[1], scale_bits=32) if block else fmt
    if (bits, kind) == (8, "int"):
        return precision.dtype("int8")
    if (bits, kind) == (4, "int"):
        fmt = precision.dtype("int4")
        return replace(fmt, block_size=int(group)) if group else replace(fmt, block_size=1, scale_bits=0)
    if (bits, kind) == (4, "float") and group in (16, 32):
        return precision.dtype("nvfp4" if group == 16 else "mxfp4")
    raise ValueError(
        f"compressed-tensors {what} of {bits} bits, type {kind!r}, group size {group} is not modelled; "
        "known: 8-bit float, 8-bit int, 4-bit int, 4-bit float in groups of 16 or 32"
    )


def _compressed_tensors(quant: dict[str, Any]) -> WeightQuant | None:
    groups = list((quant.get("config_groups") or {}).values())
    if not groups:
        return None
    schemes = {repr((g.get("weights"), g.get("input_activations"))) for g in groups}
    if len(schemes) > 1:
        raise ValueError("compressed-tensors config_groups with different schemes are not modelled")
    scheme = groups[0]
    if not scheme.get("weights"):
        raise ValueError("compressed-tensors config_groups without weights are not modelled")
    acts = scheme.get("input_activations")
    return WeightQuant(
        weight=_compressed_tensors_dtype(scheme["weights"], "weights"),
        activation=_compressed_tensors_dtype(acts, "input activations") if acts else None,
        unquantized=_unquantized(quant.get("ignore")),
        source="compressed-tensors config_groups",
    )


def _fp8(quant: dict[str, Any]) -> WeightQuant:
    """vLLM's Fp8Config: E4M3 weights (FP32 scales per block when ``weight_block_size`` is set), and
    activations quantized to FP8 too, dynamically or with static scales."""
    fmt = precision.dtype(f"fp8_{quant.get('fmt', 'e4m3')}")
    block = quant.get("weight_block_size")
    if block:
        fmt = replace(fmt, block_size=block[0] * block[1], scale_bits=32)
    return WeightQuant(
        weight=fmt,
        activation=precision.dtype("fp8_e4m3"),
        unquantized=_unquantized(quant.get("ignored_layers")),
        source="fp8",
    )


def _mxfp4(quant: dict[str, Any]) -> WeightQuant:
    """gpt-oss: MXFP4 weights; the GEMMs take BF16 activations, as vLLM runs them on Hopper."""
    return WeightQuant(
        weight=precision.dtype("mxfp4"),
        activation=None,
        unquantized=_unquantized(quant.get("modules_to_not_convert")),
        source="mxfp4",
    )


def weight_quant(config: dict[str, Any]) -> WeightQuant | None:
    """The checkpoint's weight quantization from a parsed config.json; None when unquantized."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    readers = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "mxfp4": _mxfp4}
    if method not in readers:
        raise ValueError(
            f"quantization_config quant_method {method!r} is not modelled; known: {', '.join(KNOWN_METHODS)}"
        )
    return readers[method](quant)


def override(weight_dtype: str, activation_dtype: str | None) -> WeightQuant:
    """``--weight-dtype``: every quantizable linear layer stored in ``weight_dtype``, its GEMMs fed
    ``activation_dtype``; without one, the weight format's own scheme: activations in the same format
    (FP8 as vLLM's --quantization fp8 runs it, INT8, the MX formats), or in the model's dtype for the
    weight-only formats (grouped INT4, MXFP4, NVFP4)."""
    weight = precision.dtype(weight_dtype)
    if activation_dtype:
        activation: DType | None = precision.dtype(activation_dtype)
    else:
        activation = None if weight.weight_only else weight
    return WeightQuant(weight=weight, activation=activation, source="--weight-dtype")

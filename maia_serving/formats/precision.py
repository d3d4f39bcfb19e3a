"""The one dtype vocabulary of maia-serving: names, bytes per element, the peak a GEMM runs at.

Engines, checkpoints and users spell dtypes many ways ("bfloat16", "bf16", "torch.bfloat16",
"fp8", "float8_e4m3fn"); every spelling resolves here to one canonical ``DType``, whose size
includes the block scales of block-scaled formats (an MXFP4 element is 4.25 bits, not 4).
``maia_serving.ops`` maps the canonical names to torch dtypes, and ``maia_serving.ops.mx`` builds its
block-scaled KV formats (element format, block size, scale) from these entries; a KV row is priced at
``DType.row_bytes``, scales and the zero padding of a short last block included. The profiles list a
peak per ``DType.peak`` key. A served model's ``Precision`` separates what its weights, GEMM inputs,
KV cache and collectives are stored in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DType:
    """One storage format; ``block_size`` elements share ``scale_bits`` of scale (1 and 0: none).
    ``element`` and ``scale`` name the minifloat formats of a block-scaled float format's elements and
    scale (what ``maia_serving.ops.mx`` encodes); "" for the others. ``weight_only`` formats feed their
    GEMMs activations in the model's dtype unless told otherwise (it says nothing of KV caches)."""

    name: str
    element_bits: float
    peak: str  # the profile peak a GEMM whose widest operand is in this format runs at
    source: str
    block_size: int = 1
    scale_bits: float = 0.0
    aliases: tuple[str, ...] = ()
    weight_only: bool = False
    element: str = ""
    scale: str = ""

    @property
    def bits_per_element(self) -> float:
        return self.element_bits + self.scale_bits / self.block_size

    @property
    def bytes_per_element(self) -> float:
        return self.bits_per_element / 8

    def row_bytes(self, length: int) -> float:
        """Bytes of one row of ``length`` values stored alone (a KV head's K or V of one token): whole
        blocks, the last zero-padded, each with its scale. MXFP4 at 128 is 68 bytes; at 80, 3 blocks: 51."""
        blocks = math.ceil(length / self.block_size)
        return blocks * (self.block_size * self.element_bits + self.scale_bits) / 8


_OCP_MX = "OCP Microscaling Formats (MX) v1.0: 32 elements share one 8-bit E8M0 scale"
_MX: dict[str, Any] = {"block_size": 32, "scale_bits": 8, "scale": "e8m0"}
_SHARED_MICROEXPONENTS = (
    "Rouhani et al., ISCA 2023, 'With Shared Microexponents': 16 elements share an "
    "8-bit exponent, each pair a 1-bit microexponent (1 bit per element)"
)

# Per-tensor and per-channel scales (FP8 and INT8 checkpoints) are under 0.2% of the weight at
# k >= 2048 and are not counted; block and group scales are.
DTYPES: tuple[DType, ...] = (
    DType("fp32", 32, "fp32", "IEEE 754 binary32", aliases=("float32", "float")),
    DType("bf16", 16, "bf16", "bfloat16: 8-bit exponent, 7-bit mantissa", aliases=("bfloat16",)),
    DType("fp16", 16, "fp16", "IEEE 754 binary16", aliases=("float16", "half")),
    DType(
        "fp8_e4m3",
        8,
        "fp8",
        "OCP 8-bit Floating Point Specification (OFP8) E4M3",
        aliases=("fp8", "e4m3", "float8_e4m3fn", "fp8_e4m3fn"),
    ),
    DType("fp8_e5m2", 8, "fp8", "OCP 8-bit Floating Point Specification (OFP8) E5M2", aliases=("e5m2", "float8_e5m2")),
    DType("int8", 8, "int8", "8-bit integer, per-channel scales (W8A8 INT8)"),
    DType(
        "int4",
        4,
        "int4",
        "4-bit integer, one 16-bit scale per group of 128 (compressed-tensors W4A16 "
        "default group size; a checkpoint's own group size replaces it)",
        block_size=128,
        scale_bits=16,
        weight_only=True,
    ),
    DType("mxfp8", 8, "fp8", _OCP_MX + " (MXFP8: FP8 E4M3 elements, spec Table 1)", element="e4m3", **_MX),
    DType(
        "mxfp6",
        6,
        "fp6",
        _OCP_MX + " (MXFP6: FP6 E3M2 elements, spec Table 1; the variant Maia's KV cache uses, issue 10)",
        element="e3m2",
        **_MX,
    ),
    DType(
        "mxfp6_e2m3",
        6,
        "fp6",
        _OCP_MX + " (MXFP6: FP6 E2M3 elements, spec Table 1; the other FP6 "
        "variant, one more mantissa bit and less range)",
        element="e2m3",
        **_MX,
    ),
    DType(
        "mxfp4",
        4,
        "fp4",
        _OCP_MX + " (MXFP4: FP4 E2M1 elements, spec Table 1; gpt-oss's expert weights)",
        element="e2m1",
        weight_only=True,
        **_MX,
    ),
    DType(
        "nvfp4",
        4,
        "fp4",
        "NVIDIA NVFP4: E2M1 elements, one E4M3 scale per 16 (the per-tensor FP32 scale is not counted)",
        block_size=16,
        scale_bits=8,
        weight_only=True,
        element="e2m1",
        scale="e4m3",
    ),
    DType("mx9", 8, "mx9", _SHARED_MICROEXPONENTS + "; sign and 7 mantissa bits", block_size=16, scale_bits=16),
    DType("mx6", 5, "mx6", _SHARED_MICROEXPONENTS + "; sign and 4 mantissa bits", block_size=16, scale_bits=16),
    DType("mx4", 3, "mx4", _SHARED_MICROEXPONENTS + "; sign and 2 mantissa bits", block_size=16, scale_bits=16),
)

# A device without a peak for a format runs it at the next wider one it has (its operands
# widened before the GEMM); every profile has bf16. FP32 GEMMs fall back to BF16 because the
# engines serve FP32 checkpoints in BF16 on accelerators (vLLM's --dtype auto).
PEAK_FALLBACK: dict[str, str | None] = {
    "bf16": None,
    "fp32": "bf16",
    "fp16": "bf16",
    "fp8": "bf16",
    "fp6": "fp8",
    "fp4": "fp6",
    "int8": "bf16",
    "int4": "int8",
    "mx9": "bf16",
    "mx6": "mx9",
    "mx4": "mx6",
}

# The formats the engines' own cache dtype holds (check_kv_cache_dtype's default), one dtype per element.
# Both backends serve the block-scaled ones too, with the engine's dtype left at auto: MAIA_SERVING_KV_CACHE_DTYPE
# names them (vLLM's --kv-cache-dtype on --device maia and SGLang's mxfp8/nvfp4 set it).
ENGINE_KV_CACHE_FORMATS = ("bf16", "fp16", "fp32", "fp8_e4m3", "fp8_e5m2")
# Block-scaled KV formats: a K or V head row cut into blocks along head_dim (maia_serving.ops.mx stores them).
BLOCK_SCALED_KV_FORMATS = ("mxfp8", "mxfp6", "mxfp6_e2m3", "mxfp4", "nvfp4")
# The formats the emulator prices a KV cache in: memory.ServingConfig, fit, simulate, the cost model.
KV_CACHE_FORMATS = ENGINE_KV_CACHE_FORMATS + BLOCK_SCALED_KV_FORMATS

_BY_NAME: dict[str, DType] = {spelling: d for d in DTYPES for spelling in (d.name, *d.aliases)}


def known_dtypes() -> list[str]:
    return list(_BY_NAME)


def dtype(name: str | DType) -> DType:
    """The format ``name`` spells (any alias, with or without "torch."); a clear error otherwise."""
    if isinstance(name, DType):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _BY_NAME:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[key]


@functools.cache  # asked on every cache write and attention call
def kv_cache_spellings(formats: tuple[str, ...] = ENGINE_KV_CACHE_FORMATS) -> tuple[str, ...]:
    """Every ``--kv-cache-dtype`` value naming one of ``formats``: "auto" (the model's dtype) and each
    spelling of them. The default is what the engines serve; the emulator takes ``KV_CACHE_FORMATS``."""
    return ("auto", *(s for s, d in _BY_NAME.items() if d.name in formats))


def check_kv_cache_dtype(name: str, formats: tuple[str, ...] = ENGINE_KV_CACHE_FORMATS) -> str:
    """``name`` itself if it names one of ``formats`` (default: the engines' KV formats); a clear error
    listing the allowed spellings otherwise."""
    allowed = kv_cache_spellings(formats)
    if name not in allowed:
        raise ValueError(f"unknown kv cache dtype {name!r}; allowed: {', '.join(allowed)}")
    return name


def kv_cache_dtype(name: str, model_dtype: str | DType) -> DType:
    """The format a ``--kv-cache-dtype`` value stores the cache in, any the emulator prices; "auto" is
    the model's dtype."""
    return dtype(model_dtype) if check_kv_cache_dtype(name, KV_CACHE_FORMATS) == "auto" else dtype(name)


def gemm_peak(weight: DType, activation: DType) -> str:
    """The peak a GEMM runs at: its wider operand's (W4A16 at the BF16 rate, W8A8 FP8 at the FP8 rate,
    FP8 activations x FP4 weights at the FP8 rate)."""
    return activation.peak if activation.element_bits >= weight.element_bits else weight.peak


def resolve_peak(available: set[str] | dict[str, float], key: str) -> str:
    """The peak of ``available`` a GEMM at ``key`` runs at: ``key`` or the next wider format there."""
    if key not in PEAK_FALLBACK:
        raise ValueError(f"unknown peak format {key!r}; known: {', '.join(PEAK_FALLBACK)}")
    step: str | None = key
    while step is not None and step not in available:
        step = PEAK_FALLBACK[step]
    if step is None:
        raise ValueError(f"no peak for {key!r} or any format wider than it among {', '.join(available)}")
    return step


# The groups of linear layers a checkpoint quantizes or leaves alone. vLLM keeps two in the model
# dtype whatever the scheme: MoE routers (built with quant_config=None) and the LM head (a
# ParallelLMHead, which none of the schemes in quantization.py quantizes).
LINEAR_GROUPS = ("attention", "mlp", "experts", "router", "lm_head")
ALWAYS_UNQUANTIZED = frozenset({"router", "lm_head"})


@dataclass(frozen=True)
class WeightQuant:
    """How a checkpoint (or ``--weight-dtype``) stores its linear layers: ``weight`` for every group
    not in ``unquantized``, whose GEMMs take ``activation`` inputs (None: the model's dtype)."""

    weight: DType
    activation: DType | None
    unquantized: frozenset[str] = frozenset()
    source: str = ""

    def __post_init__(self) -> None:
        unknown = self.unquantized - set(LINEAR_GROUPS)
        if unknown:
            raise ValueError(f"unknown linear layer groups {sorted(unknown)}; known: {', '.join(LINEAR_GROUPS)}")


@dataclass(frozen=True)
class Precision:
    """What each kind of byte of a served model is in: ``model`` for activations, norms, embeddings and
    unquantized linears; ``quant`` for the quantized ones; the KV cache; the collectives' payload."""

    model: DType
    kv_cache: DType
    comm: DType
    quant: WeightQuant | None = field(default=None)

    def _quant_of(self, group: str) -> WeightQuant | None:
        """The quantization ``group``'s linears are stored in; None where they are in the model dtype."""
        if group not in LINEAR_GROUPS:
            raise ValueError(f"unknown linear layer group {group!r}; known: {', '.join(LINEAR_GROUPS)}")
        quant = self.quant
        if quant is None or group in quant.unquantized or group in ALWAYS_UNQUANTIZED:
            return None
        return quant

    def weight(self, group: str) -> DType:
        quant = self._quant_of(group)
        return quant.weight if quant else self.model

    def activation(self, group: str) -> DType:
        """The input dtype of ``group``'s GEMMs (their outputs are in the model dtype)."""
        quant = self._quant_of(group)
        return quant.activation if quant and quant.activation is not None else self.model

    def gemm_peak(self, group: str) -> str:
        return gemm_peak(self.weight(group), self.activation(group))

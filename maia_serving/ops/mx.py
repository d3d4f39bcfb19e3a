"""Block-scaled KV-cache formats (OCP Microscaling MX v1.0 and NVFP4): plain-torch references.

The references define the numerics that the Triton kernels in ``maia_serving.ops.triton.mx_cache``
must reproduce bit for bit; they import no engine and run on any torch device.

Formats (``MX_FORMATS``, built from ``maia_serving.formats.precision``, the one dtype
vocabulary, which names each format's element and scale formats, block size and scale bits): a
K or V row of one KV head (``head_dim`` values) is cut into blocks along the head dimension;
each block stores its elements in a small float format and one shared scale.

- ``mxfp8`` (E4M3 elements), ``mxfp6`` (E3M2, the issue's choice), ``mxfp6_e2m3`` (E2M3, the
  other MXFP6 element format) and ``mxfp4`` (E2M1): blocks of 32, one E8M0 scale
  ``X = 2^(code - 127)`` per block (code 0xFF: NaN). Per OCP MX v1.0 section 6.3,
  ``shared_exp = floor(log2(amax)) - emax_elem`` (``emax_elem``: the exponent of the element
  format's largest normal), clamped below at E8M0's smallest, -127 (an all-zero block gets
  2^-127); each element is ``V / X`` rounded to nearest, ties to even, with results past the
  element's max normal clamped to it. MX formats take no per-tensor scale.
- ``nvfp4``: blocks of 16 E2M1 elements; one E4M3 block scale ``s`` and a float32 per-tensor
  (or per-KV-head) scale ``t``, which lives beside the cache like the FP8 ``k_scale``:
  ``s = e4m3(amax / (6 * t))`` (round to nearest even, saturating at 448), elements
  ``e2m1(V / (s * t))``; a block whose ``s`` rounds to 0 stores signed zeros.
- NaN/inf: FP6 and FP4 elements have neither, so the policy is per block, for every format: a
  block with a NaN or an infinity gets the NaN scale code (E8M0 0xFF; NVFP4 E4M3 0x7F) and zero
  elements, and decodes as all NaN (the spec: a NaN scale makes every element of its block
  NaN). MXFP8's E4M3 NaN element code decodes as NaN, but quantization never writes it.
- Rounding is done from the float32 value: bf16/fp16 inputs are widened first (exactly).

Storage (``torch.uint8``): a head's row is its blocks in order, each block its packed element
bytes followed by its scale byte, so a block's bytes are contiguous. Packing is little-endian
within a word: FP8 one element per byte; FP4 two per byte, the even element in the low nibble;
FP6 four in three bytes, element ``j`` of the four at bits ``6j..6j+5`` of the 24-bit word
``b0 | b1 << 8 | b2 << 16``. A ``head_dim`` that is not a multiple of the block size is padded
with zeros to one (the padding is stored and does not change the block's amax).
``head_bytes`` is the cache's last dimension: MXFP4 at head_dim 128 is 4 * (16 + 1) = 68 bytes,
4.25 bits per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maia_serving.formats import precision
from maia_serving.ops.fp8 import (
    check_paged_attention_args,
    check_slot_mapping,
    check_token_rows,
    paged_attention_ref,
    scale_tensor,
)


@dataclass(frozen=True)
class Minifloat:
    """A small float format without infinities: sign, exponent and mantissa fields."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_code: int  # +max normal
    nan_code: int | None = None  # +NaN (E4M3's S.1111.111); the sign bit may be set too

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def emax(self) -> int:
        """The exponent of the largest normal value: emax_elem of OCP MX section 6.3."""
        return (self.max_code >> self.mantissa_bits) - self.bias

    @property
    def max_value(self) -> float:
        m = self.max_code & ((1 << self.mantissa_bits) - 1)
        return math.ldexp((1 << self.mantissa_bits) + m, self.emax - self.mantissa_bits)


# OCP MX v1.0 Tables 1-3 (FP6, FP4) and OFP8 (E4M3).
ELEMENT_FORMATS: dict[str, Minifloat] = {
    "e4m3": Minifloat("e4m3", 4, 3, 7, 0b0_1111_110, nan_code=0b0_1111_111),
    "e3m2": Minifloat("e3m2", 3, 2, 3, 0b0_111_11),
    "e2m3": Minifloat("e2m3", 2, 3, 1, 0b0_11_111),
    "e2m1": Minifloat("e2m1", 2, 1, 1, 0b0_11_1),
}
E8M0_NAN = 0xFF
E8M0_BIAS = 127


@dataclass(frozen=True)
class MxFormat:
    """A block-scaled KV format: ``block_size`` elements share one 8-bit scale."""

    name: str
    element: Minifloat
    block_size: int
    scale: str  # "e8m0" (OCP MX) or "e4m3" (NVFP4, with a per-tensor float32 scale)

    @property
    def elements_per_word(self) -> int:
        """The fewest elements whose bits fill whole bytes: 1 (FP8), 2 (FP4), 4 (FP6)."""
        return 8 // math.gcd(self.element.bits, 8)

    @property
    def bytes_per_word(self) -> int:
        return self.element.bits * self.elements_per_word // 8

    @property
    def block_bytes(self) -> int:
        """Element bytes plus the one scale byte."""
        return self.block_size * self.element.bits // 8 + 1


def _from_vocabulary(d: precision.DType) -> MxFormat:
    """The layout of a block-scaled KV format of ``precision.py``, whose entry names its element and
    scale formats, block size and scale bits (the one vocabulary; this module adds the encoding)."""
    if d.element_bits != ELEMENT_FORMATS[d.element].bits or d.scale_bits != 8 or d.scale not in ("e8m0", "e4m3"):
        raise ValueError(f"{d.name}: the MX page layout stores {d.element} elements and one 8-bit scale per block")
    return MxFormat(d.name, ELEMENT_FORMATS[d.element], d.block_size, d.scale)


# mxfp8, mxfp6 (E3M2), mxfp6_e2m3, mxfp4, nvfp4: precision.BLOCK_SCALED_KV_FORMATS, in its order.
MX_FORMATS: dict[str, MxFormat] = {
    name: _from_vocabulary(precision.dtype(name)) for name in precision.BLOCK_SCALED_KV_FORMATS
}


def get_mx_format(fmt: str | MxFormat) -> MxFormat:
    """Look up a block-scaled format by name or pass one through."""
    if isinstance(fmt, MxFormat):
        return fmt
    if fmt not in MX_FORMATS:
        raise ValueError(f"unknown block-scaled KV format {fmt!r}; allowed: {', '.join(MX_FORMATS)}")
    return MX_FORMATS[fmt]


def blocks_per_head(fmt: str | MxFormat, head_dim: int) -> int:
    return -(-head_dim // get_mx_format(fmt).block_size)


def head_bytes(fmt: str | MxFormat, head_dim: int) -> int:
    """Bytes per token per KV head, block scales included: the cache's last dimension."""
    return blocks_per_head(fmt, head_dim) * get_mx_format(fmt).block_bytes


def bits_per_element(fmt: str | MxFormat, head_dim: int) -> float:
    """What one K or V value costs in the cache (MXFP4 at head_dim 128: 4.25)."""
    return head_bytes(fmt, head_dim) * 8 / head_dim


def encode_minifloat_ref(y: torch.Tensor, elem: Minifloat) -> torch.Tensor:
    """Finite float32 ``y`` -> int32 codes: round to nearest, ties to even, clamped to max normal.

    Rounds on the value grid of ``y``'s binade (step ``2^(e - mantissa_bits)``, subnormals on
    the lowest normal binade's grid), so the carry into the next binade comes for free.
    """
    a = y.abs()
    lowest = 1 - elem.bias
    binade = torch.where(a > 0, torch.frexp(a).exponent - 1, lowest).clamp(min=lowest)
    steps = torch.round(torch.ldexp(a, elem.mantissa_bits - binade)).to(torch.int32)
    code = ((binade + elem.bias - 1) << elem.mantissa_bits) + steps
    code = code.clamp(max=elem.max_code)
    return code | (torch.signbit(y).to(torch.int32) << (elem.bits - 1))


def decode_table(elem: Minifloat) -> torch.Tensor:
    """float32 value of every code of ``elem`` (index = code) by the spec's formula."""
    code = torch.arange(1 << elem.bits, dtype=torch.int32)
    magnitude = code & ((1 << (elem.bits - 1)) - 1)
    exponent = magnitude >> elem.mantissa_bits
    mantissa = magnitude & ((1 << elem.mantissa_bits) - 1)
    normal = torch.ldexp((mantissa + (1 << elem.mantissa_bits)).float(), exponent - elem.bias - elem.mantissa_bits)
    subnormal = torch.ldexp(mantissa.float(), torch.tensor(1 - elem.bias - elem.mantissa_bits))
    value = torch.where(exponent > 0, normal, subnormal)
    value = torch.where(code >> (elem.bits - 1) == 1, -value, value)
    if elem.nan_code is not None:
        value = torch.where(magnitude == elem.nan_code, math.nan, value)
    return value


def decode_minifloat_ref(codes: torch.Tensor, elem: Minifloat) -> torch.Tensor:
    return decode_table(elem).to(codes.device)[codes.long()]


def decode_e8m0_ref(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes -> float32 ``2^(code - 127)``; 0xFF is NaN."""
    value = torch.ldexp(torch.ones(codes.shape, device=codes.device), codes.int() - E8M0_BIAS)
    return torch.where(codes.int() == E8M0_NAN, math.nan, value)


def shared_exponent_ref(amax: torch.Tensor, elem: Minifloat) -> torch.Tensor:
    """OCP MX 6.3: ``floor(log2(amax)) - emax_elem``, at least -127 (int32; amax finite, >= 0)."""
    floor_log2 = torch.frexp(amax).exponent - 1
    return torch.where(amax > 0, floor_log2 - elem.emax, -E8M0_BIAS).clamp(min=-E8M0_BIAS)


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., head_dim]`` float32 -> ``[..., num_blocks, block_size]``, zero-padded."""
    pad = -x.shape[-1] % block_size
    x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _nvfp4_scaled(
    blocks: torch.Tensor, amax: torch.Tensor, tensor_scale: torch.Tensor, fmt: MxFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scale codes, ``blocks / (s * t)``); a zero ``s`` gives signed zeros."""
    e4m3 = ELEMENT_FORMATS["e4m3"]
    scale_codes = encode_minifloat_ref(amax / (fmt.element.max_value * tensor_scale), e4m3)
    denominator = decode_minifloat_ref(scale_codes, e4m3) * tensor_scale
    denominator = denominator[..., None]
    return scale_codes, torch.where(denominator > 0, blocks / denominator, blocks * 0.0)


def _pack(codes: torch.Tensor, scale_codes: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """int32 codes ``[..., nb, block]`` and scales ``[..., nb]`` -> uint8 ``[..., nb * block_bytes]``."""
    per_word, word_bytes = fmt.elements_per_word, fmt.bytes_per_word
    words = codes.reshape(*codes.shape[:-1], fmt.block_size // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device) * fmt.element.bits
    word = (words << shifts).sum(-1)
    byte_shifts = torch.arange(word_bytes, device=codes.device) * 8
    elem_bytes = ((word[..., None] >> byte_shifts) & 0xFF).flatten(-2)
    packed = torch.cat([elem_bytes, scale_codes[..., None]], dim=-1)
    return packed.flatten(-2).to(torch.uint8)


def _unpack(packed: torch.Tensor, fmt: MxFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_pack``: (element codes ``[..., nb, block]``, scale codes ``[..., nb]``)."""
    per_word, word_bytes = fmt.elements_per_word, fmt.bytes_per_word
    blocks = packed.int().reshape(*packed.shape[:-1], packed.shape[-1] // fmt.block_bytes, fmt.block_bytes)
    elem_bytes = blocks[..., :-1].reshape(*blocks.shape[:-1], fmt.block_size // per_word, word_bytes)
    byte_shifts = torch.arange(word_bytes, device=packed.device) * 8
    word = (elem_bytes << byte_shifts).sum(-1)
    shifts = torch.arange(per_word, device=packed.device) * fmt.element.bits
    codes = (word[..., None] >> shifts) & ((1 << fmt.element.bits) - 1)
    return codes.flatten(-2), blocks[..., -1]


def _check_scale(fmt: MxFormat, scale: float | torch.Tensor | None) -> None:
    if fmt.scale == "e8m0" and scale is not None:
        raise ValueError(f"{fmt.name} keeps all its scale in the E8M0 block scales; pass scale=None")


def quantize_mx_ref(x: torch.Tensor, fmt: str | MxFormat, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., num_kv_heads, head_dim]`` -> uint8 ``[..., num_kv_heads, head_bytes]`` (module doc).

    ``scale`` is NVFP4's per-tensor scale (a float or ``[num_kv_heads]``; None means 1.0).
    """
    f = get_mx_format(fmt)
    _check_scale(f, scale)
    blocks = _to_blocks(x.float(), f.block_size)
    finite = torch.isfinite(blocks)
    special = ~finite.all(-1)
    amax = torch.where(finite, blocks.abs(), 0.0).amax(-1)
    if f.scale == "e8m0":
        shared = shared_exponent_ref(amax, f.element)
        scale_codes = torch.where(special, E8M0_NAN, shared + E8M0_BIAS)
        scaled = blocks * torch.ldexp(torch.ones_like(amax), -shared)[..., None]
    else:
        tensor_scale = scale_tensor(scale, x.shape[-2], x.device).reshape(-1, 1)
        scale_codes, scaled = _nvfp4_scaled(blocks, amax, tensor_scale, f)
        scale_codes = torch.where(special, ELEMENT_FORMATS["e4m3"].nan_code, scale_codes)
    scaled = torch.where(special[..., None], 0.0, scaled)
    return _pack(encode_minifloat_ref(scaled, f.element), scale_codes, f)


def dequantize_mx_ref(
    packed: torch.Tensor,
    fmt: str | MxFormat,
    head_dim: int,
    scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 ``[..., num_kv_heads, head_bytes]`` -> float32 ``[..., num_kv_heads, head_dim]``."""
    f = get_mx_format(fmt)
    _check_scale(f, scale)
    if packed.shape[-1] != head_bytes(f, head_dim):
        raise ValueError(
            f"{f.name} at head_dim {head_dim} stores {head_bytes(f, head_dim)} bytes per head, got {packed.shape[-1]}"
        )
    codes, scale_codes = _unpack(packed, f)
    if f.scale == "e8m0":
        block_scale = decode_e8m0_ref(scale_codes)
    else:
        tensor_scale = scale_tensor(scale, packed.shape[-2], packed.device).reshape(-1, 1)
        block_scale = decode_minifloat_ref(scale_codes, ELEMENT_FORMATS["e4m3"]) * tensor_scale
    values = decode_minifloat_ref(codes, f.element) * block_scale[..., None]
    return values.flatten(-2)[..., :head_dim]


def check_reshape_and_cache_mx_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
) -> MxFormat:
    """Shape and dtype checks shared by the reference and the kernel wrapper.

    The caches are uint8 ``[num_blocks, block_size, num_kv_heads, head_bytes(fmt, head_dim)]``.
    """
    fmt = get_mx_format(kv_cache_dtype)
    check_token_rows(key, value)
    num_tokens, num_kv_heads, head_dim = key.shape
    expected = (num_kv_heads, head_bytes(fmt, head_dim))
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != torch.uint8 or cache.dim() != 4 or tuple(cache.shape[2:]) != expected:
            raise ValueError(
                f"{name} for {fmt.name} at head_dim {head_dim} must be uint8 [num_blocks, block_size, "
                f"{expected[0]}, {expected[1]}], got {cache.dtype} {tuple(cache.shape)}"
            )
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache differ: {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    check_slot_mapping(slot_mapping, num_tokens)
    return fmt


def reshape_and_cache_mx_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Quantize ``key``/``value`` into the paged MX caches in place, as ``fp8.reshape_and_cache_ref``
    does for FP8: token ``t`` to slot ``slot_mapping[t]`` (-1: padding, skipped). The scales are
    NVFP4's per-tensor ones and must be None for the MX formats."""
    fmt = check_reshape_and_cache_mx_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, rows = slots // block_size, slots % block_size
    for src, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        cache[blocks, rows] = quantize_mx_ref(src[valid], fmt, scale)


def check_paged_attention_mx_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache_dtype: str,
) -> MxFormat:
    """The caches' bytes, then every check of the unquantized path on the shapes they decode to."""
    fmt = get_mx_format(kv_cache_dtype)
    head_dim = query.shape[-1]
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[-1] != head_bytes(fmt, head_dim):
            raise ValueError(
                f"{name} for {fmt.name} at head_dim {head_dim} must be uint8 [num_blocks, block_size, "
                f"num_kv_heads, {head_bytes(fmt, head_dim)}], got {cache.dtype} {tuple(cache.shape)}"
            )
    decoded = [torch.empty((*c.shape[:-1], head_dim), device="meta") for c in (key_cache, value_cache)]
    check_paged_attention_args(query, *decoded, block_tables, seq_lens, query_start_loc, "auto")
    return fmt


def paged_attention_mx_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    kv_cache_dtype: str,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``fp8.paged_attention_ref`` over the float32 values the MX caches decode to (same arguments)."""
    fmt = check_paged_attention_mx_args(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, kv_cache_dtype
    )
    head_dim = query.shape[-1]
    keys = dequantize_mx_ref(key_cache, fmt, head_dim, k_scale)
    values = dequantize_mx_ref(value_cache, fmt, head_dim, v_scale)
    return paged_attention_ref(
        query,
        keys,
        values,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        "auto",
        causal=causal,
        sliding_window=sliding_window,
    )

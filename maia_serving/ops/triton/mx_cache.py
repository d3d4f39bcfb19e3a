"""Write new keys and values into a paged KV cache in a block-scaled format (MXFP8/6/4, NVFP4).

Numerics and layout follow ``maia_serving.ops.mx.reshape_and_cache_mx_ref`` bit for bit. A
program owns one (token, KV head) row: its ``head_dim`` values as ``[blocks, words, lanes]``,
where a word is the fewest elements that fill whole bytes (FP8 1, FP4 2, FP6 4). Element codes
are built with integer operations on the float32 bits (no float8 casts: Triton's interpreter
gets those wrong, and FP4/FP6 have no Triton type); a word's codes are OR-ed into one integer
and stored byte by byte, followed by the block's scale byte.

The read side lives here too: ``load_mx_tile`` decodes a ``[tokens, dims]`` tile of a paged
cache to float32 for ``paged_attention`` (per value: gather its word and its block's scale
byte; correct on any Triton device, not tuned for bandwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maia_serving.ops.mx import MxFormat, blocks_per_head, check_reshape_and_cache_mx_args

from .reshape_and_cache import cache_write_scales


@triton.jit
def encode_minifloat(y, MANT: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr):
    """Finite float32 -> int32 code: round to nearest even on the float32 significand, then clamp.

    The significand (implicit bit included) is shifted right to the target's grid (further for
    the target's subnormals); the exponent is added after rounding, so a carry moves up a binade.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    exp_field = (bits >> 23) & 0xFF
    significand = (bits & 0x7FFFFF) | tl.where(exp_field > 0, 0x800000, 0)
    exponent = tl.maximum(exp_field, 1) - 127
    shift = tl.minimum((23 - MANT) + tl.maximum((1 - BIAS) - exponent, 0), 25)
    kept = significand >> shift
    rest = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    kept += ((rest > half) | ((rest == half) & ((kept & 1) == 1))).to(tl.int32)
    code = kept + ((tl.maximum(exponent + BIAS, 1) - 1) << MANT)
    return tl.minimum(code, MAX_CODE) | (sign << SIGN_SHIFT)


@triton.jit
def decode_minifloat(code, BITS: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_NAN: tl.constexpr):
    """int32 code -> float32 by the spec's formula, built from bits (exact, no float constants).

    A subnormal ``0.M * 2^(1 - BIAS)`` is ``1.M * 2^(1 - BIAS)`` minus ``2^(1 - BIAS)``: exact.
    ``HAS_NAN``: the all-ones magnitude is NaN (E4M3).
    """
    magnitude = code & ((1 << (BITS - 1)) - 1)
    exponent = magnitude >> MANT
    mantissa_bits = (magnitude & ((1 << MANT) - 1)) << (23 - MANT)
    normal = (((exponent - BIAS + 127) << 23) | mantissa_bits).to(tl.float32, bitcast=True)
    lowest = (((128 - BIAS) << 23) | mantissa_bits).to(tl.float32, bitcast=True)
    lowest_binade = tl.full(magnitude.shape, (128 - BIAS) << 23, tl.int32).to(tl.float32, bitcast=True)
    value = tl.where(exponent > 0, normal, lowest - lowest_binade)
    value = tl.where(((code >> (BITS - 1)) & 1) == 1, -value, value)
    if HAS_NAN:
        value = tl.where(magnitude == (1 << (BITS - 1)) - 1, float("nan"), value)
    return value


@triton.jit
def decode_e8m0(code):
    """E8M0 code -> float32 ``2^(code - 127)`` (code 0: the float32 subnormal 2^-127; 0xFF: NaN)."""
    value = tl.where(code == 0, 0x00400000, code << 23).to(tl.float32, bitcast=True)
    return tl.where(code == 255, float("nan"), value)


@triton.jit
def load_mx_tile(
    cache_ptr,
    row_offsets,  # [ROWS] int64: where each row's (token, KV head) bytes start
    dims,  # [COLS] int32: which of the head's values
    mask,  # [ROWS, COLS]
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    MANT: tl.constexpr,
    BIAS: tl.constexpr,
    PER_WORD: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    NVFP4: tl.constexpr,
):
    """Dequantize ``[ROWS, COLS]`` values of a paged MX/NVFP4 cache to float32: element times its
    block scale (NVFP4's per-tensor scale is left to the caller). Masked entries are 0."""
    block_bytes = BLOCK * BITS // 8 + 1
    block = dims // BLOCK
    index = dims % BLOCK
    word_start = row_offsets[:, None] + (block * block_bytes + (index // PER_WORD) * WORD_BYTES)[None, :]
    word = tl.zeros(mask.shape, dtype=tl.int32)
    for k in tl.static_range(WORD_BYTES):
        word |= tl.load(cache_ptr + word_start + k, mask=mask, other=0).to(tl.int32) << (8 * k)
    code = (word >> ((index % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    scale_code = tl.load(
        cache_ptr + row_offsets[:, None] + (block * block_bytes + block_bytes - 1)[None, :], mask=mask, other=0
    ).to(tl.int32)
    if NVFP4:
        scale = decode_minifloat(scale_code, 8, 3, 7, True)
    else:
        scale = decode_e8m0(scale_code)
    return decode_minifloat(code, BITS, MANT, BIAS, BITS == 8) * scale


@triton.jit
def _quantize_row(
    src_ptr,
    dst_ptr,
    tensor_scale,
    head_dim,
    NUM_BLOCKS: tl.constexpr,
    NUM_BLOCKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_WORD: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    WORD_BYTES_P2: tl.constexpr,
    BITS: tl.constexpr,
    MANT: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    EMAX: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    NVFP4: tl.constexpr,
):
    """Quantize one head's row at ``src_ptr`` and store its ``NUM_BLOCKS`` blocks at ``dst_ptr``."""
    blk = tl.arange(0, NUM_BLOCKS_P2)
    word = tl.arange(0, BLOCK // PER_WORD)
    lane = tl.arange(0, PER_WORD)
    dims = blk[:, None, None] * BLOCK + word[None, :, None] * PER_WORD + lane[None, None, :]
    mask = (blk[:, None, None] < NUM_BLOCKS) & (dims < head_dim)
    x = tl.load(src_ptr + dims, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")  # false for NaN too
    special = tl.max(tl.max(tl.where(finite, 0, 1), axis=2), axis=1) > 0
    amax = tl.max(tl.max(tl.where(finite, tl.abs(x), 0.0), axis=2), axis=1)

    if NVFP4:
        block_code = encode_minifloat(tl.math.div_rn(amax, MAX_VALUE * tensor_scale), 3, 7, 0x7E, 7)
        denominator = (decode_minifloat(block_code, 8, 3, 7, True) * tensor_scale)[:, None, None]
        y = tl.where(denominator > 0.0, tl.math.div_rn(x, denominator), x * 0.0)
        scale_code = tl.where(special, 0x7F, block_code)
    else:
        # floor(log2(amax)) from the exponent field; zero and float32 subnormals land below -127.
        exp_field = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        shared = tl.maximum(exp_field - 127 - EMAX, -127)
        inverse = ((127 - shared) << 23).to(tl.float32, bitcast=True)  # 2^-shared, exact
        y = x * inverse[:, None, None]
        scale_code = tl.where(special, 255, shared + 127)
    y = tl.where(special[:, None, None], 0.0, y)
    codes = encode_minifloat(y, MANT, BIAS, MAX_CODE, BITS - 1)

    packed = tl.sum(codes << (lane[None, None, :] * BITS), axis=2)  # [blocks, words]; disjoint bits
    elem_bytes = BLOCK * BITS // 8
    byte = tl.arange(0, WORD_BYTES_P2)
    offsets = blk[:, None, None] * (elem_bytes + 1) + word[None, :, None] * WORD_BYTES + byte[None, None, :]
    tl.store(
        dst_ptr + offsets,
        ((packed[:, :, None] >> (byte[None, None, :] * 8)) & 0xFF).to(tl.uint8),
        mask=(blk[:, None, None] < NUM_BLOCKS) & (byte[None, None, :] < WORD_BYTES),
    )
    tl.store(dst_ptr + blk * (elem_bytes + 1) + elem_bytes, scale_code.to(tl.uint8), mask=blk < NUM_BLOCKS)


@triton.jit
def _reshape_and_cache_mx_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_bytes], uint8
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_bytes], uint8
    slot_mapping_ptr,  # [num_tokens]
    k_scale_ptr,  # [1] or [num_kv_heads], float32: NVFP4's per-tensor scale (1.0 and unused for MX)
    v_scale_ptr,
    key_stride_t: tl.int64,
    key_stride_h: tl.int64,
    value_stride_t: tl.int64,
    value_stride_h: tl.int64,
    cache_stride_b: tl.int64,
    cache_stride_s: tl.int64,
    cache_stride_h: tl.int64,
    head_dim,
    block_size,
    NUM_BLOCKS: tl.constexpr,
    NUM_BLOCKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_WORD: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    WORD_BYTES_P2: tl.constexpr,
    BITS: tl.constexpr,
    MANT: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    EMAX: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    NVFP4: tl.constexpr,
    PER_HEAD_SCALE: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    dst = (slot // block_size) * cache_stride_b + (slot % block_size) * cache_stride_s + head * cache_stride_h
    if PER_HEAD_SCALE:
        k_scale = tl.load(k_scale_ptr + head)
        v_scale = tl.load(v_scale_ptr + head)
    else:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    _quantize_row(
        key_ptr + token * key_stride_t + head * key_stride_h,
        key_cache_ptr + dst,
        k_scale,
        head_dim,
        NUM_BLOCKS,
        NUM_BLOCKS_P2,
        BLOCK,
        PER_WORD,
        WORD_BYTES,
        WORD_BYTES_P2,
        BITS,
        MANT,
        BIAS,
        MAX_CODE,
        EMAX,
        MAX_VALUE,
        NVFP4,
    )
    _quantize_row(
        value_ptr + token * value_stride_t + head * value_stride_h,
        value_cache_ptr + dst,
        v_scale,
        head_dim,
        NUM_BLOCKS,
        NUM_BLOCKS_P2,
        BLOCK,
        PER_WORD,
        WORD_BYTES,
        WORD_BYTES_P2,
        BITS,
        MANT,
        BIAS,
        MAX_CODE,
        EMAX,
        MAX_VALUE,
        NVFP4,
    )


def format_constexprs(fmt: MxFormat, head_dim: int) -> dict:
    """The kernel's compile-time description of ``fmt`` at ``head_dim``."""
    elem = fmt.element
    num_blocks = blocks_per_head(fmt, head_dim)
    return {
        "NUM_BLOCKS": num_blocks,
        "NUM_BLOCKS_P2": triton.next_power_of_2(num_blocks),
        "BLOCK": fmt.block_size,
        "PER_WORD": fmt.elements_per_word,
        "WORD_BYTES": fmt.bytes_per_word,
        "WORD_BYTES_P2": triton.next_power_of_2(fmt.bytes_per_word),
        "BITS": elem.bits,
        "MANT": elem.mantissa_bits,
        "BIAS": elem.bias,
        "MAX_CODE": elem.max_code,
        "EMAX": elem.emax,
        "MAX_VALUE": elem.max_value,
        "NVFP4": fmt.scale == "e4m3",
    }


def attention_constexprs(fmt: MxFormat | None) -> dict:
    """The paged-attention kernel's MX_* constexprs: how to decode ``fmt`` (None: not a block format)."""
    if fmt is None:
        return dict.fromkeys(
            ("MX_BLOCK", "MX_BITS", "MX_MANT", "MX_BIAS", "MX_PER_WORD", "MX_WORD_BYTES", "MX_NVFP4"), 0
        )
    return {
        "MX_BLOCK": fmt.block_size,
        "MX_BITS": fmt.element.bits,
        "MX_MANT": fmt.element.mantissa_bits,
        "MX_BIAS": fmt.element.bias,
        "MX_PER_WORD": fmt.elements_per_word,
        "MX_WORD_BYTES": fmt.bytes_per_word,
        "MX_NVFP4": fmt.scale == "e4m3",
    }


def reshape_and_cache_mx(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Triton version of ``maia_serving.ops.mx.reshape_and_cache_mx_ref`` (same arguments)."""
    fmt = check_reshape_and_cache_mx_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    if fmt.scale == "e8m0" and (k_scale is not None or v_scale is not None):
        raise ValueError(f"{fmt.name} keeps all its scale in the E8M0 block scales; pass k_scale=v_scale=None")
    num_tokens, num_kv_heads, head_dim = key.shape
    k_scale_t, v_scale_t, per_head_scale = cache_write_scales(key, value, key_cache, value_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    _reshape_and_cache_mx_kernel[(num_tokens, num_kv_heads)](
        key_ptr=key,
        value_ptr=value,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        k_scale_ptr=k_scale_t,
        v_scale_ptr=v_scale_t,
        key_stride_t=key.stride(0),
        key_stride_h=key.stride(1),
        value_stride_t=value.stride(0),
        value_stride_h=value.stride(1),
        cache_stride_b=key_cache.stride(0),
        cache_stride_s=key_cache.stride(1),
        cache_stride_h=key_cache.stride(2),
        head_dim=head_dim,
        block_size=key_cache.shape[1],
        PER_HEAD_SCALE=per_head_scale,
        **format_constexprs(fmt, head_dim),
    )

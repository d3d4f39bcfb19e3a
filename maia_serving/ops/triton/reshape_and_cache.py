"""Write new keys and values into a paged KV cache, quantizing to FP8 on the way.

Numerics follow ``maia_serving.ops.fp8.reshape_and_cache_ref``: ``x.float() / scale`` with
IEEE division, clamped to the format's max (NaN passes the clamp), then one cast to FP8
with round-to-nearest-even, stored as its uint8 code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maia_serving.ops.fp8 import check_reshape_and_cache_args, scale_tensor


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    k_scale_ptr,  # [1] or [num_kv_heads], float32
    v_scale_ptr,  # [1] or [num_kv_heads], float32
    key_stride_t: tl.int64,
    key_stride_h: tl.int64,
    value_stride_t: tl.int64,
    value_stride_h: tl.int64,
    cache_stride_b: tl.int64,
    cache_stride_s: tl.int64,
    cache_stride_h: tl.int64,
    num_kv_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr,
    FP8_E5M2: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PER_HEAD_SCALE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // block_size
    row = slot % block_size

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)
    key = tl.load(
        key_ptr + token * key_stride_t + heads[:, None] * key_stride_h + dims[None, :],
        mask=mask,
    ).to(tl.float32)
    value = tl.load(
        value_ptr + token * value_stride_t + heads[:, None] * value_stride_h + dims[None, :],
        mask=mask,
    ).to(tl.float32)
    cache_offsets = block * cache_stride_b + row * cache_stride_s + heads[:, None] * cache_stride_h + dims[None, :]

    if IS_FP8:
        if PER_HEAD_SCALE:
            k_scale = tl.load(k_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)[:, None]
            v_scale = tl.load(v_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)[:, None]
        else:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        # div_rn: IEEE division (plain `/` may be approximate on GPUs); the nested where
        # clamps to +-FP8_MAX and, unlike min/max, lets NaN through.
        key = tl.math.div_rn(key, k_scale)
        value = tl.math.div_rn(value, v_scale)
        key = tl.where(key > FP8_MAX, FP8_MAX, tl.where(key < -FP8_MAX, -FP8_MAX, key))
        value = tl.where(value > FP8_MAX, FP8_MAX, tl.where(value < -FP8_MAX, -FP8_MAX, value))
        if FP8_E5M2:
            key_out = key.to(tl.float8e5).to(tl.uint8, bitcast=True)
            value_out = value.to(tl.float8e5).to(tl.uint8, bitcast=True)
        else:
            key_out = key.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            value_out = value.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        key_out = key.to(key_cache_ptr.dtype.element_ty)
        value_out = value.to(value_cache_ptr.dtype.element_ty)
    tl.store(key_cache_ptr + cache_offsets, key_out, mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value_out, mask=mask)


def _block_sizes(num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): one program holds all heads of one token."""
    return triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Triton version of ``maia_serving.ops.fp8.reshape_and_cache_ref`` (same arguments)."""
    fmt = check_reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    num_tokens, num_kv_heads, head_dim = key.shape
    k_scale_t, v_scale_t, per_head_scale = cache_write_scales(key, value, key_cache, value_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    block_h, block_d = _block_sizes(num_kv_heads, head_dim)
    _reshape_and_cache_kernel[(num_tokens,)](
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
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=key_cache.shape[1],
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        IS_FP8=fmt is not None,
        FP8_E5M2=fmt is not None and fmt.name == "e5m2",
        FP8_MAX=fmt.max_value if fmt else 0.0,
        PER_HEAD_SCALE=per_head_scale,
    )


def cache_write_scales(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_scale: float | torch.Tensor | None,
    v_scale: float | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What both cache-write kernels (FP8 and MX) need of their arguments: one stride for both caches
    and a contiguous last dimension everywhere (checked), and the scales as tensors, one entry per
    KV head for both when either is per head (the kernels take one flag for the pair)."""
    if key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key_cache and value_cache need equal strides, got {key_cache.stride()} and {value_cache.stride()}"
        )
    if (key.stride(-1), value.stride(-1), key_cache.stride(-1)) != (1, 1, 1):
        raise ValueError("key, value and the caches need a contiguous last dimension (stride 1)")
    num_kv_heads = key.shape[1]
    k_scale_t = scale_tensor(k_scale, num_kv_heads, key.device)
    v_scale_t = scale_tensor(v_scale, num_kv_heads, key.device)
    per_head_scale = k_scale_t.numel() > 1 or v_scale_t.numel() > 1
    if per_head_scale:
        k_scale_t = k_scale_t.expand(num_kv_heads).contiguous()
        v_scale_t = v_scale_t.expand(num_kv_heads).contiguous()
    return k_scale_t, v_scale_t, per_head_scale

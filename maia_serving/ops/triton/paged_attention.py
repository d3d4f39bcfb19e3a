"""Paged attention for varlen queries (decode, prefill, chunked prefill) in one kernel.

Numerics follow ``maia_serving.ops.fp8.paged_attention_ref``. A program owns ``BLOCK_Q``
query tokens of one sequence and every query head of one KV head (GQA), so each KV page is
read once per group: its ``BLOCK_M`` rows are (token, head-in-group) pairs. It walks the
sequence's keys in tiles of ``TILE_N`` through the block table with an online softmax.
FP8 pages are decoded to float32 in registers; since a program sees one KV head, its K and
V scales are scalars, folded into the softmax scale and the final normalization. Block-scaled
pages (MXFP8/6/4, NVFP4; ``maia_serving.ops.mx``) are decoded the same way by
``mx_cache.load_mx_tile``, each value times its block scale; NVFP4's per-tensor scales fold
like FP8's. Their numerics follow ``maia_serving.ops.mx.paged_attention_mx_ref``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from maia_serving.ops.fp8 import check_paged_attention_args, check_sliding_window, scale_tensor
from maia_serving.ops.mx import MX_FORMATS, check_paged_attention_mx_args

from .mx_cache import attention_constexprs, load_mx_tile


@triton.jit
def _paged_attention_kernel(
    query_ptr,  # [total_q_tokens, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [total_q_tokens, num_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    k_scale_ptr,  # [1] or [num_kv_heads], float32
    v_scale_ptr,  # [1] or [num_kv_heads], float32
    softmax_scale,
    query_stride_t: tl.int64,
    query_stride_h: tl.int64,
    out_stride_t: tl.int64,
    out_stride_h: tl.int64,
    cache_stride_b: tl.int64,
    cache_stride_s: tl.int64,
    cache_stride_h: tl.int64,
    block_tables_stride: tl.int64,
    head_dim,
    sliding_window,  # keys each query sees, itself included (read when HAS_WINDOW)
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr,
    FP8_E5M2: tl.constexpr,
    PER_HEAD_SCALE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    MX_BLOCK: tl.constexpr,  # 0: not a block-scaled cache; the MX_* below describe the format
    MX_BITS: tl.constexpr,
    MX_MANT: tl.constexpr,
    MX_BIAS: tl.constexpr,
    MX_PER_WORD: tl.constexpr,
    MX_WORD_BYTES: tl.constexpr,
    MX_NVFP4: tl.constexpr,
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_start
    if q_block * BLOCK_Q >= q_len:  # this sequence has fewer query blocks
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    context_len = seq_len - q_len  # keys before the first query token

    rows = tl.arange(0, BLOCK_M)
    # Row r is query token q_token (counted within the sequence) of query head `head`.
    q_token = q_block * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_token < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    q = tl.load(
        query_ptr + (q_start + q_token)[:, None] * query_stride_t + head[:, None] * query_stride_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    q_pos = context_len + q_token  # absolute position of each row's token

    if IS_FP8 or MX_NVFP4:
        if PER_HEAD_SCALE:
            k_scale = tl.load(k_scale_ptr + kv_head)
            v_scale = tl.load(v_scale_ptr + kv_head)
        else:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
    else:
        k_scale = 1.0
        v_scale = 1.0
    qk_scale = softmax_scale * k_scale * 1.4426950408889634  # log2(e): exp2 below

    if CAUSAL:  # the last row of this block sees the most keys
        kv_len = context_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    else:
        kv_len = seq_len
    kv_start = 0
    if HAS_WINDOW:  # keys before the first row's window are never read (freed pages included)
        kv_start = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cache_head = kv_head * cache_stride_h
    for start in range(kv_start, kv_len, TILE_N):
        k_pos = start + tl.arange(0, TILE_N)
        k_valid = k_pos < kv_len
        page = tl.load(
            block_tables_ptr + seq * block_tables_stride + k_pos // BLOCK_SIZE,
            mask=k_valid,
            other=0,
        ).to(tl.int64)
        kv_offsets = page * cache_stride_b + (k_pos % BLOCK_SIZE) * cache_stride_s + cache_head
        kv_mask = k_valid[:, None] & dim_valid[None, :]
        if MX_BLOCK > 0:
            k = load_mx_tile(
                key_cache_ptr,
                kv_offsets,
                dims,
                kv_mask,
                MX_BLOCK,
                MX_BITS,
                MX_MANT,
                MX_BIAS,
                MX_PER_WORD,
                MX_WORD_BYTES,
                MX_NVFP4,
            )
            v = load_mx_tile(
                value_cache_ptr,
                kv_offsets,
                dims,
                kv_mask,
                MX_BLOCK,
                MX_BITS,
                MX_MANT,
                MX_BIAS,
                MX_PER_WORD,
                MX_WORD_BYTES,
                MX_NVFP4,
            )
        else:
            k = tl.load(key_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0)
            v = tl.load(value_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0)
            if IS_FP8:
                if FP8_E5M2:
                    k = k.to(tl.float8e5, bitcast=True)
                    v = v.to(tl.float8e5, bitcast=True)
                else:
                    k = k.to(tl.float8e4nv, bitcast=True)
                    v = v.to(tl.float8e4nv, bitcast=True)
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, TILE_N], log2 domain
        mask = row_valid[:, None] & k_valid[None, :]
        if CAUSAL:
            mask = mask & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows without keys yet
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows: avoid 0/0 (never stored)
    out = acc * (v_scale / l_i)[:, None]
    tl.store(
        out_ptr + (q_start + q_token)[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def _block_sizes(max_query_len: int, queries_per_kv: int, head_dim: int) -> dict[str, int]:
    """Tile sizes. ``tl.dot`` needs every dimension >= 16 and a power of two."""
    block_m = min(64, max(16, triton.next_power_of_2(max_query_len * queries_per_kv)))
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {
        "BLOCK_M": block_m,
        "BLOCK_Q": block_m // queries_per_kv,
        "TILE_N": 64 if block_d <= 128 else 32,
        "BLOCK_D": block_d,
    }


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    kv_cache_dtype: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    causal: bool = True,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton version of ``maia_serving.ops.fp8.paged_attention_ref`` (same arguments), and of
    ``maia_serving.ops.mx.paged_attention_mx_ref`` when ``kv_cache_dtype`` names a block format.

    ``max_query_len`` bounds the grid; leave it None to read it from ``query_start_loc``
    (a device sync). A smaller value than the truth leaves queries unattended. ``out``
    (the query's shape and dtype) receives the result and is returned. ``sliding_window``
    (causal only): each query sees its last that many keys, itself included.
    """
    check_sliding_window(sliding_window, causal)
    mx_fmt = MX_FORMATS.get(kv_cache_dtype)
    check = check_paged_attention_mx_args if mx_fmt else check_paged_attention_args
    fmt = check(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        kv_cache_dtype,
    )
    if mx_fmt:
        if mx_fmt.scale == "e8m0" and (k_scale is not None or v_scale is not None):
            raise ValueError(f"{mx_fmt.name} keeps all its scale in the E8M0 block scales; pass k_scale=v_scale=None")
        fmt = None
    if not math.isfinite(scale):
        raise ValueError(f"softmax scale must be finite, got {scale}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key_cache and value_cache need equal strides, got {key_cache.stride()} and {value_cache.stride()}"
        )
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(
            f"out must match the query ({query.dtype} {tuple(query.shape)}), got {out.dtype} {tuple(out.shape)}"
        )
    if (
        query.stride(-1),
        out.stride(-1),
        key_cache.stride(-1),
        block_tables.stride(-1),
    ) != (1,) * 4:
        raise ValueError("query, out, the caches and block_tables need a contiguous last dimension")
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = key_cache.shape[1:3]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_seqs else 0
    if max_query_len == 0 or query.shape[0] == 0:
        return out
    k_scale_t = scale_tensor(k_scale, num_kv_heads, query.device)
    v_scale_t = scale_tensor(v_scale, num_kv_heads, query.device)
    per_head_scale = k_scale_t.numel() > 1 or v_scale_t.numel() > 1
    if per_head_scale:  # one flag for both: give a per-tensor partner one entry per head
        k_scale_t = k_scale_t.expand(num_kv_heads).contiguous()
        v_scale_t = v_scale_t.expand(num_kv_heads).contiguous()
    queries_per_kv = num_heads // num_kv_heads
    blocks = _block_sizes(max_query_len, queries_per_kv, head_dim)
    grid = (num_seqs, triton.cdiv(max_query_len, blocks["BLOCK_Q"]), num_kv_heads)
    _paged_attention_kernel[grid](
        query_ptr=query,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        out_ptr=out,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        k_scale_ptr=k_scale_t,
        v_scale_ptr=v_scale_t,
        softmax_scale=float(scale),
        query_stride_t=query.stride(0),
        query_stride_h=query.stride(1),
        out_stride_t=out.stride(0),
        out_stride_h=out.stride(1),
        cache_stride_b=key_cache.stride(0),
        cache_stride_s=key_cache.stride(1),
        cache_stride_h=key_cache.stride(2),
        block_tables_stride=block_tables.stride(0),
        head_dim=head_dim,
        sliding_window=sliding_window or 0,
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_SIZE=block_size,
        IS_FP8=fmt is not None,
        FP8_E5M2=fmt is not None and fmt.name == "e5m2",
        PER_HEAD_SCALE=per_head_scale,
        CAUSAL=causal,
        HAS_WINDOW=sliding_window is not None,
        **attention_constexprs(mx_fmt),
        **blocks,
    )
    return out

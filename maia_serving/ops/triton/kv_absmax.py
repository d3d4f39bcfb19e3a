"""Per-KV-head absolute maximum, the statistic behind a calibrated FP8 KV scale.

Numerics follow ``maia_serving.ops.fp8.kv_absmax_ref``: NaN entries are ignored, inf counts.
Each program reduces one (head, token block) tile to a partial maximum; the wrapper takes
the maximum over the partials (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_absmax_kernel(
    x_ptr,  # [num_tokens, num_kv_heads, head_dim]
    partial_ptr,  # [num_kv_heads, num_token_blocks], float32
    x_stride_t: tl.int64,
    x_stride_h: tl.int64,
    num_tokens,
    head_dim,
    num_token_blocks,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    token_block = tl.program_id(1)
    tokens = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < num_tokens) & (dims[None, :] < head_dim)
    x = tl.load(
        x_ptr + tokens[:, None].to(tl.int64) * x_stride_t + head * x_stride_h + dims[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    a = tl.abs(x)
    a = tl.where(a <= float("inf"), a, 0.0)  # false only for NaN: drop NaN
    tl.store(
        partial_ptr + head * num_token_blocks + token_block,
        tl.max(tl.max(a, axis=1), axis=0),
    )


def _block_sizes(num_tokens: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): tiles of at most 4096 elements."""
    block_d = triton.next_power_of_2(head_dim)
    return min(triton.next_power_of_2(num_tokens), max(1, 4096 // block_d)), block_d


def kv_absmax(x: torch.Tensor) -> torch.Tensor:
    """Triton version of ``maia_serving.ops.fp8.kv_absmax_ref``: float32 ``[num_kv_heads]``."""
    if x.dim() != 3 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"x must be bf16/fp16/fp32 [num_tokens, num_kv_heads, head_dim], got {x.dtype} {tuple(x.shape)}"
        )
    if x.stride(-1) != 1:
        raise ValueError("x needs a contiguous head_dim (stride 1)")
    num_tokens, num_kv_heads, head_dim = x.shape
    if num_tokens == 0:
        return torch.zeros(num_kv_heads, dtype=torch.float32, device=x.device)
    block_t, block_d = _block_sizes(num_tokens, head_dim)
    num_token_blocks = triton.cdiv(num_tokens, block_t)
    partial = torch.empty(num_kv_heads, num_token_blocks, dtype=torch.float32, device=x.device)
    _kv_absmax_kernel[(num_kv_heads, num_token_blocks)](
        x_ptr=x,
        partial_ptr=partial,
        x_stride_t=x.stride(0),
        x_stride_h=x.stride(1),
        num_tokens=num_tokens,
        head_dim=head_dim,
        num_token_blocks=num_token_blocks,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return partial.amax(dim=1)

"""The torch path for serving on a host: paged attention batched over sequences.

Same numerics as ``paged_attention_ref`` (dequantize to float32, float32 scores and
softmax, output in the query's dtype), but all sequences in one padded batch instead
of a Python loop per sequence: on a CPU host the loop costs more than the model's
GEMMs for a decode batch. Falls back to the reference when the padded score tensor
would be large (long prefills), where the per-sequence loop is the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maia_serving.ops.fp8 import (
    attended,
    check_paged_attention_args,
    check_sliding_window,
    dequantize_fp8_ref,
    paged_attention_ref,
)

# Padded score elements above which the per-sequence reference is used instead.
MAX_BATCHED_SCORES = 1 << 24


@dataclass(frozen=True)
class PagedPlan:
    """Index tensors of one step's batch, shared by every layer (built once per step)."""

    num_seqs: int
    max_q: int
    max_len: int
    blocks: torch.Tensor  # [seqs, blocks needed for max_len]
    index: torch.Tensor  # [seqs, max_q] token row of each padded query
    valid_q: torch.Tensor  # [seqs, max_q]
    mask: torch.Tensor  # [seqs, 1 or max_q, max_len], True where a key is not attended
    batched: bool  # False: the padded scores would be too large, use the reference
    sliding_window: int | None = None  # the window the mask was built for


def plan_paged_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         num_tokens: int, num_heads: int, block_size: int, causal: bool = True,
                         max_query_len: int | None = None, sliding_window: int | None = None) -> PagedPlan:
    """The step's index tensors and mask; ``sliding_window`` as in ``paged_attention_ref``."""
    check_sliding_window(sliding_window, causal)
    num_seqs = seq_lens.shape[0]
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    max_q = (int(q_lens.max()) if num_seqs else 0) if max_query_len is None else max_query_len
    max_len = int(seq_lens.max()) if num_seqs else 0
    seq_lens_l = seq_lens.long()
    rows = torch.arange(max_q, device=seq_lens.device)
    k_pos = torch.arange(max_len, device=seq_lens.device)
    mask = k_pos[None, None, :] >= seq_lens_l[:, None, None]
    if causal:
        q_pos = seq_lens_l[:, None] - q_lens[:, None] + rows[None, :]
        mask = mask | ~attended(q_pos[:, :, None], k_pos[None, None, :], sliding_window)
    return PagedPlan(
        num_seqs=num_seqs,
        max_q=max_q,
        max_len=max_len,
        blocks=block_tables[:, : -(-max_len // block_size)].long(),
        index=(query_start_loc[:-1].long()[:, None] + rows[None, :]).clamp(max=max(num_tokens - 1, 0)),
        valid_q=rows[None, :] < q_lens[:, None],
        mask=mask,
        batched=num_seqs * num_heads * max_q * max_len <= MAX_BATCHED_SCORES,
        sliding_window=sliding_window,
    )


def _pages(cache: torch.Tensor, plan: PagedPlan, scale, fmt) -> torch.Tensor:
    """``[num_seqs, kv_heads, max_len, head_dim]`` contiguous float32 keys or values."""
    pages = cache[plan.blocks]  # [seqs, blocks, block_size, kv_heads, head_dim]
    pages = pages.reshape(plan.num_seqs, -1, *cache.shape[2:])[:, : plan.max_len]
    if fmt:
        pages = dequantize_fp8_ref(pages, scale, fmt)
    # One copy that both converts to float32 and makes each head's rows contiguous.
    out = torch.empty((plan.num_seqs, cache.shape[2], plan.max_len, cache.shape[3]), dtype=torch.float32)
    return out.copy_(pages.permute(0, 2, 1, 3))


def paged_attention_host(
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
    max_query_len: int | None = None,
    plan: PagedPlan | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Arguments and result as ``paged_attention_ref``; ``plan`` (from
    plan_paged_attention, the same batch and window) spares rebuilding the index tensors;
    ``out``, when given, receives the result (no second copy on the serving hot path)."""
    fmt = check_paged_attention_args(query, key_cache, value_cache, block_tables, seq_lens,
                                     query_start_loc, kv_cache_dtype)
    num_heads, head_dim = query.shape[1:]
    if plan is None:
        plan = plan_paged_attention(block_tables, seq_lens, query_start_loc, query.shape[0], num_heads,
                                    key_cache.shape[1], causal, max_query_len, sliding_window)
    elif plan.sliding_window != sliding_window:
        raise ValueError(f"the plan's mask is for sliding_window={plan.sliding_window}, this call asks for "
                         f"{sliding_window}: plan each window apart")
    result = torch.zeros_like(query) if out is None else out.zero_()
    if plan.num_seqs == 0 or plan.max_q == 0:
        return result
    if not plan.batched:
        return result.copy_(paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens,
                                                query_start_loc, scale, kv_cache_dtype, k_scale, v_scale,
                                                causal, sliding_window))
    num_kv_heads = key_cache.shape[2]
    keys = _pages(key_cache, plan, k_scale, fmt)
    values = _pages(value_cache, plan, v_scale, fmt)
    group = num_heads // num_kv_heads
    # [seqs, kv_heads, max_q * group, head_dim]: a KV head's queries in one matmul.
    q = query[plan.index].float().view(plan.num_seqs, plan.max_q, num_kv_heads, group, head_dim)
    q = q.permute(0, 2, 1, 3, 4).reshape(plan.num_seqs, num_kv_heads, plan.max_q * group, head_dim)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale  # [seqs, kv_heads, max_q * group, max_len]
    scores = scores.view(plan.num_seqs, num_kv_heads, plan.max_q, group, plan.max_len)
    scores.masked_fill_(plan.mask[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(plan.num_seqs, num_kv_heads, plan.max_q * group, plan.max_len)
    out_padded = torch.matmul(probs, values)  # [seqs, kv_heads, max_q * group, head_dim]
    out_padded = out_padded.view(plan.num_seqs, num_kv_heads, plan.max_q, group, head_dim)
    out_padded = out_padded.permute(0, 2, 1, 3, 4).reshape(plan.num_seqs, plan.max_q, num_heads, head_dim)
    result[plan.index[plan.valid_q]] = out_padded[plan.valid_q].to(query.dtype)
    return result

"""A batch of varlen requests over shuffled KV pages, written through the cache-write reference: the
arguments of paged attention, for the host-path tests of every KV format (element and block-scaled)."""

import torch

from maia_serving.ops import reshape_and_cache_ref
from maia_serving.ops.batch import KvQuant, PagedBatch
from maia_serving.ops.host import paged_attention_host, plan_paged_attention
from maia_serving.ops.mx import MX_FORMATS, head_bytes, reshape_and_cache_mx_ref

# (q_len, seq_len) per request
CASES = {
    "decode": [(1, 37), (1, 5), (1, 64), (1, 1)],
    "prefill": [(9, 9), (3, 3), (16, 16)],
    "chunked_and_prefix_hit": [(4, 20), (1, 33), (7, 7), (5, 48)],
}


def paged_batch(pairs, kv_cache_dtype, group, seed, k_scale, v_scale, block_size=16, num_kv_heads=2, head_dim=40):
    """(q_len, seq_len) pairs written into shuffled pages, with spare pages the batch does not read;
    ``(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, kv_cache_dtype,
    k_scale, v_scale)``."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for _, n in pairs)
    num_blocks = len(pairs) * max_blocks + 3
    if kv_cache_dtype in MX_FORMATS:
        row, cache_dtype, write = head_bytes(kv_cache_dtype, head_dim), torch.uint8, reshape_and_cache_mx_ref
    else:
        cache_dtype = torch.uint8 if kv_cache_dtype.startswith("fp8") else torch.bfloat16
        row, write = head_dim, reshape_and_cache_ref
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, row, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    perm = torch.randperm(num_blocks, generator=gen)[: len(pairs) * max_blocks].view(len(pairs), max_blocks)
    for s, (_, n) in enumerate(pairs):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen) * 3
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        slots = perm[s, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        write(k, v, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale)
    q_lens = torch.tensor([q for q, _ in pairs])
    query = torch.randn(int(q_lens.sum()), num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    qsl = torch.zeros(len(pairs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    seq_lens = torch.tensor([n for _, n in pairs], dtype=torch.int32)
    return (
        query,
        key_cache,
        value_cache,
        perm.to(torch.int32),
        seq_lens,
        qsl,
        head_dim**-0.5,
        kv_cache_dtype,
        k_scale,
        v_scale,
    )


def bundled(
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    kv_cache_dtype="auto",
    k_scale=None,
    v_scale=None,
    causal=True,
    *,
    max_query_len=None,
    plan=None,
    sliding_window=None,
):
    """The references' flat arguments as the dispatch and the host path take them: (query, key_cache,
    value_cache, PagedBatch, scale, KvQuant), so one argument tuple drives a reference and its rival."""
    batch = PagedBatch(block_tables, seq_lens, query_start_loc, max_query_len, sliding_window, causal, plan)
    return query, key_cache, value_cache, batch, scale, KvQuant(kv_cache_dtype, k_scale, v_scale)


def host_attention(*args, out=None, **kwargs):
    """``ops.host.paged_attention_host`` called with the reference's flat arguments."""
    return paged_attention_host(*bundled(*args, **kwargs), out=out)


def flat_plan(
    block_tables,
    seq_lens,
    query_start_loc,
    num_tokens,
    num_heads,
    block_size,
    causal=True,
    max_query_len=None,
    sliding_window=None,
):
    """``ops.host.plan_paged_attention`` for the batch the flat arguments describe."""
    batch = PagedBatch(block_tables, seq_lens, query_start_loc, max_query_len, sliding_window, causal)
    return plan_paged_attention(batch, num_tokens, num_heads, block_size)

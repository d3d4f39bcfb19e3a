"""Paged attention for serving on a host: one C++ call per layer where it is built
(``ops.native``: each KV row decoded while it is read, an online softmax), else the torch path
below, batched over sequences.

Same numerics as ``paged_attention_ref`` (float32 scores and softmax, output in the
query's dtype), but all sequences in one padded batch instead of a Python loop per
sequence: on a CPU host the loop costs more than the model's GEMMs for a decode batch.
Falls back to the reference when the padded score tensor would be large (long prefills),
where the per-sequence loop is the cheaper one. FP8 pages are read as their float32
codes and the K and V scales (per tensor or per KV head) applied to the scores and the
output instead, so an FP8 cache costs the pages' one conversion, as BF16 does (the
products round differently from the reference's, well within its bf16 output).

The block-scaled formats (``ops.mx``: MXFP8, MXFP6, MXFP4, NVFP4) are decoded here from only
the pages the batch reads, with lookup tables built once from the reference's decoding (values
bit-identical to ``dequantize_mx_ref``), then attended as FP8 is: ``paged_attention_mx_ref``
decodes the whole cache on every call, which serving cannot afford.
"""

from __future__ import annotations

import functools

import torch

from maia_serving.ops import native
from maia_serving.ops.batch import UNQUANTIZED, KvQuant, PagedBatch, PagedPlan
from maia_serving.ops.fp8 import (
    Fp8Format,
    attended,
    check_paged_attention_args,
    check_reshape_and_cache_args,
    check_sliding_window,
    paged_attention_ref,
    reshape_and_cache_ref,
    scale_tensor,
)
from maia_serving.ops.mx import (
    ELEMENT_FORMATS,
    MX_FORMATS,
    MxFormat,
    _check_scale,
    check_paged_attention_mx_args,
    check_reshape_and_cache_mx_args,
    decode_e8m0_ref,
    decode_table,
    reshape_and_cache_mx_ref,
)

# Padded score elements above which the per-sequence reference is used instead.
MAX_BATCHED_SCORES = 1 << 24


def plan_paged_attention(batch: PagedBatch, num_tokens: int, num_heads: int, block_size: int) -> PagedPlan:
    """The step's index tensors and mask for ``batch``'s window, for the torch path."""
    block_tables, seq_lens, query_start_loc = batch.block_tables, batch.seq_lens, batch.query_start_loc
    causal, max_query_len, sliding_window = batch.causal, batch.max_query_len, batch.sliding_window
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


@functools.cache
def _pair_table(fmt: MxFormat) -> torch.Tensor:
    """float32 ``[2^(2 * bits), 2]``: the two elements that ``2 * bits`` packed bits hold, the low
    bits first (FP4: a byte, FP6: half of a 3-byte word), so decoding is one gather per pair."""
    bits = fmt.element.bits
    codes = (torch.arange(1 << 2 * bits)[:, None] >> torch.tensor([0, bits])) & ((1 << bits) - 1)
    return decode_table(fmt.element)[codes]


@functools.cache
def _scale_table(fmt: MxFormat) -> torch.Tensor:
    """float32 ``[256]``: the block scale of each scale byte (E8M0, or NVFP4's E4M3)."""
    codes = torch.arange(256)
    return decode_e8m0_ref(codes) if fmt.scale == "e8m0" else decode_table(ELEMENT_FORMATS["e4m3"])


def _gathered(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache[blocks]`` through index_select (on a CPU 8x faster than advanced indexing)."""
    return torch.index_select(cache, 0, blocks.reshape(-1)).view(*blocks.shape, *cache.shape[1:])


def _lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` through index_select: on a CPU 2-3x faster than advanced indexing."""
    found = torch.index_select(table.to(codes.device), 0, codes.reshape(-1).long())
    return found.view(*codes.shape, *table.shape[1:])


def _element_values(elem_bytes: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """uint8 ``[..., nb, block element bytes]`` -> float32 ``[..., nb, block_size]`` (unscaled)."""
    if fmt.element.bits == 8:  # MXFP8's E4M3 is torch's float8_e4m3fn, NaN codes included
        return _lookup(_fp8_table(torch.float8_e4m3fn), elem_bytes)
    pairs = elem_bytes
    if fmt.element.bits == 6:  # 4 elements in 3 bytes: two 12-bit pairs
        b = elem_bytes.int().unflatten(-1, (-1, 3))
        pairs = torch.stack((b[..., 0] | (b[..., 1] & 0xF) << 8, b[..., 1] >> 4 | b[..., 2] << 4), -1)
    return _lookup(_pair_table(fmt), pairs).view(*elem_bytes.shape[:-1], fmt.block_size)


def _decoded(
    packed: torch.Tensor, fmt: MxFormat, scale: float | torch.Tensor | None, head_axis: int = -2
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[..., head_bytes]`` whose KV heads lie along ``head_axis`` -> (float32 elements
    ``[..., nb, block_size]``, their block scales ``[..., nb, 1]``, NVFP4's tensor scale applied as
    the reference does)."""
    blocks = packed.unflatten(-1, (-1, fmt.block_bytes))
    block_scale = _lookup(_scale_table(fmt), blocks[..., -1])
    if fmt.scale == "e4m3":
        per_head = [1] * block_scale.dim()
        per_head[head_axis] = -1
        block_scale = block_scale * scale_tensor(scale, packed.shape[head_axis], packed.device).view(per_head)
    return _element_values(blocks[..., :-1], fmt), block_scale[..., None]


def decode_mx(packed: torch.Tensor, fmt: MxFormat, head_dim: int, scale: float | torch.Tensor | None) -> torch.Tensor:
    """uint8 ``[..., num_kv_heads, head_bytes]`` -> float32 ``[..., num_kv_heads, head_dim]``, the
    values ``dequantize_mx_ref`` gives (same products in the same order), for gathered pages only."""
    elements, block_scale = _decoded(packed, fmt, scale)
    return (elements * block_scale).flatten(-2)[..., :head_dim]


def _pages(
    cache: torch.Tensor, plan: PagedPlan, scale, fmt: Fp8Format | MxFormat | None, head_dim: int
) -> torch.Tensor:
    """``[num_seqs, kv_heads, max_len, head_dim]`` float32 keys or values, each head's rows
    contiguous (an MX head that ends in a partial block: a slice of its padded rows)."""
    pages = _gathered(cache, plan.blocks)  # [seqs, blocks, block_size, kv_heads, head_dim or head_bytes]
    pages = pages.reshape(plan.num_seqs, -1, *cache.shape[2:])[:, : plan.max_len]
    if isinstance(fmt, MxFormat):
        # Each head's rows contiguous in the bytes (the cheapest place to reorder), so every later step is.
        elements, block_scale = _decoded(pages.transpose(1, 2).contiguous(), fmt, scale, head_axis=1)
        return elements.mul_(block_scale).flatten(-2)[..., :head_dim]  # the reference's products, in its order
    out = torch.empty((plan.num_seqs, cache.shape[2], plan.max_len, head_dim), dtype=torch.float32)
    if fmt:  # the codes' values, looked up (torch converts FP8 one element at a time, 3x slower)
        index = torch.empty(out.shape, dtype=torch.int64).copy_(pages.permute(0, 2, 1, 3))  # the result's order
        torch.index_select(_fp8_table(fmt.torch_dtype), 0, index.view(-1), out=out.view(-1))
        return out
    # One copy that both converts to float32 and makes each head's rows contiguous.
    return out.copy_(pages.permute(0, 2, 1, 3))


@functools.cache
def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 ``[256]``: the value of each FP8 code, as torch converts it (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _per_kv_head(scale, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """An FP8 scale shaped ``[1, 1 or kv_heads, 1, 1]`` for ``[seqs, kv_heads, rows, cols]`` results."""
    return scale_tensor(scale, num_kv_heads, device).view(1, -1, 1, 1)


def _check_args(
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, kv_cache_dtype, k_scale, v_scale
) -> Fp8Format | MxFormat | None:
    """The reference's checks for the cache's format; the MX formats take no per-tensor scale."""
    mx_fmt = MX_FORMATS.get(kv_cache_dtype)
    if mx_fmt is None:
        return check_paged_attention_args(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, kv_cache_dtype
        )
    check_paged_attention_mx_args(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, kv_cache_dtype
    )
    if mx_fmt.scale == "e8m0" and (k_scale is not None or v_scale is not None):
        raise ValueError(f"{mx_fmt.name} keeps all its scale in the E8M0 block scales; pass k_scale=v_scale=None")
    return mx_fmt


def _mx_fallback(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PagedBatch,
    plan: PagedPlan,
    scale: float,
    fmt: MxFormat,
    kv: KvQuant,
) -> torch.Tensor:
    """The per-sequence reference over the plan's pages alone, decoded into a float32 cache of
    their own (block ``i * blocks + j`` is sequence i's j-th page)."""
    head_dim = query.shape[-1]
    decoded = [
        decode_mx(_gathered(cache, plan.blocks).flatten(0, 1), fmt, head_dim, s)
        for cache, s in ((key_cache, kv.k_scale), (value_cache, kv.v_scale))
    ]
    tables = torch.arange(plan.blocks.numel(), dtype=torch.int64, device=query.device).view(plan.blocks.shape)
    return paged_attention_ref(
        query,
        *decoded,
        tables,
        batch.seq_lens,
        batch.query_start_loc,
        scale,
        "auto",
        causal=batch.causal,
        sliding_window=batch.sliding_window,
    )


def _native_kernel(dtype: torch.dtype, *tensors: torch.Tensor):
    """The C++ module (``ops.native``) where it is built and takes these tensors: ``dtype`` (the query's or
    the new keys') one it dispatches on, every tensor's rows contiguous; None otherwise."""
    kernel = native.module()
    if kernel is None or dtype not in _NATIVE_DTYPES or any(t.stride(-1) != 1 for t in tensors):
        return None
    return kernel


def _kernel_scales(k_scale, v_scale, num_kv_heads: int, device: torch.device, used: bool):
    """K and V scales as the kernels read them: float32 ``[1]`` or ``[num_kv_heads]``; a 1.0 the kernel
    ignores where the format takes none (``used`` False)."""
    return ((scale_tensor(s, num_kv_heads, device).contiguous() if used else _ONE) for s in (k_scale, v_scale))


def _native(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    fmt: Fp8Format | MxFormat | None,
    kv: KvQuant,
) -> bool:
    """Attend through the C++ kernel into ``out``; False, with nothing done, where it is not built or
    cannot take these tensors (then the torch path below runs)."""
    kernel = _native_kernel(query.dtype, query, out, key_cache, value_cache)
    if kernel is None or (fmt is None and key_cache.dtype != query.dtype):
        return False
    if isinstance(fmt, MxFormat):
        kind, elements, scales = native.BLOCK_SCALED, _mx_element_table(fmt), _scale_table(fmt)
        bits, block, block_bytes = fmt.element.bits, fmt.block_size, fmt.block_bytes
    else:
        kind = (native.FP8_E4M3 if fmt.torch_dtype == torch.float8_e4m3fn else native.FP8_E5M2) if fmt else native.PLAIN
        elements, scales, bits, block, block_bytes = _NO_TABLE, _NO_TABLE, 0, 0, 0
    per_head = isinstance(fmt, Fp8Format) or (isinstance(fmt, MxFormat) and fmt.scale == "e4m3")
    k_sc, v_sc = _kernel_scales(kv.k_scale, kv.v_scale, key_cache.shape[2], query.device, per_head)
    kernel.paged_attention(
        out,
        query,
        key_cache,
        value_cache,
        batch.block_tables.long().contiguous(),
        batch.seq_lens.long().contiguous(),
        batch.query_start_loc.long().contiguous(),
        float(scale),
        kind,
        bits,
        block,
        block_bytes,
        elements,
        scales,
        k_sc,
        v_sc,
        batch.causal,
        batch.sliding_window or 0,
    )
    return True


_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ONE = torch.ones(1, dtype=torch.float32)
_NO_TABLE = torch.empty(0, dtype=torch.float32)


@functools.cache
def _mx_element_table(fmt: MxFormat) -> torch.Tensor:
    """What the kernel looks elements up in: the FP6/FP4 pair table (FP8 elements, E4M3, it decodes itself)."""
    if fmt.element.bits == 8 and fmt.element.name != "e4m3":
        raise NotImplementedError(
            f"the native host attention decodes 8-bit MX elements as E4M3, not {fmt.element.name}"
        )
    return _NO_TABLE if fmt.element.bits == 8 else _pair_table(fmt).contiguous()


def reshape_and_cache_host(
    key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype: str = "auto", k_scale=None, v_scale=None
) -> None:
    """``reshape_and_cache_ref``'s checks and bytes, in one C++ call where the native module is built: an
    FP8 cache, or an unquantized one of the rows' own dtype (a cast to another dtype takes the reference)."""
    fmt = check_reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    kernel = _native_kernel(key.dtype, key, value, key_cache, value_cache)
    if kernel is not None and fmt is None and key_cache.dtype == key.dtype == value.dtype:
        kernel.reshape_and_cache_plain(key, value, key_cache, value_cache, slot_mapping.long().contiguous())
        return
    if fmt is None or kernel is None:
        reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        return
    k_sc, v_sc = _kernel_scales(k_scale, v_scale, key.shape[1], key.device, True)
    kernel.reshape_and_cache_fp8(
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping.long().contiguous(),
        fmt.torch_dtype == torch.float8_e4m3fn,
        fmt.max_value,
        k_sc,
        v_sc,
    )


def reshape_and_cache_mx_host(
    key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype: str, k_scale=None, v_scale=None
) -> None:
    """``reshape_and_cache_mx_ref``'s checks and bytes, in one C++ call where the native module is built
    (the reference's chain of small ops per layer otherwise)."""
    fmt = check_reshape_and_cache_mx_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    kernel = _native_kernel(key.dtype, key, value, key_cache, value_cache)
    if kernel is None:
        reshape_and_cache_mx_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        return
    _check_scale(fmt, k_scale)
    _check_scale(fmt, v_scale)
    elem = fmt.element
    k_sc, v_sc = _kernel_scales(k_scale, v_scale, key.shape[1], key.device, fmt.scale == "e4m3")
    kernel.reshape_and_cache_block_scaled(
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping.long().contiguous(),
        elem.bits,
        elem.mantissa_bits,
        elem.bias,
        elem.max_code,
        elem.emax,
        elem.max_value,
        fmt.block_size,
        fmt.scale == "e8m0",
        k_sc,
        v_sc,
    )


def paged_attention_host(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    kv: KvQuant = UNQUANTIZED,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_attention_ref``'s result (``paged_attention_mx_ref``'s for the block-scaled formats) for this
    batch; ``batch.plan`` (from plan_paged_attention, the same batch and window) spares rebuilding the index
    tensors; ``out``, when given, receives the result (no second copy on the serving hot path)."""
    flat = (batch.block_tables, batch.seq_lens, batch.query_start_loc)  # as the reference takes them
    fmt = _check_args(query, key_cache, value_cache, *flat, kv.dtype, kv.k_scale, kv.v_scale)
    num_heads, head_dim = query.shape[1:]
    plan = batch.plan
    if plan is not None and plan.sliding_window != batch.sliding_window:
        raise ValueError(
            f"the plan's mask is for sliding_window={plan.sliding_window}, this call asks for "
            f"{batch.sliding_window}: plan each window apart"
        )
    result = torch.zeros_like(query) if out is None else out.zero_()
    if _native(result, query, key_cache, value_cache, batch, scale, fmt, kv):
        return result  # the kernel needs no plan: the engines skip building one where it is built
    if plan is None:
        plan = plan_paged_attention(batch, query.shape[0], num_heads, key_cache.shape[1])
    if plan.num_seqs == 0 or plan.max_q == 0:
        return result
    if not plan.batched and isinstance(fmt, MxFormat):
        return result.copy_(_mx_fallback(query, key_cache, value_cache, batch, plan, scale, fmt, kv))
    if not plan.batched:
        reference = paged_attention_ref(
            query,
            key_cache,
            value_cache,
            *flat,
            scale,
            kv.dtype,
            kv.k_scale,
            kv.v_scale,
            batch.causal,
            batch.sliding_window,
        )
        return result.copy_(reference)
    k_scale, v_scale = kv.k_scale, kv.v_scale
    num_kv_heads = key_cache.shape[2]
    keys = _pages(key_cache, plan, k_scale, fmt, head_dim)
    values = _pages(value_cache, plan, v_scale, fmt, head_dim)
    group = num_heads // num_kv_heads
    # [seqs, kv_heads, max_q * group, head_dim]: a KV head's queries in one matmul.
    q = query[plan.index].float().view(plan.num_seqs, plan.max_q, num_kv_heads, group, head_dim)
    q = q.permute(0, 2, 1, 3, 4).reshape(plan.num_seqs, num_kv_heads, plan.max_q * group, head_dim)
    fp8 = isinstance(fmt, Fp8Format)
    score_scale = scale * _per_kv_head(k_scale, num_kv_heads, query.device) if fp8 else scale
    scores = torch.matmul(q, keys.transpose(2, 3)) * score_scale  # [seqs, kv_heads, max_q * group, max_len]
    scores = scores.view(plan.num_seqs, num_kv_heads, plan.max_q, group, plan.max_len)
    scores.masked_fill_(plan.mask[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(plan.num_seqs, num_kv_heads, plan.max_q * group, plan.max_len)
    out_padded = torch.matmul(probs, values)  # [seqs, kv_heads, max_q * group, head_dim]
    if fp8:
        out_padded *= _per_kv_head(v_scale, num_kv_heads, query.device)
    out_padded = out_padded.view(plan.num_seqs, num_kv_heads, plan.max_q, group, head_dim)
    out_padded = out_padded.permute(0, 2, 1, 3, 4).reshape(plan.num_seqs, plan.max_q, num_heads, head_dim)
    result[plan.index[plan.valid_q]] = out_padded[plan.valid_q].to(query.dtype)
    return result

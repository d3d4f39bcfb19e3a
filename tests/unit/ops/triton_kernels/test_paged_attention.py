"""Paged attention: the kernel vs the float32 reference, and the reference vs dense float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from maia_serving.ops.fp8 import (
    dequantize_fp8_ref,
    paged_attention_ref,
    quantize_fp8_ref,
)
from maia_serving.ops.triton import paged_attention

NUM_KV_HEADS = 2

# (seq_len, q_len) per sequence; the queries are the last q_len tokens of the context.
BATCHES = {
    "decode": [(37, 1), (5, 1), (64, 1)],
    "prefill": [(20, 20), (33, 33)],
    "chunked_prefill": [(50, 7), (40, 16)],
    "mixed": [(37, 1), (12, 0), (20, 20), (50, 7)],
}


# Output tolerances by query dtype: about one rounding of the output (bf16: up to 2^-7).
TOLERANCES = {
    torch.bfloat16: {"atol": 1e-3, "rtol": 8e-3},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    # GPU dots round fp32 operands to TF32; the interpreter multiplies in fp32.
    torch.float32: {"atol": 2e-3, "rtol": 2e-3} if torch.cuda.is_available() else {"atol": 1e-5, "rtol": 1e-5},
}


@dataclass
class Case:
    query: torch.Tensor  # [total_q, num_heads, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    keys: list[torch.Tensor]  # per sequence, [seq_len, num_kv_heads, head_dim] float64
    values: list[torch.Tensor]
    k_scale: torch.Tensor | float | None
    v_scale: torch.Tensor | float | None

    def args(self, scale: float, kv_cache_dtype: str, scales: bool = True) -> tuple:
        """The positional arguments paged_attention and its reference share, up to the scales."""
        head = (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            scale,
            kv_cache_dtype,
        )
        return (*head, self.k_scale, self.v_scale) if scales else head


def _make_case(batch, num_heads, head_dim, block_size, kv_cache_dtype, q_dtype, seed, device) -> Case:
    """Random queries and a paged cache with shuffled blocks; the true K/V kept densely."""
    g = torch.Generator().manual_seed(seed)
    num_pages = [math.ceil(s / block_size) for s, _ in batch]
    num_blocks = sum(num_pages) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((len(batch), max(num_pages)), -1, dtype=torch.int32)
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    fp8 = kv_cache_dtype.startswith("fp8")
    fmt = "e5m2" if kv_cache_dtype == "fp8_e5m2" else "e4m3"
    if fp8:  # non-unit scales: per-head for K, per-tensor for V
        k_scale, v_scale = torch.tensor([0.004, 0.011]), 0.007
    else:
        k_scale = v_scale = None
    cache_dtype = torch.uint8 if fp8 else {"bf16": torch.bfloat16, "auto": torch.float32}[kv_cache_dtype]
    key_cache, value_cache = (
        torch.zeros(shape, dtype=cache_dtype),
        torch.zeros(shape, dtype=cache_dtype),
    )
    keys, values = [], []
    for i, (seq_len, _) in enumerate(batch):
        blocks = [order.pop() for _ in range(num_pages[i])]
        block_tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for cache, dense, scale in (
            (key_cache, keys, k_scale),
            (value_cache, values, v_scale),
        ):
            x = torch.randn(len(blocks) * block_size, NUM_KV_HEADS, head_dim, generator=g)
            if fp8:
                codes = quantize_fp8_ref(x, scale, fmt)
                cache[blocks] = codes.reshape(-1, block_size, NUM_KV_HEADS, head_dim)
                x = dequantize_fp8_ref(codes, scale, fmt)
            else:
                x = x.to(cache_dtype)
                cache[blocks] = x.reshape(-1, block_size, NUM_KV_HEADS, head_dim)
            dense.append(x[:seq_len].double())
    q_lens = torch.tensor([q for _, q in batch])
    query_start_loc = torch.zeros(len(batch) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=g).to(q_dtype)
    seq_lens = torch.tensor([s for s, _ in batch], dtype=torch.int32)

    def dev(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    return Case(
        dev(query),
        dev(key_cache),
        dev(value_cache),
        dev(block_tables),
        dev(seq_lens),
        dev(query_start_loc),
        keys,
        values,
        dev(k_scale),
        dev(v_scale),
    )


def _dense_attention(case: Case, scale: float, causal: bool) -> torch.Tensor:
    """Naive float64 attention, one query row and head at a time, from the dense K/V."""
    query = case.query.cpu().double()
    out = torch.zeros_like(query)
    starts = case.query_start_loc.tolist()
    group = query.shape[1] // NUM_KV_HEADS
    for i, (k, v) in enumerate(zip(case.keys, case.values)):
        seq_len, q_len = k.shape[0], starts[i + 1] - starts[i]
        for j in range(q_len):
            visible = seq_len - q_len + j + 1 if causal else seq_len
            for h in range(query.shape[1]):
                scores = k[:visible, h // group] @ query[starts[i] + j, h] * scale
                out[starts[i] + j, h] = torch.softmax(scores, 0) @ v[:visible, h // group]
    return out


def _run_both(case: Case, scale: float, kv_cache_dtype: str, causal: bool = True):
    args = (*case.args(scale, kv_cache_dtype), causal)
    return paged_attention(*args), paged_attention_ref(*args)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2", "bf16"])
def test_kernel_matches_reference(batch, group, kv_cache_dtype, device):
    head_dim = 80  # not a power of two
    case = _make_case(
        BATCHES[batch],
        NUM_KV_HEADS * group,
        head_dim,
        16,
        kv_cache_dtype,
        torch.bfloat16,
        seed=group,
        device=device,
    )
    out, ref = _run_both(case, head_dim**-0.5, kv_cache_dtype)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize(
    ("q_dtype", "kv_cache_dtype", "head_dim", "block_size", "causal"),
    [
        (torch.float32, "auto", 64, 32, True),
        (torch.float32, "fp8_e4m3", 96, 16, False),
        (torch.float16, "fp8_e5m2", 72, 32, True),
    ],
)
def test_dtypes_head_sizes_and_non_causal(q_dtype, kv_cache_dtype, head_dim, block_size, causal, device):
    case = _make_case(
        BATCHES["mixed"],
        4,
        head_dim,
        block_size,
        kv_cache_dtype,
        q_dtype,
        seed=head_dim,
        device=device,
    )
    out, ref = _run_both(case, 0.1, kv_cache_dtype, causal)
    torch.testing.assert_close(out, ref, **TOLERANCES[q_dtype])


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "auto"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_dense_float64(batch, kv_cache_dtype, causal):
    case = _make_case(BATCHES[batch], 4, 40, 16, kv_cache_dtype, torch.float32, seed=7, device="cpu")
    ref = paged_attention_ref(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        0.15,
        kv_cache_dtype,
        case.k_scale,
        case.v_scale,
        causal,
    )
    torch.testing.assert_close(ref.double(), _dense_attention(case, 0.15, causal), atol=1e-5, rtol=1e-5)


def test_out_and_max_query_len(device):
    case = _make_case(BATCHES["mixed"], 4, 64, 16, "fp8_e4m3", torch.bfloat16, seed=3, device=device)
    out = torch.full_like(case.query, float("nan"))
    result = paged_attention(*case.args(0.125, "fp8_e4m3"), max_query_len=20, out=out)
    assert result is out
    ref = paged_attention_ref(*case.args(0.125, "fp8_e4m3"))
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16])


def test_bad_arguments_raise_clear_errors(device):
    case = _make_case(BATCHES["decode"], 4, 64, 16, "bf16", torch.bfloat16, seed=0, device=device)
    args = case.args(0.125, "bf16", scales=False)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(case.query[:, :3], *args[1:])
    with pytest.raises(ValueError, match="torch.uint8"):
        paged_attention(*args[:7], "fp8")
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(*args[:5], case.query_start_loc[:-1], *args[6:])
    with pytest.raises(ValueError, match="out must match"):
        paged_attention(*args, out=case.query.float())


@pytest.mark.parametrize("batch", ["decode", "chunked_prefill", "mixed"])
@pytest.mark.parametrize("window", [1, 7, 16, 70])
def test_sliding_window_matches_reference(batch, window, device):
    """Windows below, at and above a tile's and a page's size; 70 covers every key. The kernel
    starts each program's key loop at its first row's window, so it never reads older pages."""
    case = _make_case(BATCHES[batch], 4, 64, 16, "fp8_e4m3", torch.bfloat16, seed=window, device=device)
    args = case.args(0.125, "fp8_e4m3")
    out = paged_attention(*args, sliding_window=window)
    ref = paged_attention_ref(*args, sliding_window=window)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16])
    if window < 50:  # the window bites: full attention differs
        assert not torch.allclose(out, paged_attention_ref(*args), **TOLERANCES[torch.bfloat16])


def test_sliding_window_argument_errors(device):
    case = _make_case(BATCHES["decode"], 4, 64, 16, "bf16", torch.bfloat16, seed=0, device=device)
    args = case.args(0.125, "bf16", scales=False)
    with pytest.raises(ValueError, match="positive int"):
        paged_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="needs causal"):
        paged_attention(*args, causal=False, sliding_window=4)


def test_sliding_window_never_reads_pages_before_the_window(device):
    """vLLM frees the pages a window has passed (their block-table entries go stale): NaN there
    must not reach the output. Decode at position 63 with a window of 16 reads keys 48..63 only."""
    case = _make_case([(64, 1)], 4, 64, 16, "bf16", torch.bfloat16, seed=5, device=device)
    args = case.args(0.125, "bf16", scales=False)
    ref = paged_attention_ref(*args, sliding_window=16)
    stale = case.block_tables[0, :3].long()
    for cache in (case.key_cache, case.value_cache):
        cache[stale] = float("nan")
    torch.testing.assert_close(paged_attention(*args, sliding_window=16), ref, **TOLERANCES[torch.bfloat16])

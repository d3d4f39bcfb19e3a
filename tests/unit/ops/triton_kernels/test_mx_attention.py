"""Paged attention over MX/NVFP4 caches: the kernel's decoding against the spec formula (exactly),
and the kernel against paged_attention_mx_ref on decode, prefill, chunked prefill and GQA."""

from __future__ import annotations

import math

import pytest
import torch

from maia_serving.ops.mx import MX_FORMATS, head_bytes, paged_attention_mx_ref, quantize_mx_ref
from maia_serving.ops.triton import paged_attention
from tests.utils.mx_spec_table import BLOCK_SIZE, ELEMENT, SPECS, decode, decode_e8m0, pack_block

# Scale codes that keep every element finite (E8M0), and NVFP4's E4M3 block scales.
SCALE_CODES = {"e8m0": [0, 1, 100, 127, 130, 200, 0xFF, 127], "nvfp4": [0b0_0111_000, 0b0_0001_011]}
NVFP4_TENSOR_SCALE = 0.37


def _int32(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _every_code_row(fmt: str) -> tuple[list[int], list[int]]:
    """(element codes, scale codes) of one head's row that holds every element code."""
    bits, size = SPECS[ELEMENT[fmt]].bits, BLOCK_SIZE[fmt]
    num_blocks = max(2, (1 << bits) // size)
    codes = [i % (1 << bits) for i in range(num_blocks * size)]
    scales = SCALE_CODES["nvfp4" if fmt == "nvfp4" else "e8m0"]
    return codes, [scales[b % len(scales)] for b in range(num_blocks)]


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_kernel_decodes_every_code(fmt, device):
    """One key, so the output is its value row exactly: element times block scale (NVFP4: times the
    tensor scale, rounded once), NaN where the scale is NaN, against the spec formula."""
    codes, scales = _every_code_row(fmt)
    size, bits = BLOCK_SIZE[fmt], SPECS[ELEMENT[fmt]].bits
    head_dim = len(codes)
    row = sum((pack_block(codes[b * size : (b + 1) * size], s, bits) for b, s in enumerate(scales)), [])
    v_cache = torch.zeros(1, 16, 1, head_bytes(fmt, head_dim), dtype=torch.uint8, device=device)
    v_cache[0, 0, 0] = torch.tensor(row, dtype=torch.uint8)
    k_cache = torch.zeros_like(v_cache)  # all codes 0: the single score is 0
    query = torch.zeros(1, 1, head_dim, device=device)
    t = NVFP4_TENSOR_SCALE if fmt == "nvfp4" else None
    out = paged_attention(
        query, k_cache, v_cache, _int32([[0]], device), _int32([1], device), _int32([0, 1], device), 1.0, fmt, t, t
    )

    spec = SPECS[ELEMENT[fmt]]
    expected = []
    for i, code in enumerate(codes):
        scale_code = scales[i // size]
        if fmt == "nvfp4":
            value = decode(code, spec) * decode(scale_code, SPECS["e4m3"]) * NVFP4_TENSOR_SCALE
        else:
            value = decode(code, spec) * decode_e8m0(scale_code)
        expected.append(value)
    expected = torch.tensor(expected, dtype=torch.float32)
    got = out.reshape(head_dim).cpu()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    wrong = (got != expected) & ~nan
    assert not wrong.any(), [(i, codes[i], got[i].item(), expected[i].item()) for i in wrong.nonzero().flatten()]


# (seq_len, q_len) per sequence: decode, a whole prefill, a chunked prefill and an idle sequence.
BATCHES = {"decode": [(37, 1), (5, 1)], "mixed": [(20, 20), (50, 7), (9, 0), (33, 1)]}


def _paged_case(fmt: str, batch, num_heads: int, head_dim: int, device):
    """Random MX caches (every block written) behind shuffled block tables, and fp32 queries."""
    g = torch.Generator().manual_seed(len(batch) * 31 + num_heads)
    page, num_kv_heads = 16, 2
    pages = [math.ceil(s / page) for s, _ in batch]
    num_blocks = sum(pages) + 1
    scale = torch.tensor([0.05, 0.2]) if fmt == "nvfp4" else None
    caches = [
        quantize_mx_ref(torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g) * 4, fmt, scale)
        for _ in range(2)
    ]
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(batch), max(pages), dtype=torch.int32)
    for i, n in enumerate(pages):
        tables[i, :n] = torch.tensor([order.pop() for _ in range(n)])
    q_lens = torch.tensor([q for _, q in batch])
    starts = torch.zeros(len(batch) + 1, dtype=torch.int32)
    starts[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=g)
    seq_lens = torch.tensor([s for s, _ in batch], dtype=torch.int32)
    tensors = [query, *caches, tables, seq_lens, starts]
    scale = scale.to(device) if scale is not None else None
    return [t.to(device) for t in tensors], scale


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6", "mxfp8", "nvfp4"])
@pytest.mark.parametrize(("batch", "num_heads"), [("decode", 8), ("mixed", 2)], ids=["decode-gqa4", "mixed"])
def test_kernel_matches_reference(fmt, batch, num_heads, device):
    head_dim = 80  # 3 MX blocks, the last padded
    args, scale = _paged_case(fmt, BATCHES[batch], num_heads, head_dim, device)
    softmax_scale = head_dim**-0.5
    got = paged_attention(*args, softmax_scale, fmt, scale, scale)
    expected = paged_attention_mx_ref(*args, softmax_scale, fmt, scale, scale)
    tol = 2e-3 if torch.cuda.is_available() else 1e-5  # GPU dots round fp32 operands to TF32
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_argument_errors(device):
    args, _ = _paged_case("mxfp4", BATCHES["decode"], 2, 64, device)
    with pytest.raises(ValueError, match="E8M0"):
        paged_attention(*args, 0.125, "mxfp4", 1.0, 1.0)
    with pytest.raises(ValueError, match=r"must be uint8 \[num_blocks, block_size, num_kv_heads, 66\]"):
        paged_attention(*args, 0.125, "mxfp8")
    query = args[0]
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(query[:, :1].expand(-1, 3, -1).contiguous(), *args[1:], 0.125, "mxfp4")

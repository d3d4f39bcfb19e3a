"""MX/NVFP4 quantization on the cache write path: the reshape_and_cache_mx kernel against the torch
reference (bit for bit) and against the blocks worked out by hand from the OCP MX spec."""

from __future__ import annotations

import pytest
import torch

from maia_serving.ops.mx import MX_FORMATS, head_bytes, reshape_and_cache_mx_ref
from maia_serving.ops.triton import reshape_and_cache_mx
from tests.utils.mx_spec_table import BLOCK_CASES, BLOCK_SIZE, ELEMENT, SPECS, pack_block

SENTINEL = 0x55  # bytes the writes must not touch
NUM_BLOCKS, PAGE = 2, 4

# NVFP4 divides by a zero block scale, and multiplies an inf by 0, in lanes that tl.where discards.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def _inputs(head_dim: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """3 tokens x 2 heads over many magnitudes (saturation, subnormals, E8M0 clamps), a NaN and an inf."""
    g = torch.Generator().manual_seed(head_dim)
    out = []
    for _ in range(2):
        x = torch.randn(3, 2, head_dim, generator=g)
        x *= 10.0 ** torch.empty(3, 2, head_dim).uniform_(-4, 4, generator=g)
        x[2, 1, 40:] *= 2.0**-140  # a block below E8M0's range (token 1 is padding)
        out.append(x)
    out[0][0, 1, 5] = float("nan")
    out[1][2, 0, -1] = float("-inf")
    return tuple(x.to(dtype=dtype, device=device) for x in out)


def _caches(fmt: str, num_kv_heads: int, head_dim: int, device) -> list[torch.Tensor]:
    shape = (NUM_BLOCKS, PAGE, num_kv_heads, head_bytes(fmt, head_dim))
    return [torch.full(shape, SENTINEL, dtype=torch.uint8, device=device) for _ in range(4)]


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
@pytest.mark.parametrize(("head_dim", "dtype"), [(64, torch.bfloat16), (80, torch.float32)])
def test_cache_write_bit_exact(fmt, head_dim, dtype, device):
    """Padding slots (-1) and unused slots keep the sentinel: the reference leaves them too."""
    key, value = _inputs(head_dim, dtype, device)
    slots = torch.tensor([6, -1, 1], device=device)
    scales = (torch.tensor([0.05, 3.0], device=device), 0.5) if fmt == "nvfp4" else (None, None)
    caches = _caches(fmt, 2, head_dim, device)
    reshape_and_cache_mx(key, value, caches[0], caches[1], slots, fmt, *scales)
    reshape_and_cache_mx_ref(key, value, caches[2], caches[3], slots, fmt, *scales)
    assert torch.equal(caches[0], caches[2]), (caches[0] != caches[2]).nonzero().tolist()[:8]
    assert torch.equal(caches[1], caches[3]), (caches[1] != caches[3]).nonzero().tolist()[:8]
    assert (caches[0][0, 0] == SENTINEL).all() and (caches[0][1, 3] == SENTINEL).all()


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_kernel_writes_the_hand_worked_blocks(fmt, device):
    """Each of the format's spec cases as one KV head of one token (NVFP4: its own head scale)."""
    cases = [c for c in BLOCK_CASES if c.fmt == fmt]
    size = BLOCK_SIZE[fmt]
    rows = [list(c.values) + [0.0] * (size - len(c.values)) for c in cases]
    x = torch.tensor([rows], dtype=torch.float32, device=device)
    scale = torch.tensor([c.tensor_scale for c in cases], device=device) if fmt == "nvfp4" else None
    caches = _caches(fmt, len(cases), size, device)
    reshape_and_cache_mx(x, -x, caches[0], caches[1], torch.tensor([2], device=device), fmt, scale, scale)
    bits = SPECS[ELEMENT[fmt]].bits
    for head, case in enumerate(cases):
        codes = list(case.codes) + [0] * (size - len(case.codes))
        assert caches[0][0, 2, head].tolist() == pack_block(codes, case.scale_code, bits), case.name


def test_strided_inputs_and_int32_slots(device):
    """Keys and values as views into one fused QKV buffer, as the engines pass them."""
    qkv = torch.randn(3, 6, 64, device=device)
    key, value = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([0, 7, 3], dtype=torch.int32, device=device)
    caches = _caches("mxfp4", 2, 64, device)
    reshape_and_cache_mx(key, value, caches[0], caches[1], slots, "mxfp4")
    reshape_and_cache_mx_ref(key.contiguous(), value.contiguous(), caches[2], caches[3], slots, "mxfp4")
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_argument_errors(device):
    key = torch.zeros(1, 2, 64, device=device)
    caches = _caches("mxfp4", 2, 64, device)
    slots = torch.tensor([0], device=device)
    with pytest.raises(ValueError, match="E8M0"):
        reshape_and_cache_mx(key, key, caches[0], caches[1], slots, "mxfp4", 1.0, 1.0)
    with pytest.raises(ValueError, match=r"uint8 \[num_blocks, block_size, 2, 66\]"):
        reshape_and_cache_mx(key, key, caches[0], caches[1], slots, "mxfp8")
    with pytest.raises(ValueError, match="unknown block-scaled KV format"):
        reshape_and_cache_mx(key, key, caches[0], caches[1], slots, "fp8_e4m3")

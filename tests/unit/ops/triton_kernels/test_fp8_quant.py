"""FP8 quantization on the cache write path: the reshape_and_cache kernel vs the references."""

from __future__ import annotations

import pytest
import torch

from maia_serving.ops.fp8 import (
    FP8_FORMATS,
    dequantize_fp8_ref,
    get_fp8_format,
    quantize_fp8_ref,
    reshape_and_cache_ref,
    resolve_kv_cache_dtype,
)
from maia_serving.ops.triton import reshape_and_cache

NUM_BLOCKS = 5
SENTINEL = 0x55  # bytes the writes must not touch


def _inputs(num_tokens: int, num_kv_heads: int, head_dim: int, dtype, seed: int, device):
    """Keys/values over many magnitudes (saturating and subnormal codes) plus inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
        x *= 10.0 ** torch.empty(x.shape).uniform_(-6, 4, generator=g)
        x[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
        out.append(x.to(dtype=dtype, device=device))
    return out


def _slots(num_tokens: int, block_size: int, seed: int, device) -> torch.Tensor:
    """Distinct random slots; every third token is padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=g)[:num_tokens]
    slots[1::3] = -1
    return slots.to(device)


def _scales(kind: str, num_kv_heads: int, device):
    if kind == "tensor":
        return torch.tensor(0.037, device=device), 2.5
    k = torch.linspace(0.01, 3.0, num_kv_heads, device=device)
    return k, k.flip(0) * 0.5


def _assert_same_codes(actual: torch.Tensor, expected: torch.Tensor, fmt: str) -> None:
    """Bit-exact FP8 codes, except that a NaN may be any NaN code (its sign is not specified)."""
    dtype = get_fp8_format(fmt).torch_dtype
    nan_a, nan_e = actual.view(dtype).isnan(), expected.view(dtype).isnan()
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    torch.testing.assert_close(actual[~nan_a], expected[~nan_e], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_kind", ["tensor", "head"])
@pytest.mark.parametrize(
    ("head_dim", "block_size", "dtype"),
    [(80, 16, torch.bfloat16), (96, 32, torch.float16), (72, 16, torch.float32)],
)
def test_fp8_cache_write_bit_exact(fmt, scale_kind, head_dim, block_size, dtype, device):
    num_tokens, num_kv_heads = 9, 3
    key, value = _inputs(num_tokens, num_kv_heads, head_dim, dtype, seed=head_dim, device=device)
    slots = _slots(num_tokens, block_size, seed=block_size, device=device)
    k_scale, v_scale = _scales(scale_kind, num_kv_heads, device)
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, SENTINEL, dtype=torch.uint8, device=device) for _ in range(4)]
    kv_cache_dtype = f"fp8_{fmt}"

    reshape_and_cache(key, value, caches[0], caches[1], slots, kv_cache_dtype, k_scale, v_scale)
    reshape_and_cache_ref(key, value, caches[2], caches[3], slots, kv_cache_dtype, k_scale, v_scale)

    f = FP8_FORMATS[fmt]
    valid = slots >= 0
    block, row = slots[valid] // block_size, slots[valid] % block_size
    for cache, ref_cache, x, scale in (
        (caches[0], caches[2], key, k_scale),
        (caches[1], caches[3], value, v_scale),
    ):
        _assert_same_codes(cache, ref_cache, fmt)
        s = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1, 1)
        direct = torch.clamp(x[valid].float() / s, -f.max_value, f.max_value).to(f.torch_dtype)
        _assert_same_codes(cache[block, row], direct.view(torch.uint8), fmt)
        untouched = torch.ones(shape[:2], dtype=torch.bool, device=device)
        untouched[block, row] = False
        assert bool((cache[untouched] == SENTINEL).all()), "a padding or unused slot was written"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_special_values(fmt, device):
    """inf saturates to +-max, NaN stays NaN, values past max saturate, subnormals survive."""
    f = FP8_FORMATS[fmt]
    tiny = 2.0**-9 if fmt == "e4m3" else 2.0**-16  # the smallest subnormal
    row = [float("inf"), float("-inf"), float("nan"), 1e9, -1e9, tiny, 1.976, 0.0]
    x = torch.tensor(row * 2, device=device).reshape(1, 1, 16)
    cache = torch.zeros(1, 16, 1, 16, dtype=torch.uint8, device=device)
    slots = torch.tensor([3], device=device)
    reshape_and_cache(x, x, cache, cache.clone(), slots, f"fp8_{fmt}", 1.0, 1.0)
    got = cache[0, 3, 0].view(f.torch_dtype).float()[:8].tolist()
    m = f.max_value
    expected = [
        m,
        -m,
        float("nan"),
        m,
        -m,
        tiny,
        torch.tensor(1.976).to(f.torch_dtype).item(),
        0.0,
    ]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("src_dtype", "cache_dtype", "kv_cache_dtype"),
    [
        (torch.bfloat16, torch.bfloat16, "bf16"),
        (torch.float32, torch.bfloat16, "auto"),
        (torch.float16, torch.float16, "fp16"),
        (torch.float32, torch.float32, "auto"),
    ],
)
def test_unquantized_cache_write(src_dtype, cache_dtype, kv_cache_dtype, device):
    num_tokens, num_kv_heads, head_dim, block_size = 7, 2, 80, 16
    key, value = _inputs(num_tokens, num_kv_heads, head_dim, src_dtype, seed=1, device=device)
    slots = _slots(num_tokens, block_size, seed=2, device=device)
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(4)]
    # Scales are ignored on this path.
    reshape_and_cache(key, value, caches[0], caches[1], slots, kv_cache_dtype, 0.5, 0.5)
    reshape_and_cache_ref(key, value, caches[2], caches[3], slots, kv_cache_dtype)
    for actual, expected in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def test_round_trip_error_is_half_an_ulp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 32, generator=g)
    scale = torch.tensor([0.01, 0.02, 0.005, 0.1])
    for fmt, mantissa_bits, min_normal in (("e4m3", 3, 2.0**-6), ("e5m2", 2, 2.0**-14)):
        back = dequantize_fp8_ref(quantize_fp8_ref(x, scale, fmt), scale, fmt)
        scaled = x.abs() / scale.reshape(-1, 1)
        normal = (scaled >= min_normal) & (scaled <= FP8_FORMATS[fmt].max_value)
        rel = ((back - x).abs() / x.abs())[normal]
        assert rel.max() <= 2.0 ** -(mantissa_bits + 1)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("fp8", "e4m3"),
        ("fp8_e4m3", "e4m3"),
        ("fp8_e5m2", "e5m2"),
        ("auto", None),
        ("bf16", None),
    ],
)
def test_resolve_kv_cache_dtype(name, fmt):
    resolved = resolve_kv_cache_dtype(name)
    assert (resolved.name if resolved else None) == fmt


def test_bad_arguments_raise_clear_errors(device):
    key = torch.zeros(2, 2, 16, device=device)
    cache = torch.zeros(1, 16, 2, 16, dtype=torch.uint8, device=device)
    slots = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="allowed"):
        resolve_kv_cache_dtype("fp4")
    with pytest.raises(ValueError, match="torch.uint8"):
        reshape_and_cache(key, key, cache.bfloat16(), cache.bfloat16(), slots, "fp8")
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        reshape_and_cache(key, key, cache, cache, slots, "fp8", torch.ones(3, device=device))
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache(key, key, cache, cache, slots[:1], "fp8")
    with pytest.raises(ValueError, match="do not match"):
        reshape_and_cache(key[:, :1], key[:, :1], cache, cache, slots, "fp8")

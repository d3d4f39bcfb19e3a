"""The host's paged attention over the block-scaled KV formats (MXFP8, MXFP6, MXFP4, NVFP4): it decodes
only the pages a batch reads, and must give what paged_attention_mx_ref (which decodes the whole
cache) gives, and float64 attention over the spec's decoding, to one bf16 rounding step; and the
ops dispatch sends each format to its own cache write and attention."""

import sys
import types

import pytest
import torch

from maia_serving import ops
from maia_serving.ops import host
from maia_serving.ops.host import decode_mx
from maia_serving.ops.mx import (
    MX_FORMATS,
    dequantize_mx_ref,
    head_bytes,
    paged_attention_mx_ref,
    quantize_mx_ref,
)
from tests.utils.attention_float64 import assert_within_one_bf16_step, bf16_step_violations, paged_attention_float64
from tests.utils.paged_batch import CASES, bundled, host_attention, paged_batch

# NVFP4's per-tensor scales, calibrated as amax / (448 * 6) would be for these K and V: per KV head
# for K, one for V (block scales stay below E4M3's 448).
NVFP4_K_SCALE = torch.tensor([0.006, 0.008, 0.007, 0.009])
NVFP4_V_SCALE = torch.tensor(0.002)


def _scales(fmt: str, num_kv_heads: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (NVFP4_K_SCALE[:num_kv_heads], NVFP4_V_SCALE) if fmt == "nvfp4" else (None, None)


def _batch(pairs, fmt, group, seed, head_dim=80, block_size=16, num_kv_heads=2):
    return paged_batch(pairs, fmt, group, seed, *_scales(fmt, num_kv_heads), block_size, num_kv_heads, head_dim)


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
@pytest.mark.parametrize("head_dim", [40, 80, 128])
def test_page_decoding_is_the_references_bit_for_bit(fmt, head_dim):
    """Every element code and scale byte (NaN scales and MXFP8's NaN code included) in a padded row."""
    gen = torch.Generator().manual_seed(head_dim)
    rows = torch.randint(0, 256, (5, 16, 4, head_bytes(fmt, head_dim)), dtype=torch.uint8, generator=gen)
    scale = NVFP4_K_SCALE if fmt == "nvfp4" else None
    expected = dequantize_mx_ref(rows, fmt, head_dim, scale)
    got = decode_mx(rows, MX_FORMATS[fmt], head_dim, scale)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int32), expected.nan_to_num(0.0).view(torch.int32))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", list(MX_FORMATS))
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [40, 80])
def test_host_is_the_mx_reference_and_float64_attention_rounded_once(case, fmt, group, head_dim, host_kernel):
    """head_dim 40 pads every format's last block, 80 the MX formats' (NVFP4's blocks of 16 fit)."""
    args = _batch(CASES[case], fmt, group, seed=len(case) * group + head_dim, head_dim=head_dim)
    got = host_attention(*args)
    assert_within_one_bf16_step(got, *paged_attention_float64(*args))
    torch.testing.assert_close(got, paged_attention_mx_ref(*args), atol=0, rtol=2**-7)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_is_float64_windowed_attention_rounded_once(fmt, window, host_kernel):
    args = _batch(CASES["chunked_and_prefix_hit"], fmt, 2, seed=window)
    assert_within_one_bf16_step(
        host_attention(*args, sliding_window=window), *paged_attention_float64(*args, sliding_window=window)
    )


@pytest.mark.parametrize("fmt", ["mxfp6", "nvfp4"])
@pytest.mark.parametrize("window", [None, 6])
def test_the_fallback_decodes_the_pages_too(monkeypatch, fmt, window, torch_host_path):
    """Past the score limit the per-sequence loop runs over the batch's pages, decoded alike."""
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 0)
    args = _batch(CASES["chunked_and_prefix_hit"], fmt, 2, seed=16)
    assert_within_one_bf16_step(
        host_attention(*args, sliding_window=window), *paged_attention_float64(*args, sliding_window=window)
    )


def _bump_scale_bytes(cache: torch.Tensor, fmt: str, block: int | None = None) -> torch.Tensor:
    """A copy of ``cache`` with the scale byte of every (or one) block of every row one code higher:
    x2 for E8M0, the next E4M3 value (at most x1.125) for NVFP4."""
    wrong = cache.clone()
    block_bytes = MX_FORMATS[fmt].block_bytes
    positions = range(block_bytes - 1, cache.shape[-1], block_bytes)
    for b, at in enumerate(positions):
        if block is None or b == block:
            wrong[..., at] += 1
    return wrong


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_a_wrong_block_scale_exceeds_the_tolerance(fmt):
    """A decoder that reads a block's scale one code off (or another block's scale) fails: bumping
    every V block scale moves most outputs, one block's scale the outputs in its 16 or 32 dims."""
    args = _batch(CASES["decode"], fmt, 2, seed=17)
    ref, err = paged_attention_float64(*args)
    value_cache = args[2]
    every = host_attention(*args[:2], _bump_scale_bytes(value_cache, fmt), *args[3:])
    assert bf16_step_violations(every, ref, err).double().mean() > 0.5
    one = host_attention(*args[:2], _bump_scale_bytes(value_cache, fmt, block=1), *args[3:])
    size = MX_FORMATS[fmt].block_size
    violations = bf16_step_violations(one, ref, err)
    assert violations[..., size : 2 * size].double().mean() > 0.5
    assert not violations[..., :size].any() and not violations[..., 2 * size :].any()


def test_a_one_percent_nvfp4_tensor_scale_error_exceeds_the_tolerance():
    args = _batch(CASES["chunked_and_prefix_hit"], "nvfp4", 2, seed=18)
    ref, err = paged_attention_float64(*args)
    out = host_attention(*args[:-1], args[-1] * 1.01)
    assert bf16_step_violations(out, ref, err).double().mean() > 0.5


def test_mx_formats_refuse_a_tensor_scale():
    args = _batch(CASES["decode"], "mxfp4", 1, seed=19)
    with pytest.raises(ValueError, match="E8M0 block scales; pass k_scale=v_scale=None"):
        host_attention(*args[:-2], 1.0, None)


def test_a_cache_of_another_format_is_refused():
    args = list(_batch(CASES["decode"], "mxfp4", 1, seed=20, head_dim=128))
    args[7] = "mxfp8"
    with pytest.raises(ValueError, match=r"must be uint8 \[num_blocks, block_size, num_kv_heads, 132\]"):
        host_attention(*args)


def _fake_kernels(monkeypatch) -> list[str]:
    """Stand-ins for maia_serving.ops.triton (importing the real ones here would decorate them outside
    the interpreter the kernel tests set up) that record which one each call reached."""
    calls: list[str] = []
    fake = types.ModuleType("maia_serving.ops.triton")
    for name in ("reshape_and_cache", "reshape_and_cache_mx", "paged_attention"):
        setattr(fake, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    monkeypatch.setitem(sys.modules, "maia_serving.ops.triton", fake)
    monkeypatch.setattr(ops, "triton", fake, raising=False)
    monkeypatch.setattr(ops, "kernel_backend", lambda device: "triton")
    return calls


def _write_args(fmt: str, cache_dtype: torch.dtype = torch.uint8, head_dim: int = 64):
    k = torch.randn(3, 2, head_dim, generator=torch.Generator().manual_seed(21))
    width = head_bytes(fmt, head_dim) if fmt in MX_FORMATS else head_dim
    key_cache = torch.zeros(4, 16, 2, width, dtype=cache_dtype)
    return k, k.clone(), key_cache, torch.zeros_like(key_cache), torch.tensor([5, 17, 40])


@pytest.mark.parametrize("fmt", [*MX_FORMATS, "fp8_e4m3", "auto"])
def test_with_triton_each_format_reaches_its_kernels(monkeypatch, fmt):
    calls = _fake_kernels(monkeypatch)
    args = _batch(CASES["decode"], fmt, 1, seed=22) if fmt in MX_FORMATS else None
    write = "reshape_and_cache_mx" if fmt in MX_FORMATS else "reshape_and_cache"
    cache_dtype = torch.bfloat16 if fmt == "auto" else torch.uint8
    ops.reshape_and_cache(*_write_args(fmt, cache_dtype), ops.KvQuant(fmt))
    if args is not None:
        ops.paged_attention(*bundled(*args))
    assert calls == [write] + (["paged_attention"] if args is not None else [])


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_on_a_host_the_write_is_the_reference_and_attention_the_host_path(fmt, host_kernel):
    """Both host paths (the C++ write and the reference's torch ops) write the reference's bytes, keys and
    values each with their own scale."""
    k, _, key_cache, value_cache, slots = _write_args(fmt)
    v = (k * -0.75).roll(1, -1)  # values unlike the keys: a write that swaps them is seen
    k_scale, v_scale = _scales(fmt, 2)
    ops.reshape_and_cache(k, v, key_cache, value_cache, slots, ops.KvQuant(fmt, k_scale, v_scale))
    for cache, values, scale in ((key_cache, k, k_scale), (value_cache, v, v_scale)):
        expected = torch.zeros_like(cache)
        expected.view(-1, *cache.shape[2:])[slots] = quantize_mx_ref(values, fmt, scale)
        assert torch.equal(cache, expected)
    args = _batch(CASES["chunked_and_prefix_hit"], fmt, 2, seed=23)
    torch.testing.assert_close(ops.paged_attention(*bundled(*args)), host_attention(*args), atol=0, rtol=0)


def test_unknown_formats_keep_their_error():
    """A name no format has still meets the FP8 path's check, on the write and on attention."""
    message = "unknown kv cache dtype 'mxfp5'"
    with pytest.raises(ValueError, match=message):
        ops.reshape_and_cache(*_write_args("mxfp5"), ops.KvQuant("mxfp5"))
    args = list(_batch(CASES["decode"], "mxfp4", 1, seed=24))
    args[7] = "mxfp5"
    with pytest.raises(ValueError, match=message):
        ops.paged_attention(*bundled(*args))

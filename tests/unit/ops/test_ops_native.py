"""The native host attention (maia_serving.ops.native): chosen by MAIA_SERVING_HOST_KERNEL, served
where built, and a build that fails is either refused by name (native) or replaced by the torch path
with a warning (auto). Its numerics against float64 attention: test_ops_host.py, test_ops_host_mx.py."""

import logging

import pytest
import torch

from maia_serving.ops import host, native
from tests.utils.attention_float64 import assert_within_one_bf16_step, paged_attention_float64
from tests.utils.paged_batch import CASES, host_attention, paged_batch


@pytest.fixture
def fresh(monkeypatch):
    """module() decides once per process; each test decides afresh."""
    native.module.cache_clear()
    yield
    native.module.cache_clear()


def _broken_build():
    raise RuntimeError("building host_attention.cpp into /x failed: g++ not found")


def test_torch_is_the_torch_path(fresh, monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_HOST_KERNEL", "torch")
    monkeypatch.setattr(native, "load", _broken_build)
    assert native.module() is None


def test_native_that_cannot_build_is_refused_with_what_to_do(fresh, monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_HOST_KERNEL", "native")
    monkeypatch.setattr(native, "load", _broken_build)
    with pytest.raises(
        RuntimeError, match="MAIA_SERVING_HOST_KERNEL=native: building .* g\\+\\+ not found.*`make setup`"
    ):
        native.module()


def test_auto_serves_with_the_torch_path_when_the_build_fails_and_says_so(fresh, monkeypatch, caplog):
    monkeypatch.delenv("MAIA_SERVING_HOST_KERNEL", raising=False)
    monkeypatch.setattr(native, "load", _broken_build)
    with caplog.at_level(logging.WARNING):
        assert native.module() is None
    assert "g++ not found" in caplog.text and "torch path" in caplog.text


def test_auto_serves_with_the_native_kernel_where_it_builds(fresh, monkeypatch):
    monkeypatch.delenv("MAIA_SERVING_HOST_KERNEL", raising=False)
    assert native.module() is native.load()


@pytest.mark.parametrize("fmt", ["auto", "fp8_e4m3", "mxfp4", "nvfp4"])
def test_where_built_the_kernel_serves_alone(native_host_path, monkeypatch, fmt):
    """No torch-path step runs: the pages are never gathered, the references never called (a strided
    cache view included: an engine's KV cache may be one)."""
    for name in ("_pages", "paged_attention_ref", "_mx_fallback", "reshape_and_cache_ref", "reshape_and_cache_mx_ref"):
        monkeypatch.setattr(host, name, _refuse)
    from maia_serving.ops.mx import MX_FORMATS, head_bytes

    width = head_bytes(fmt, 64) if fmt in MX_FORMATS else 64
    cache = torch.zeros(4, 2, 16, 2, width, dtype=torch.bfloat16 if fmt == "auto" else torch.uint8)
    key = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    scale = None if fmt == "mxfp4" else 0.5
    write = host.reshape_and_cache_mx_host if fmt in MX_FORMATS else host.reshape_and_cache_host
    write(key, key, cache[:, 0], cache[:, 1], torch.tensor([1, 20, 33]), fmt, scale, scale)
    assert cache.any()
    scales = (
        (torch.tensor([0.02, 0.05]), torch.tensor(0.03))
        if fmt.startswith("fp8")
        else ((torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.04])) if fmt == "nvfp4" else (None, None))
    )
    args = paged_batch(CASES["chunked_and_prefix_hit"], fmt, 2, 3, *scales, 16, 2, 64)
    assert_within_one_bf16_step(host_attention(*args), *paged_attention_float64(*args))


def _refuse(*args, **kwargs):
    raise AssertionError("the native kernel must serve this call alone")


def test_a_cache_in_another_dtype_than_the_query_takes_the_torch_path(native_host_path):
    """The kernel reads a plain cache in the query's dtype; a float32 cache under bf16 queries does not
    fit it, and the torch path serves it."""
    args = list(paged_batch(CASES["decode"], "auto", 2, 4, None, None, 16, 2, 32))
    args[1], args[2] = args[1].float(), args[2].float()
    assert_within_one_bf16_step(host_attention(*args), *paged_attention_float64(*args))


def _hostile_rows(head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[tokens, 2 KV heads, head_dim] rows that meet every branch of the encoding: normal data at
    several magnitudes, zeros and negative zeros, subnormals, values at and past each format's largest,
    blocks whose largest element is a power of two, and NaN / infinity in some blocks."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(2, head_dim, generator=gen) * m for m in (1e-3, 1.0, 30.0, 1e4)]
    rows.append(torch.zeros(2, head_dim))
    rows.append(-torch.zeros(2, head_dim))
    rows.append(torch.full((2, head_dim), 1e-40))  # float32 subnormals (bf16 keeps some)
    rows.append(torch.linspace(-600.0, 600.0, 2 * head_dim).view(2, head_dim))
    pow2 = torch.randn(2, head_dim, generator=gen)
    pow2[:, ::16] = 4.0
    rows.append(pow2)
    special = torch.randn(2, head_dim, generator=gen)
    special[0, 3], special[1, 40 % head_dim] = float("nan"), float("inf")
    special[1, 0] = float("-inf")
    rows.append(special)
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp6", "mxfp6_e2m3", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_the_native_write_is_the_references_bytes(native_host_path, fmt, head_dim, dtype):
    """Every element code and scale byte, padding slots skipped, NVFP4 with a tensor scale per KV head."""
    from maia_serving.ops.mx import head_bytes, reshape_and_cache_mx_ref

    key = _hostile_rows(head_dim, dtype, seed=head_dim)
    value = _hostile_rows(head_dim, dtype, seed=head_dim + 1).flip(0)
    tokens = key.shape[0]
    slots = torch.randperm(4 * 16, generator=torch.Generator().manual_seed(7))[:tokens]
    slots[2] = -1  # a padding token
    scales = (torch.tensor([0.02, 0.5]), torch.tensor(0.03)) if fmt == "nvfp4" else (None, None)
    # K and V pages interleaved in one buffer, as an engine may lay them out: strided views, written in place.
    caches = [torch.full((4, 2, 16, 2, head_bytes(fmt, head_dim)), 0xA5, dtype=torch.uint8)[:, 0] for _ in range(4)]
    host.reshape_and_cache_mx_host(key, value, caches[0], caches[1], slots, fmt, *scales)
    reshape_and_cache_mx_ref(key, value, caches[2], caches[3], slots, fmt, *scales)
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])


def test_the_native_write_keeps_the_references_checks(native_host_path):
    from maia_serving.ops.mx import head_bytes

    key = torch.randn(2, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, head_bytes("mxfp4", 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="MXFP4 keeps all its scale in the E8M0 block scales|E8M0"):
        host.reshape_and_cache_mx_host(key, key, cache, cache.clone(), torch.tensor([0, 1]), "mxfp4", 0.5, None)
    with pytest.raises(ValueError, match="uint8"):
        host.reshape_and_cache_mx_host(key, key, cache.float(), cache.float(), torch.tensor([0, 1]), "mxfp4")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
def test_the_native_fp8_write_is_the_references_bytes(native_host_path, fmt, dtype, per_head):
    """Saturation, NaN, infinity, negative zero and subnormal results included."""
    from maia_serving.ops.fp8 import reshape_and_cache_ref

    key, value = _hostile_rows(64, dtype, seed=1), _hostile_rows(64, dtype, seed=2).flip(0)
    slots = torch.randperm(4 * 16, generator=torch.Generator().manual_seed(9))[: key.shape[0]]
    slots[0] = -1
    k_scale = torch.tensor([0.02, 0.7]) if per_head else torch.tensor(0.05)
    v_scale = torch.tensor([3.0, 1e-3]) if per_head else 0.25
    caches = [torch.full((4, 2, 16, 2, 64), 0x5A, dtype=torch.uint8)[:, 1] for _ in range(4)]
    host.reshape_and_cache_host(key, value, caches[0], caches[1], slots, fmt, k_scale, v_scale)
    reshape_and_cache_ref(key, value, caches[2], caches[3], slots, fmt, k_scale, v_scale)
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_the_native_unquantized_write_is_the_references(native_host_path, dtype):
    """A copy into a strided cache view (an engine's K half of its pages), padding slots skipped, NaN and
    infinity carried; every other byte of the cache untouched."""
    from maia_serving.ops.fp8 import reshape_and_cache_ref

    key, value = _hostile_rows(64, dtype, seed=3), _hostile_rows(64, dtype, seed=4).flip(0)
    slots = torch.randperm(4 * 16, generator=torch.Generator().manual_seed(5))[: key.shape[0]]
    slots[1] = -1
    pages = [torch.full((4, 2, 16, 2, 64), 7.0, dtype=dtype) for _ in range(2)]
    host.reshape_and_cache_host(key, value, pages[0][:, 0], pages[0][:, 1], slots, "auto")
    reshape_and_cache_ref(key, value, pages[1][:, 0], pages[1][:, 1], slots, "auto")
    assert torch.equal(pages[0].view(torch.uint8), pages[1].view(torch.uint8))  # bit for bit, NaN included


def test_a_write_that_casts_takes_the_reference(native_host_path, monkeypatch):
    """float32 rows into a bf16 cache: a cast, which the kernel's copy does not do."""
    called = []
    monkeypatch.setattr(host, "reshape_and_cache_ref", lambda *args: called.append(args))
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    key = torch.randn(3, 2, 64)
    host.reshape_and_cache_host(key, key, cache, cache.clone(), torch.tensor([1, 2, 3]), "auto")
    assert called and not cache.any()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_the_kernel_decodes_every_fp8_code_as_torch_does(native_host_path, fmt):
    """One key whose value row holds all 256 codes: the output is each code's value, as torch converts
    it (subnormals, NaN and E5M2's infinities included; a negative zero comes out as the sum 0 + -0)."""
    from maia_serving.ops.fp8 import resolve_kv_cache_dtype

    codes = torch.arange(256, dtype=torch.uint8)
    got = _attended_value_row(codes, 256, fmt, 1.0)
    _assert_same_values(got, codes.view(resolve_kv_cache_dtype(fmt).torch_dtype).float())


def _attended_value_row(row: torch.Tensor, head_dim: int, fmt: str, scale: float | None) -> torch.Tensor:
    """What one query of ones reads from a cache whose only key's value row holds ``row``'s bytes: that row,
    as the kernel decodes it (one key: softmax weight 1)."""
    key_cache = torch.zeros(1, 16, 1, row.numel(), dtype=torch.uint8)
    value_cache = key_cache.clone()
    value_cache[0, 0, 0] = row
    query = torch.ones(1, 1, head_dim)
    tables, lens, starts = torch.tensor([[0]]), torch.tensor([1]), torch.tensor([0, 1])
    return host_attention(query, key_cache, value_cache, tables, lens, starts, 1.0, fmt, scale, scale).view(-1)


def _assert_same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN where expected has NaN."""
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], expected[~nan])


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("block_scale", ["one", "small", "large"])
def test_the_kernel_decodes_every_block_scaled_code_as_the_reference(native_host_path, fmt, block_scale):
    """One key whose value row holds every element byte (MXFP8: all 256 E4M3 codes, NaN included; FP4:
    all 256 pairs of codes) under one block scale: the output is the reference's dequantized row. The
    kernel decodes these 16 at a time where the CPU converts FP16, one by one elsewhere."""
    from maia_serving.ops.mx import MX_FORMATS, dequantize_mx_ref, head_bytes

    spec = MX_FORMATS[fmt]
    elements = torch.arange(256, dtype=torch.uint8)
    per_block = spec.block_bytes - 1
    scale_byte = (
        {"one": 127, "small": 3, "large": 250}[block_scale]
        if spec.scale == "e8m0"
        else ({"one": 0x38, "small": 0x01, "large": 0x7E}[block_scale])
    )  # E4M3 1.0, its least subnormal, its 448
    scale_bytes = torch.full((256 // per_block, 1), scale_byte, dtype=torch.uint8)
    blocks = torch.cat([elements.view(-1, per_block), scale_bytes], 1)
    head_dim = 256 * 8 // spec.element.bits
    assert blocks.numel() == head_bytes(fmt, head_dim)
    tensor_scale = 1.0 if spec.scale == "e4m3" else None
    got = _attended_value_row(blocks.flatten(), head_dim, fmt, tensor_scale)
    _assert_same_values(got, dequantize_mx_ref(blocks.flatten()[None], fmt, head_dim, tensor_scale).view(-1))

"""SGLang's --kv-cache-dtype goes through the emulator's dtype vocabulary: what it prices passes, the rest is named."""

from types import SimpleNamespace

import pytest

from maia_serving.sglang.device import kv_cache_dtype


@pytest.mark.parametrize("value", ["auto", "bf16", "bfloat16", "fp8_e4m3", "fp8_e5m2"])
def test_the_kv_formats_the_emulator_prices_pass_in_sglangs_spelling(value):
    assert kv_cache_dtype(SimpleNamespace(kv_cache_dtype=value)) == value


def test_no_setting_is_the_models_dtype():
    assert kv_cache_dtype(SimpleNamespace(kv_cache_dtype=None)) == "auto"


@pytest.mark.parametrize("value", ["mxfp8", "nvfp4", "fp4_mx_block16"])
def test_sglangs_other_kv_formats_are_refused_by_name(value):
    with pytest.raises(ValueError, match=f"unknown kv cache dtype '{value}'; allowed: auto, "):
        kv_cache_dtype(SimpleNamespace(kv_cache_dtype=value))


# --- block-scaled formats: SGLang's --kv-cache-dtype mxfp8/nvfp4, or MAIA_SERVING_KV_CACHE_DTYPE ------------


@pytest.fixture(autouse=True)
def _no_block_scaled_format(monkeypatch):
    """Unset, and removed again after the test: the platform writes os.environ itself."""
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "")
    monkeypatch.delenv("MAIA_SERVING_KV_CACHE_DTYPE")


def _args(kv_cache_dtype="auto", attention_backend="maia") -> SimpleNamespace:
    return SimpleNamespace(kv_cache_dtype=kv_cache_dtype, attention_backend=attention_backend)


def test_the_device_prices_the_block_scaled_format(monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp4")
    assert kv_cache_dtype(SimpleNamespace(kv_cache_dtype="auto")) == "mxfp4"


@pytest.mark.parametrize("value", ["mxfp8", "nvfp4"])
def test_sglangs_own_block_scaled_names_move_to_the_variable(value):
    import os

    from maia_serving.sglang.platform import MaiaSRTPlatform, _apply_block_scaled_kv

    args = _args(value)
    _apply_block_scaled_kv(args)
    assert args.kv_cache_dtype == "auto"  # SGLang's pools and backends see an unquantized dtype
    assert os.environ["MAIA_SERVING_KV_CACHE_DTYPE"] == value
    assert MaiaSRTPlatform().get_kv_pool_cls(kind="mha").__name__ == "BlockScaledKVPool"
    assert MaiaSRTPlatform().get_kv_pool_cls(kind="mla") is None


def test_without_a_block_scaled_format_sglang_keeps_its_pools():
    from maia_serving.sglang.platform import MaiaSRTPlatform, _apply_block_scaled_kv

    args = _args("fp8_e4m3")
    _apply_block_scaled_kv(args)
    assert args.kv_cache_dtype == "fp8_e4m3"
    assert MaiaSRTPlatform().get_kv_pool_cls(kind="mha") is None


def test_two_formats_or_another_backend_are_refused(monkeypatch):
    from maia_serving.sglang.platform import _apply_block_scaled_kv

    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp4")
    with pytest.raises(ValueError, match="--kv-cache-dtype mxfp8 but MAIA_SERVING_KV_CACHE_DTYPE=mxfp4: give one"):
        _apply_block_scaled_kv(_args("mxfp8"))
    with pytest.raises(ValueError, match="MAIA_SERVING_KV_CACHE_DTYPE=mxfp4 and --kv-cache-dtype fp8_e4m3 both"):
        _apply_block_scaled_kv(_args("fp8_e4m3"))
    with pytest.raises(ValueError, match="a mxfp4 KV cache needs the maia attention backend, not --attention-backend"):
        _apply_block_scaled_kv(_args(attention_backend="torch_native"))


def test_the_pool_stores_packed_rows(monkeypatch):
    """The block-scaled pool: uint8 rows of head_bytes per head (MXFP4 at head_dim 64: 2 x 17 bytes)."""
    import torch

    from maia_serving.sglang.kv_pool import BlockScaledKVPool

    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp4")
    pool = BlockScaledKVPool(
        32,
        page_size=16,
        dtype=torch.bfloat16,
        head_num=2,
        head_dim=64,
        v_head_dim=64,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
        enable_alt_stream=False,
    )
    key = pool.get_key_buffer(0)
    assert key.dtype == torch.uint8 and key.shape[1:] == (2, 34)
    assert pool.get_value_buffer(1).shape[1:] == (2, 34)

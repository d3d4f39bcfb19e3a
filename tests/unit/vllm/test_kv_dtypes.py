"""vLLM's --kv-cache-dtype spellings, read through the emulator's dtype vocabulary."""

from types import SimpleNamespace
from typing import get_args

import pytest
from vllm.config.cache import CacheDType

from maia_serving.vllm.attention import MaiaAttentionBackend
from maia_serving.vllm.device import kv_cache_dtype


def test_the_backend_serves_vllms_bf16_and_fp8_spellings():
    assert set(get_args(CacheDType)) & set(MaiaAttentionBackend.supported_kv_cache_dtypes) == {
        "auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"}


def _config(cache_dtype: str) -> SimpleNamespace:
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype))


def test_the_device_keeps_vllms_spelling():
    assert [kv_cache_dtype(_config(v)) for v in ("auto", "fp8", "bfloat16")] == ["auto", "fp8", "bfloat16"]


def test_a_cache_dtype_the_emulator_cannot_price_is_named():
    with pytest.raises(ValueError, match="unknown kv cache dtype 'fp8_ds_mla'; allowed: auto, "):
        kv_cache_dtype(_config("fp8_ds_mla"))

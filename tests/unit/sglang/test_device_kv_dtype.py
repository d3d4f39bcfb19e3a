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

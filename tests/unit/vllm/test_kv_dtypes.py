"""vLLM's --kv-cache-dtype spellings, read through the emulator's dtype vocabulary, and the
block-scaled formats the maia platform adds to the flag."""

from types import SimpleNamespace
from typing import get_args

import pytest
from vllm.config.cache import CacheDType

from maia_serving.vllm.attention import MaiaAttentionBackend
from maia_serving.vllm.device import kv_cache_dtype


def test_the_backend_serves_vllms_bf16_and_fp8_spellings():
    assert set(get_args(CacheDType)) & set(MaiaAttentionBackend.supported_kv_cache_dtypes) == {
        "auto",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
    }


def _config(cache_dtype: str, **additional) -> SimpleNamespace:
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype), additional_config=additional)


def test_the_device_keeps_vllms_spelling():
    assert [kv_cache_dtype(_config(v)) for v in ("auto", "fp8", "bfloat16")] == ["auto", "fp8", "bfloat16"]


def test_a_cache_dtype_the_emulator_cannot_price_is_named():
    with pytest.raises(ValueError, match="unknown kv cache dtype 'fp8_ds_mla'; allowed: auto, "):
        kv_cache_dtype(_config("fp8_ds_mla"))


def test_the_device_prices_the_block_scaled_format_the_platform_recorded():
    assert kv_cache_dtype(_config("auto", maia_kv_cache_dtype="mxfp4")) == "mxfp4"
    with pytest.raises(ValueError, match="unknown kv cache dtype 'mxfp5'"):
        kv_cache_dtype(_config("auto", maia_kv_cache_dtype="mxfp5"))


# --- `vllm serve --device maia --kv-cache-dtype mxfp4` ----------------------------------------


@pytest.fixture(autouse=True)
def _no_block_scaled_format(monkeypatch):
    """Unset, and removed again after the test: the flag writes os.environ itself."""
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "")
    monkeypatch.delenv("MAIA_SERVING_KV_CACHE_DTYPE")


@pytest.fixture
def parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from maia_serving.vllm.platform import MaiaPlatform

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    MaiaPlatform.pre_register_and_update(parser)
    MaiaPlatform.pre_register_and_update(parser)  # idempotent
    return parser


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp6", "mxfp6_e2m3", "mxfp4", "nvfp4"])
def test_the_flag_takes_a_block_scaled_format_and_tells_the_engine_processes(parser, fmt):
    import os

    args = parser.parse_args(["--kv-cache-dtype", fmt])
    assert args.kv_cache_dtype == "auto"  # what vLLM's CacheConfig can hold
    assert os.environ["MAIA_SERVING_KV_CACHE_DTYPE"] == fmt


def test_vllms_own_formats_pass_through_the_flag_untouched(parser):
    import os

    assert parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"]).kv_cache_dtype == "fp8_e5m2"
    assert parser.parse_args([]).kv_cache_dtype == "auto"
    assert "MAIA_SERVING_KV_CACHE_DTYPE" not in os.environ


def test_the_flag_refuses_an_unknown_format_and_a_clash_with_the_variable(parser, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "mxfp5"])
    assert "invalid choice: 'mxfp5'" in capsys.readouterr().err
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp8")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "mxfp4"])
    assert "--kv-cache-dtype mxfp4 but MAIA_SERVING_KV_CACHE_DTYPE=mxfp8: give one" in capsys.readouterr().err


def _vllm_config(cache_dtype: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype), additional_config={})


def test_the_platform_records_the_format_for_every_engine_process(monkeypatch):
    from maia_serving.vllm.platform import _apply_block_scaled_kv

    config = _vllm_config()
    _apply_block_scaled_kv(config)
    assert config.additional_config == {}
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp6")
    _apply_block_scaled_kv(config)
    assert config.additional_config == {"maia_kv_cache_dtype": "mxfp6"}


def test_the_platform_refuses_two_formats_and_vllms_cpu_attention(monkeypatch):
    from maia_serving.vllm.platform import _apply_block_scaled_kv

    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", "mxfp4")
    with pytest.raises(ValueError, match="MAIA_SERVING_KV_CACHE_DTYPE=mxfp4 and --kv-cache-dtype fp8 both name"):
        _apply_block_scaled_kv(_vllm_config("fp8"))
    monkeypatch.setenv("MAIA_SERVING_ATTENTION", "vllm-cpu")
    with pytest.raises(ValueError, match="a mxfp4 KV cache needs the maia attention backend"):
        _apply_block_scaled_kv(_vllm_config())


@pytest.mark.parametrize("fmt,row", [("mxfp4", 68), ("mxfp6", 100), ("mxfp8", 132), ("nvfp4", 72)])
def test_the_backend_sizes_vllms_page_at_the_formats_bytes(monkeypatch, fmt, row):
    """head_dim 128: MXFP4 is 4 blocks of 16 + 1 bytes; the page holds K and V of every head and token."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    assert MaiaAttentionBackend.customize_spec(spec) is spec  # no block-scaled format: vLLM's page
    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", fmt)
    packed = MaiaAttentionBackend.customize_spec(spec)
    assert packed.dtype == torch.uint8
    assert packed.page_size_bytes == 16 * 8 * 2 * row
    window = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, sliding_window=64)
    assert MaiaAttentionBackend.customize_spec(window).page_size_bytes == 16 * 8 * 2 * row

"""FP8 without calibrated scales: a loud warning, never a quiet 1.0; per-head needs the sidecar."""

import json
import logging
from types import SimpleNamespace

import pytest

from maia_serving import kv_scales as scales
from maia_serving.vllm.platform import _validate_kv_scales


def _config(model_dir, cache_dtype="fp8", quantization_config=None):
    hf = SimpleNamespace(quantization_config=quantization_config)
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                           model_config=SimpleNamespace(model=str(model_dir), hf_config=hf))


@pytest.fixture
def captured(caplog):
    logging.getLogger("vllm.maia_serving").propagate = True
    caplog.set_level(logging.WARNING, logger="vllm.maia_serving")
    return caplog


def test_fp8_without_scales_warns_with_the_calibrate_command(tmp_path, captured, monkeypatch):
    monkeypatch.delenv(scales.SCALES_ENV, raising=False)
    _validate_kv_scales(_config(tmp_path))
    assert "no calibrated KV-cache scales" in captured.text
    assert f"maia-serving calibrate-kv --model {tmp_path}" in captured.text


def test_checkpoint_scales_or_bf16_are_quiet(tmp_path, captured, monkeypatch):
    monkeypatch.delenv(scales.SCALES_ENV, raising=False)
    _validate_kv_scales(_config(tmp_path, quantization_config={"kv_cache_scheme": {"num_bits": 8}}))
    _validate_kv_scales(_config(tmp_path, cache_dtype="auto"))
    assert captured.text == ""


def test_per_head_without_sidecar_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(scales.SCALES_ENV, "per_head")
    with pytest.raises(ValueError, match="maia_kv_scales.json"):
        _validate_kv_scales(_config(tmp_path))


def test_unknown_scale_mode_is_refused(monkeypatch):
    monkeypatch.setenv(scales.SCALES_ENV, "per_channel")
    with pytest.raises(ValueError, match="per_tensor, per_head"):
        scales.scale_mode()


def test_per_head_scales_are_sliced_per_rank(tmp_path):
    (tmp_path / scales.SIDECAR).write_text(json.dumps(
        {"layers": {"3": {"k": [1.0, 2.0, 3.0, 4.0], "v": [5.0, 6.0, 7.0, 8.0]}}}))
    scales.load_sidecar.cache_clear()
    k, v = scales.per_head_scales(str(tmp_path), 3, 2, tp_rank=1, tp_size=2)
    assert k.tolist() == [3.0, 4.0] and v.tolist() == [7.0, 8.0]
    k, _ = scales.per_head_scales(str(tmp_path), 3, 4, tp_rank=0, tp_size=1)
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0]

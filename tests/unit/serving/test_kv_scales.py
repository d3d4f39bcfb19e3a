"""KV scales: a loud warning without them, never a quiet 1.0; every scales file checked
before the engine loads anything, with the file named in the error."""

import json
import logging
from types import SimpleNamespace

import pytest

from maia_serving.envs import MAIA_SERVING_KV_SCALES, SettingError
from maia_serving.serving import kv_scales as scales

CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(MAIA_SERVING_KV_SCALES, raising=False)
    scales.load_sidecar.cache_clear()


def _sidecar(tmp_path, layers):
    (tmp_path / scales.SIDECAR).write_text(json.dumps({"layers": layers}))


GOOD_SIDECAR = {str(i): {"k": [0.1, 0.2, 0.3, 0.4], "v": [1.0, 2.0, 3.0, 4.0]} for i in range(2)}


def test_fp8_without_scales_warns_with_the_calibrate_command(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=scales.logger.name)
    assert scales.check_fp8_scales("fp8", str(tmp_path), CONFIG) == "none"
    assert "no calibrated KV-cache scales" in caplog.text
    assert f"maia-serving calibrate-kv --model {tmp_path}" in caplog.text


def test_checkpoint_scales_are_used_quietly(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=scales.logger.name)
    config = {**CONFIG, "quantization_config": {"kv_cache_scheme": {"num_bits": 8}}}
    assert scales.check_fp8_scales("fp8", str(tmp_path), config) == "checkpoint"
    assert caplog.text == ""


def test_per_head_without_sidecar_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(MAIA_SERVING_KV_SCALES, "per_head")
    with pytest.raises(ValueError, match="maia_kv_scales.json") as err:
        scales.check_fp8_scales("fp8", str(tmp_path), CONFIG)
    assert "maia-serving calibrate-kv" in str(err.value)


def test_unknown_scale_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(MAIA_SERVING_KV_SCALES, "per_channel")
    with pytest.raises(SettingError, match="MAIA_SERVING_KV_SCALES='per_channel'.*per_tensor or per_head"):
        scales.scale_mode()


def test_good_sidecar_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv(MAIA_SERVING_KV_SCALES, "per_head")
    _sidecar(tmp_path, GOOD_SIDECAR)
    assert scales.check_fp8_scales("fp8", str(tmp_path), CONFIG) == "per_head"
    assert scales.load_sidecar(str(tmp_path), 2, 4)[1] == ([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(
    "layers,match",
    [
        ({"0": GOOD_SIDECAR["0"]}, r"lacks scales for layer\(s\) \[1\]"),
        ({**GOOD_SIDECAR, "1": {"k": [0.1, 0.2], "v": [1.0, 2.0, 3.0, 4.0]}}, "layer 1 needs 4 K scales"),
        ({**GOOD_SIDECAR, "1": {"k": [0.1, 0.2, 0.0, 0.4], "v": [1.0, 2.0, 3.0, 4.0]}}, r"layer 1 k\[2\] is 0.0"),
        ({**GOOD_SIDECAR, "0": {"k": [0.1, 0.2, 0.3, "x"], "v": [1.0, 2.0, 3.0, 4.0]}}, r"layer 0 k\[3\] is 'x'"),
        ({**GOOD_SIDECAR, "0": {"k": [0.1, 0.2, 0.3, 0.4]}}, "layer 0 needs 4 V scales"),
        ([1, 2], "must map layer numbers"),
    ],
)
def test_bad_sidecar_is_refused_naming_the_file(tmp_path, monkeypatch, layers, match):
    monkeypatch.setenv(MAIA_SERVING_KV_SCALES, "per_head")
    _sidecar(tmp_path, layers)
    with pytest.raises(scales.ScalesFileError, match=match) as err:
        scales.check_fp8_scales("fp8", str(tmp_path), CONFIG)
    assert str(tmp_path / scales.SIDECAR) in str(err.value)


def test_sidecar_that_is_not_json_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(MAIA_SERVING_KV_SCALES, "per_head")
    (tmp_path / scales.SIDECAR).write_text('{"layers": {"0": ')
    with pytest.raises(scales.ScalesFileError, match="cannot be read as JSON"):
        scales.check_fp8_scales("fp8", str(tmp_path), CONFIG)


def _sglang_file(tmp_path, document) -> str:
    path = tmp_path / "kv_cache_scales.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_sglang_scales_file_is_read(tmp_path):
    path = _sglang_file(tmp_path, {"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": 0.25}}}})
    assert scales.check_fp8_scales("fp8_e4m3", str(tmp_path), CONFIG, path) == "file"
    assert scales.load_sglang_scales_file(path, 2) == {0: 0.5, 1: 0.25}


@pytest.mark.parametrize(
    "document,match",
    [
        ("{not json", "cannot be read as JSON"),
        ("", "cannot be read as JSON"),
        ({"kv_cache": {"scaling_factor": {"0": {"0": 0.5}}}}, r"lacks scales for layer\(s\) \[1\]"),
        ({"kv_cache": {"scaling_factor": {"1": {"0": 0.5, "1": 0.5}}}}, "has no kv_cache.scaling_factor.0"),
        ({"kv_cache": {}}, "has no kv_cache.scaling_factor"),
        ({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": -1}}}}, "layer 1 is -1"),
        ({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": True}}}}, "layer 1 is True"),
    ],
)
def test_bad_sglang_scales_file_is_refused_naming_it(tmp_path, document, match):
    path = _sglang_file(tmp_path, document)
    with pytest.raises(scales.ScalesFileError, match=match) as err:
        scales.check_fp8_scales("fp8_e4m3", str(tmp_path), CONFIG, path)
    assert path in str(err.value)


def test_missing_sglang_scales_file_says_how_to_make_one(tmp_path):
    with pytest.raises(scales.ScalesFileError, match="does not exist.*maia-serving calibrate-kv"):
        scales.check_fp8_scales("fp8_e4m3", str(tmp_path), CONFIG, str(tmp_path / "nope.json"))


def test_per_head_scales_are_sliced_per_rank(tmp_path):
    _sidecar(tmp_path, {"0": {"k": [1.0, 2.0, 3.0, 4.0], "v": [5.0, 6.0, 7.0, 8.0]}})
    k, v = scales.per_head_scales(str(tmp_path), 1, 4, 0, 2, tp_rank=1, tp_size=2)
    assert k.tolist() == [3.0, 4.0] and v.tolist() == [7.0, 8.0]
    k, _ = scales.per_head_scales(str(tmp_path), 1, 4, 0, 4, tp_rank=0, tp_size=1)
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_more_ranks_than_kv_heads_replicate_one_head_each(tmp_path):
    _sidecar(tmp_path, {"0": {"k": [1.0, 2.0], "v": [5.0, 6.0]}})
    got = [scales.per_head_scales(str(tmp_path), 1, 2, 0, 1, tp_rank=r, tp_size=4)[0].tolist() for r in range(4)]
    assert got == [[1.0], [1.0], [2.0], [2.0]]


@pytest.mark.parametrize(
    "config,declared",
    [
        (SimpleNamespace(), False),
        (SimpleNamespace(quantization_config=None), False),
        (SimpleNamespace(quantization_config={"kv_cache_scheme": {"num_bits": 8}}), True),
        (SimpleNamespace(quantization_config=SimpleNamespace(to_dict=lambda: {"kv_cache_quant_algo": "FP8"})), True),
        (SimpleNamespace(quantization_config="fp8"), False),  # neither a dict nor to_dict(): no scales
        ({"quantization_config": {"kv_cache_quant_algo": "FP8"}}, True),
    ],
)
def test_checkpoint_scales_are_read_from_a_transformers_config_too(config, declared):
    """The engines hand over transformers config objects, whose quantization_config may be an object."""
    assert scales.checkpoint_has_kv_scales(config) is declared


def test_model_dims_read_the_text_config_and_fall_back_to_attention_heads():
    assert scales.model_dims({"text_config": CONFIG, "num_hidden_layers": 99}) == (2, 4)
    assert scales.model_dims({"num_hidden_layers": 3, "num_attention_heads": 6}) == (3, 6)


def test_the_missing_scales_warning_stands_out_and_names_dtype_and_model(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=scales.logger.name)
    scales.check_fp8_scales("fp8_e5m2", "models/x", CONFIG)
    lines = caplog.records[0].getMessage().split("\n")
    assert lines[0] == "" and lines[1] == lines[-1] == "!" * 80
    assert lines[2] == (
        "KV cache fp8_e5m2 but models/x has no calibrated KV-cache scales: every scale is 1.0, "
        "which clips keys and values beyond the format's range and wastes its precision below it."
    )


def test_scales_file_errors_say_which_file_and_how_to_write_it(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(scales.ScalesFileError) as err:
        scales.load_sglang_scales_file(missing, 2)
    assert str(err.value) == (
        f"--quantization-param-path {missing} does not exist; write it with "
        "`maia-serving calibrate-kv --model MODEL --data FILE.txt --out MODEL-kv-fp8` "
        f"(kv_cache_scales.json and {scales.SIDECAR} in the output)"
    )
    with pytest.raises(scales.ScalesFileError) as err:
        scales.load_sglang_scales_file(_sglang_file(tmp_path, "{"), 2)
    assert str(err.value).startswith(f"--quantization-param-path {tmp_path / 'kv_cache_scales.json'} cannot be read")
    assert str(err.value).endswith(f"write it again with `{scales.calibrate_command(str(tmp_path))}`")


def test_scales_file_shape_errors_name_the_whole_key_path_and_the_first_eight_missing_layers(tmp_path):
    path = _sglang_file(tmp_path, {"kv_cache": {"scaling_factor": {"0": [0.5]}}})
    with pytest.raises(scales.ScalesFileError, match=r": kv_cache\.scaling_factor\.0 must map layer numbers"):
        scales.load_sglang_scales_file(path, 2)
    path = _sglang_file(tmp_path, {"kv_cache": {"scaling_factor": {"0": {}}}})
    with pytest.raises(scales.ScalesFileError) as err:
        scales.load_sglang_scales_file(path, 10)
    assert str(err.value).endswith(
        "lacks scales for layer(s) [0, 1, 2, 3, 4, 5, 6, 7] of the model's 10; was it calibrated for another model?"
    )


def test_unsharded_kv_heads_take_every_scale_on_every_rank(tmp_path):
    """An engine that keeps all KV heads on each rank (num_kv_heads == total) reads them all."""
    _sidecar(tmp_path, {"0": {"k": [1.0, 2.0, 3.0, 4.0], "v": [5.0, 6.0, 7.0, 8.0]}})
    k, v = scales.per_head_scales(str(tmp_path), 1, 4, 0, 4, tp_rank=1, tp_size=2)
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0] and v.tolist() == [5.0, 6.0, 7.0, 8.0]
    k, _ = scales.per_head_scales(str(tmp_path), 1, 4, 0, 4, tp_rank=3, tp_size=4)  # as many ranks as heads
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_per_head_scales_are_float32_whatever_torchs_default_dtype(tmp_path):
    """The attention kernels take float32 scales; a model loader may have changed the default dtype."""
    torch = pytest.importorskip("torch")
    _sidecar(tmp_path, {"0": {"k": [1.0, 2.0], "v": [5.0, 6.0]}})
    torch.set_default_dtype(torch.float64)
    try:
        k, v = scales.per_head_scales(str(tmp_path), 1, 2, 0, 2, tp_rank=0, tp_size=1)
    finally:
        torch.set_default_dtype(torch.float32)
    assert (k.dtype, v.dtype) == (torch.float32, torch.float32)


def test_a_rank_asking_for_heads_past_the_sidecar_is_refused(tmp_path):
    _sidecar(tmp_path, {"0": {"k": [1.0, 2.0, 3.0, 4.0], "v": [5.0, 6.0, 7.0, 8.0]}})
    with pytest.raises(ValueError) as err:
        scales.per_head_scales(str(tmp_path), 1, 4, 0, 3, tp_rank=1, tp_size=2)
    assert str(err.value) == f"{scales.SIDECAR} has 4 KV heads for layer 0; rank 1 of 2 needs heads 3..5"


def test_show_scales_prints_a_float_or_every_head_of_a_tensor():
    torch = pytest.importorskip("torch")
    assert scales.show_scales(0.123456) == "0.1235"
    assert scales.show_scales(torch.tensor([[1.0, 2.5], [3.0, 0.125]])) == "1,2.5,3,0.125"


def test_layer_index_is_read_from_the_layer_name():
    assert scales.layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="cannot tell the layer index of attention layer 'lm_head'"):
        scales.layer_index("lm_head")


# --- NVFP4's tensor scales: the sidecar's calibrated absmax / (6 x 448) ----------------------------


def test_nvfp4_needs_the_sidecar_and_says_how_to_write_it(tmp_path):
    with pytest.raises(scales.ScalesFileError, match="an nvfp4 KV cache needs calibrated tensor scales") as err:
        scales.check_nvfp4_scales(str(tmp_path), {"num_hidden_layers": 2, "num_key_value_heads": 4})
    assert "maia-serving calibrate-kv --model" in str(err.value)
    _sidecar(tmp_path, GOOD_SIDECAR)
    scales.check_nvfp4_scales(str(tmp_path), {"num_hidden_layers": 2, "num_key_value_heads": 4})


@pytest.mark.parametrize("calibrated,fp8_max", [("e4m3", 448.0), ("e5m2", 57344.0)])
def test_nvfp4_tensor_scales_cover_the_calibrated_absmax(tmp_path, monkeypatch, calibrated, fp8_max):
    """t x 6 x 448 is the absmax the sidecar's FP8 scale was calibrated from: per head, or the layer's largest."""
    (tmp_path / scales.SIDECAR).write_text(json.dumps({"format": calibrated, "layers": GOOD_SIDECAR}))
    k, v = scales.nvfp4_tensor_scales(str(tmp_path), 2, 4, 1, 4, 0, 1)
    assert k * 6 * 448 == pytest.approx(0.4 * fp8_max) and v * 6 * 448 == pytest.approx(4.0 * fp8_max)
    monkeypatch.setenv("MAIA_SERVING_KV_SCALES", "per_head")
    k, v = scales.nvfp4_tensor_scales(str(tmp_path), 2, 4, 1, 2, 1, 2)  # rank 1 of 2: heads 2 and 3
    assert (k * 6 * 448).tolist() == pytest.approx([0.3 * fp8_max, 0.4 * fp8_max], rel=1e-6)
    assert (v * 6 * 448).tolist() == pytest.approx([3.0 * fp8_max, 4.0 * fp8_max], rel=1e-6)

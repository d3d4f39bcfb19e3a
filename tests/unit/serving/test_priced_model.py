"""Proxy shapes: which model a server's steps are priced as, the errors for a name or a file that
names none, and the host KV tokens that keep the engine within what the emulated device holds."""

import json

import pytest

from maia_serving import envs
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import ServingConfig, plan_memory
from maia_serving.emulator.model_shape import builtin_model_names, load_model_shape, shape_from_config
from maia_serving.serving.priced_model import engine_kv_tokens, priced_shape

DEMO = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}
SETTING = "--additional-config maia_model"


@pytest.fixture(scope="module")
def demo():
    return shape_from_config(DEMO, name="demo")


@pytest.mark.parametrize("spec", [None, ""])
def test_no_proxy_prices_the_served_model(demo, spec):
    assert priced_shape(demo, spec, SETTING) is demo


def test_a_builtin_name_prices_that_shape(demo):
    shape = priced_shape(demo, "llama-3-8b", SETTING)
    assert shape == load_model_shape("llama-3-8b")
    assert (shape.name, shape.num_layers) == ("llama-3-8b", 32)


def test_a_config_json_or_its_folder_prices_that_model(demo, tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**DEMO, "num_hidden_layers": 6}))
    for spec in (str(folder / "config.json"), str(folder)):
        shape = priced_shape(demo, spec, SETTING)
        assert (shape.name, shape.num_layers) == ("my-llama", 6)


def test_an_unknown_name_is_refused_with_the_setting_and_every_choice(demo):
    with pytest.raises(ValueError) as err:
        priced_shape(demo, "llama-9-9b", SETTING)
    msg = str(err.value)
    assert msg.startswith("--additional-config maia_model='llama-9-9b': no model config at 'llama-9-9b'")
    assert ", ".join(builtin_model_names()) in msg and "llama-3-70b" in msg


def test_a_missing_file_is_named(demo, tmp_path):
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ValueError, match=f"{envs.MAIA_SERVING_MODEL}='{missing}': no model config at '{missing}'"):
        priced_shape(demo, str(missing), envs.MAIA_SERVING_MODEL)


@pytest.mark.parametrize(
    "text, why", [("{not json", "is not a valid config.json"), ('{"model_type": "llama"}', "hidden_size")]
)
def test_a_bad_file_is_named_with_what_is_wrong(demo, tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        priced_shape(demo, str(path), SETTING)
    assert str(path) in str(err.value) and why in str(err.value)


def test_the_setting_reads_the_engine_config_first_then_the_environment(monkeypatch):
    monkeypatch.delenv(envs.MAIA_SERVING_MODEL, raising=False)
    assert envs.priced_model(None) is None
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "llama-3-70b")
    assert envs.priced_model(None) == "llama-3-70b"
    assert envs.priced_model("llama-3-8b") == "llama-3-8b"


def _plans(profile: str, max_len: int = 512):
    config = ServingConfig(max_model_len=max_len, block_size=16)
    device = load_profile(profile)
    return (
        plan_memory(load_model_shape("llama-3-70b"), device, config),
        plan_memory(shape_from_config(DEMO, name="demo"), device, config),
    )


def test_the_engine_holds_the_emulated_tokens_when_the_host_has_room():
    """Llama-3-70B on one Maia 200 holds fewer tokens than 64 GiB hold of the demo model: the engine
    gets exactly the emulated device's tokens, so it never runs more sequences than the device could."""
    proxy, host = _plans("maia200")
    assert host.kv_bytes_per_token == 2 * 2 * 2 * 32 * 2  # 2 layers, K and V, 2 KV heads of 32, BF16
    assert engine_kv_tokens(proxy, host, 64 * 2**30) == proxy.kv_tokens < 64 * 2**30 // 512


def test_the_host_cap_clamps_the_engine_in_the_served_model_s_bytes():
    proxy, host = _plans("maia200")
    assert engine_kv_tokens(proxy, host, 2**20) == 2**20 // 512 == 2048

"""Clear errors before either engine starts: unknown profile, a model that does not fit,
a scales file that is not there. Nothing is loaded before these checks."""

import json
import shutil

import pytest

from maia_serving.launch import Server, ServerFailed, free_port, sglang_serve_cmd, vllm_serve_cmd

ENGINES = ("vllm", "sglang")


def _cmd(engine: str, model, port: int, profile: str, *extra: str) -> tuple[list[str], dict]:
    """Each engine's own way of naming the profile: vLLM's --additional-config, SGLang's env."""
    if engine == "vllm":
        cmd = vllm_serve_cmd(model, port, "--additional-config", json.dumps({"maia_profile": profile}),
                             "--enforce-eager", *extra)
        return cmd, {"VLLM_CPU_CI_ENV": "1"}
    return sglang_serve_cmd(model, port, *extra), {"MAIA_SERVING_PROFILE": profile}


def _fails(engine: str, model, profile: str, log, *extra: str) -> str:
    port = free_port()
    cmd, env = _cmd(engine, model, port, profile, *extra)
    with pytest.raises(ServerFailed) as err:
        Server(cmd, port, log, env=env, timeout_s=240).start()
    return str(err.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_profile_names_the_known_ones(engine, demo_model, logs_dir):
    msg = _fails(engine, demo_model, "maia300", logs_dir / f"unknown-profile-{engine}.log")
    assert "unknown device profile 'maia300'" in msg and "maia100" in msg


@pytest.fixture(scope="module")
def llama70b_shape(demo_model, tmp_path_factory):
    """A Llama-3-70B-shaped config (no weights needed: sizing happens before loading)."""
    from maia_serving.emulator.model_shape import load_model_shape

    big = tmp_path_factory.mktemp("models") / "llama70b-shape"
    shutil.copytree(demo_model, big)
    config = json.loads((big / "config.json").read_text())
    shape = load_model_shape("llama-3-70b")
    config.update(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                  num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                  num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
                  max_position_embeddings=8192)
    (big / "config.json").write_text(json.dumps(config))
    return big


@pytest.mark.parametrize("engine,length", [("vllm", "--max-model-len"), ("sglang", "--context-length")])
def test_model_that_does_not_fit_says_what_would(engine, length, llama70b_shape, logs_dir):
    msg = _fails(engine, llama70b_shape, "maia100", logs_dir / f"no-fit-{engine}.log", length, "8192")
    assert "does not fit on maia100" in msg
    assert ("--tensor-parallel-size 4" if engine == "vllm" else "--tp-size 4") in msg


def test_sglang_missing_scales_file_is_an_error(demo_model, tmp_path, logs_dir):
    missing = tmp_path / "kv_cache_scales.json"
    msg = _fails("sglang", demo_model, "maia100", logs_dir / "sglang-missing-scales.log",
                 "--kv-cache-dtype", "fp8_e4m3", "--quantization-param-path", str(missing))
    assert f"--quantization-param-path {missing} does not exist" in msg
    assert "maia-serving calibrate-kv" in msg

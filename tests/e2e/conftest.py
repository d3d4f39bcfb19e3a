"""One real `vllm serve <demo> --device maia` on 127.0.0.1, shared by the e2e tests."""

from pathlib import Path

import pytest

from maia_serving.launch import Server, free_port, vllm_serve_cmd

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "models" / "logs"
# Eager mode keeps startup near 30 s; the CPU backend's compile warm-up adds as much again.
ENGINE_ENV = {"VLLM_CPU_CI_ENV": "1", "MAIA_SERVING_LOG_INTERVAL_S": "1"}


@pytest.fixture(scope="session")
def logs_dir() -> Path:
    return LOGS


@pytest.fixture(scope="session")
def maia_server(demo_model):
    port = free_port()
    cmd = vllm_serve_cmd(demo_model, port, "--served-model-name", "demo", "--max-model-len", "512",
                         "--enforce-eager", "--additional-config", '{"maia_profile": "maia100"}')
    with Server(cmd, port, LOGS / "maia-server.log", env=ENGINE_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def client(maia_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{maia_server.url}/v1", api_key="none", max_retries=0)

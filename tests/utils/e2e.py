"""What the e2e tests share besides fixtures: where servers log, the engines' environments and limits, an OpenAI
client. A module of its own, not tests/e2e/conftest.py: `from conftest import ...` finds whichever folder's
conftest pytest loaded last, which is another folder's when tests/e2e and tests/unit are named together."""

import os
from pathlib import Path

from tests.utils.launch import Server

ROOT = Path(__file__).resolve().parents[2]
# `make test` runs several pytest-xdist workers; each keeps its own servers' logs.
LOGS = ROOT / "models" / "logs" / os.environ.get("PYTEST_XDIST_WORKER", "")
# Eager mode keeps startup near 30 s; the CPU backend's compile warm-up adds as much again.
ENGINE_ENV = {"VLLM_CPU_CI_ENV": "1", "MAIA_SERVING_LOG_INTERVAL_S": "1"}
SGLANG_ENV = {"MAIA_SERVING_PROFILE": "maia100", "MAIA_SERVING_LOG_INTERVAL_S": "1"}
# The same scheduling limits for both engines, so the emulated workspace and KV capacity match.
VLLM_LIMITS = ("--max-model-len", "512", "--max-num-batched-tokens", "2048", "--max-num-seqs", "64")
SGLANG_LIMITS = ("--context-length", "512", "--chunked-prefill-size", "2048", "--max-running-requests", "64")

# The files that use the session-wide servers (maia_server, sglang_server, served: tests/e2e/conftest.py), which
# `make test` runs on one worker (tests/conftest.py), so each server starts once in the suite, not once on each
# worker. A file missing here is caught at collection, or where it asks for a server by name, when it starts.
SESSION_SERVER_FILES = (
    "e2e/test_sglang.py",
    "e2e/test_mx_serve.py",
    "e2e/test_engine_tools.py",
    "e2e/test_serve.py",
    "e2e/test_reliability.py",
    "e2e/test_vllm_fp8.py",
)


def check_session_server_file() -> None:
    """Raise, naming the fix, where the running test's file is not in SESSION_SERVER_FILES."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0].removeprefix("tests/")
    if test not in SESSION_SERVER_FILES:
        raise RuntimeError(f"{test} uses a session-wide server: add it to SESSION_SERVER_FILES in {__file__}")


def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def assert_streams(client, model: str, prompt: str = "import", max_tokens: int = 5) -> None:
    """A streamed greedy completion is the plain one, in SSE chunks ending with its usage. How many chunks carry
    text is the server's choice: a busy API server sends the tokens it has in one."""
    greedy = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body = {"ignore_eos": True}
    plain = client.completions.create(**greedy, extra_body=body).choices[0].text
    chunks = list(
        client.completions.create(**greedy, stream=True, stream_options={"include_usage": True}, extra_body=body)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == max_tokens
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

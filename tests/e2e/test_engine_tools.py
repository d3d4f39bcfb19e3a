"""The engines' own launch, bench and eval entry points work in our environments, and each engine's benchmark
client measures the other engine's maia server (as users compare them; each client's own engine is the easy
pairing, and both clients speak the OpenAI API both servers serve).

`vllm serve`, `python -m sglang.launch_server`, `vllm bench serve` and `sglang.bench_serving` run for real in
this suite (every server; the benchmark clients below), so their --help is not asked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils.launch import sglang_python

VLLM = str(Path(sys.executable).with_name("vllm"))

# Entry points the engines document that the suite does not otherwise run; each must at least start (its --help
# exits 0).
ENTRY_POINTS = {
    "vllm bench latency": ("vllm", [VLLM, "bench", "latency", "--help"]),
    "vllm bench throughput": ("vllm", [VLLM, "bench", "throughput", "--help"]),
    "sglang serve": ("sglang-script", ["serve", "--help"]),
    "sglang.bench_one_batch_server": ("sglang", ["-m", "sglang.bench_one_batch_server", "--help"]),
    "sglang.test.run_eval": ("sglang", ["-m", "sglang.test.run_eval", "--help"]),
}


def _command(engine: str, args: list[str]) -> list[str]:
    if engine == "vllm":
        return args
    if engine == "sglang-script":
        return [str(sglang_python().with_name("sglang")), *args]
    return [str(sglang_python()), *args]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_starts(name):
    engine, args = ENTRY_POINTS[name]
    out = subprocess.run(_command(engine, args), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "usage" in (out.stdout + out.stderr).lower()


def _bench(tool: str, base_url: str, demo_model, tmp_path) -> dict:
    """A small random-prompt run of ``tool`` against the served engine; its result file."""
    result = tmp_path / f"{tool}.json"
    backend = "openai" if tool == "vllm" else "sglang-oai"
    common = [
        "--backend",
        backend,
        "--base-url",
        base_url,
        "--model",
        "demo",
        "--tokenizer",
        str(demo_model),
        "--num-prompts",
        "8",
        "--random-input-len",
        "32",
        "--random-output-len",
        "8",
    ]
    if tool == "vllm":
        cmd = [
            VLLM,
            "bench",
            "serve",
            *common,
            "--dataset-name",
            "random",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            result.name,
        ]
    else:
        cmd = [
            str(sglang_python()),
            "-m",
            "sglang.bench_serving",
            *common,
            "--dataset-name",
            "random-ids",
            "--output-file",
            str(result),
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = result.read_text().strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("tool,server", [("vllm", "sglang_server"), ("sglang", "maia_server")])
def test_each_engines_benchmark_client_measures_the_other_engines_maia_server(
    tool, server, demo_model, tmp_path, request
):
    report = _bench(tool, request.getfixturevalue(server).url, demo_model, tmp_path)
    assert report["completed"] == 8
    assert report["total_output_tokens"] > 0

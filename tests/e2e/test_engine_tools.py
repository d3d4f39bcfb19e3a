"""The engines' own launch, bench and eval entry points work in our environments, and each
engine's benchmark client measures both maia servers (as users compare them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils.launch import sglang_python

VLLM = str(Path(sys.executable).with_name("vllm"))

# Entry points the engines document; each must at least start (its --help exits 0).
ENTRY_POINTS = {
    "vllm serve": ("vllm", [VLLM, "serve", "--help"]),
    "vllm bench serve": ("vllm", [VLLM, "bench", "serve", "--help"]),
    "vllm bench latency": ("vllm", [VLLM, "bench", "latency", "--help"]),
    "vllm bench throughput": ("vllm", [VLLM, "bench", "throughput", "--help"]),
    "sglang.launch_server": ("sglang", ["-m", "sglang.launch_server", "--help"]),
    "sglang serve": ("sglang-script", ["serve", "--help"]),
    "sglang.bench_serving": ("sglang", ["-m", "sglang.bench_serving", "--help"]),
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


def _bench(tool: str, served, demo_model, tmp_path) -> dict:
    """A small random-prompt run of ``tool`` against the served engine; its result file."""
    result = tmp_path / f"{tool}.json"
    backend = "openai" if tool == "vllm" else "sglang-oai"
    common = [
        "--backend",
        backend,
        "--base-url",
        served.server.url,
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


@pytest.mark.parametrize("tool", ["vllm", "sglang"])
def test_each_engines_benchmark_client_measures_both_maia_servers(tool, served, demo_model, tmp_path):
    report = _bench(tool, served, demo_model, tmp_path)
    assert report["completed"] == 8
    assert report["total_output_tokens"] > 0

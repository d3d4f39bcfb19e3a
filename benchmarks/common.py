"""Shared pieces of the benchmarks: a bounded load generator and result files."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
# The benchmarks drive servers with the test harness (tests/utils: launch, loadgen, replay), which is not shipped
# in the package: importing this module puts the repository root on the path, so import it first.
ROOT = OUT.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    output_tokens: int
    wall_s: float
    server_cpu_s: float  # CPU time of the server's whole process tree during the load

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def output_tokens_per_cpu_s(self) -> float:
        """Tokens per CPU-second: steady where wall-clock throughput is not, on a host
        whose other tenants take its cores for seconds at a time."""
        return self.output_tokens / self.server_cpu_s


def process_tree_cpu_s(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(
    base_url: str, model: str, requests: int, concurrency: int, max_tokens: int, server_pid: int
) -> LoadResult:
    """A fixed number of completions, ``concurrency`` at a time; every one runs to max_tokens."""
    from openai import OpenAI

    # Retries: a keep-alive connection the server closed between rounds is not a result.
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=3, timeout=600)

    def one(i: int) -> int:
        out = client.completions.create(
            model=model,
            prompt=f"# file {i}\nimport os\n\ndef main():\n",
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.usage.completion_tokens

    one(-1)  # warm-up, not counted
    cpu_before = process_tree_cpu_s(server_pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return LoadResult(requests, concurrency, tokens, wall, process_tree_cpu_s(server_pid) - cpu_before)


def write_json(name: str, data: object) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=lambda o: asdict(o)))
    return path

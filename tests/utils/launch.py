"""Start an engine's OpenAI-compatible server as a subprocess and wait until it serves.

Used by the demo, the end-to-end tests and the benchmarks, so each starts the real
server the way a user would, on 127.0.0.1.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from maia_serving import envs


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a server or engine it starts, with ``extra``; without the metrics socket
    address an in-process test's vLLM platform made for its own children (``MAIA_SERVING_STATS_ADDR``: a folder
    that process owns): two servers given one address would publish to one socket."""
    env = {k: v for k, v in os.environ.items() if k != envs.MAIA_SERVING_STATS_ADDR}
    return {**env, **(extra or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


class Server:
    """A server process; ``with Server(cmd, port) as srv:`` waits for /health."""

    def __init__(
        self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 300.0
    ):
        self.cmd = cmd
        self.port = port
        self.log_path = log_path
        self.env = child_env(env)
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        # A session of its own, so stopping the server stops its engine processes too.
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise ServerFailed(f"server not healthy after {self.timeout_s:.0f} s; log:\n{self.log_text()[-4000:]}")

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (its session)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return 0
        root = psutil.Process(self.proc.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def stop(self) -> None:
        """SIGTERM to the server alone, as a user's Ctrl-C or a process manager sends it: it stops its own
        engine processes (a SIGTERM to them too reads to SGLang as a crashed scheduler, and it waits 5 s for
        diagnostics). What is left of its session after 30 s, or after it exits, is killed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the session is gone: nothing left
            pass
        self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_serve_cmd(model: str | Path, port: int, *extra: str, device: str | None = "maia") -> list[str]:
    """``vllm serve MODEL --device maia ...`` with the venv's own `vllm` script."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    cmd = [vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    if device:
        cmd += ["--device", device]
    return cmd + list(extra)


# SGLang cannot share vLLM's environment: its servers run from their own venv.
DEFAULT_SGLANG_PYTHON = Path(__file__).resolve().parents[2] / ".venv-sglang" / "bin" / "python"


def sglang_python() -> Path:
    """The Python of the SGLang environment (``make setup-sglang`` builds .venv-sglang/)."""
    python = Path(envs.get(envs.MAIA_SERVING_SGLANG_PYTHON) or DEFAULT_SGLANG_PYTHON)
    if not python.exists():
        raise FileNotFoundError(
            f"no SGLang environment at {python}: run `make setup-sglang` (or point "
            f"{envs.MAIA_SERVING_SGLANG_PYTHON} at a Python with sglang and maia-serving)"
        )
    return python


def sglang_serve_cmd(model: str | Path, port: int, *extra: str, device: str | None = "maia") -> list[str]:
    """``python -m sglang.launch_server --model-path MODEL --device maia ...`` in the SGLang venv."""
    cmd = [
        str(sglang_python()),
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if device:
        cmd += ["--device", device]
    return cmd + list(extra)


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (from ``scrape``) whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def scrape(url: str, prefix: str = "maia:") -> dict[str, float]:
    """Samples of ``/metrics`` whose name starts with ``prefix``, keyed by their line's name."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def settled_scrape(
    url: str,
    ready: Callable[[dict[str, float]], bool],
    prefix: str = "maia:",
    timeout_s: float = 30.0,
    poll_s: float = 0.05,
) -> dict[str, float]:
    """``scrape`` once ``ready`` holds of it and the emulated figures have stopped moving; the last
    scrape if ``timeout_s`` passes first.

    A step's figures land one metric at a time, after the reply (vLLM: over the stats channel; SGLang:
    into one file per kind of metric, which a scrape reads one after the other), so a scrape taken
    meanwhile can count a step in one metric and not yet in another. Settled: two scrapes in a row
    agree on every ``maia:`` sample and, within them, the busy time is the steps' summed time (both
    add the same figures)."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, float] | None = None
    while True:
        samples = scrape(url, prefix)
        emulated = {k: v for k, v in samples.items() if k.startswith("maia:")}
        busy, summed = (
            metric(emulated, "maia:emulated_busy_seconds_total"),
            metric(emulated, "maia:emulated_step_seconds_sum"),
        )
        if (
            emulated == previous and math.isclose(busy, summed, rel_tol=1e-9, abs_tol=1e-12) and ready(samples)
        ) or time.monotonic() > deadline:
            return samples
        previous = emulated
        time.sleep(poll_s)

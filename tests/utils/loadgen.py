"""A load generator whose clients behave like real ones: some stream, some give up.

It sends a fixed number of OpenAI-compatible completion and chat requests at a fixed
concurrency to a server on this machine. A share of the streaming clients close the
connection after a few chunks, a share of the plain ones time out, the rest read
their answer to the end. A failure is anything the client did not cause: an error
status, a broken connection, a truncated answer. Bounded in count and time, it stops
by itself. Used by the soak tests and ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Load:
    num_requests: int = 300
    concurrency: int = 48
    stream_share: float = 0.5  # requests that stream
    disconnect_share: float = 0.15  # of streaming requests: close after ``disconnect_after`` chunks
    disconnect_after: int = 2
    timeout_share: float = 0.1  # of plain requests: give up after ``timeout_s``
    timeout_s: float = 0.3
    chat_share: float = 0.5
    max_tokens: int = 24
    request_timeout_s: float = 120.0  # a client that waits longer counts the request as failed
    seed: int = 0


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)  # ok, disconnected, timed_out, failed
    failures: list[str] = field(default_factory=list)  # the first few, for the log
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return self.outcomes["failed"]

    @property
    def cancelled(self) -> int:
        return self.outcomes["disconnected"] + self.outcomes["timed_out"]

    def to_dict(self) -> dict:
        return {
            **{k: self.outcomes[k] for k in ("ok", "disconnected", "timed_out", "failed")},
            "wall_s": round(self.wall_s, 2),
            "failures": self.failures[:5],
        }


def _plan(load: Load) -> list[dict]:
    """Each request's kind, seeded, so a run can be repeated."""
    rng = random.Random(load.seed)
    plans = []
    for i in range(load.num_requests):
        stream = rng.random() < load.stream_share
        chat = rng.random() < load.chat_share
        if stream:
            action = "disconnect" if rng.random() < load.disconnect_share else "read"
        else:
            action = "timeout" if rng.random() < load.timeout_share else "read"
        prompt = f"def f{i}(x):\n    return x" + " + x" * rng.randrange(1, 40)
        plans.append({"stream": stream, "chat": chat, "action": action, "prompt": prompt})
    return plans


def _body(model: str, plan: dict, load: Load) -> dict:
    body = {"model": model, "max_tokens": load.max_tokens, "temperature": 0.7, "stream": plan["stream"]}
    if plan["chat"]:
        body["messages"] = [{"role": "user", "content": plan["prompt"]}]
    else:
        body["prompt"] = plan["prompt"]
    return body


async def _one(client, url: str, model: str, plan: dict, load: Load, report: Report) -> None:
    import httpx

    path = "/v1/chat/completions" if plan["chat"] else "/v1/completions"
    body = _body(model, plan, load)
    try:
        if plan["stream"]:
            chunks = 0
            async with client.stream("POST", url + path, json=body, timeout=load.request_timeout_s) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"status {resp.status_code}: {(await resp.aread())[:200]!r}")
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if line.strip() == "data: [DONE]":
                        done = True
                        break
                    chunks += 1
                    if plan["action"] == "disconnect" and chunks >= load.disconnect_after:
                        report.outcomes["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
                if not done:
                    raise RuntimeError(f"stream ended after {chunks} chunks without [DONE]")
        else:
            timeout = load.timeout_s if plan["action"] == "timeout" else load.request_timeout_s
            try:
                resp = await client.post(url + path, json=body, timeout=timeout)
            except httpx.TimeoutException:
                if plan["action"] == "timeout":
                    report.outcomes["timed_out"] += 1
                    return
                raise
            if resp.status_code != 200:
                raise RuntimeError(f"status {resp.status_code}: {resp.text[:200]!r}")
            answer = resp.json()
            if not answer.get("choices"):
                raise RuntimeError(f"no choices in {json.dumps(answer)[:200]}")
        report.outcomes["ok"] += 1
    except Exception as exc:  # anything the client did not cause is a failure of the server
        report.outcomes["failed"] += 1
        report.failures.append(f"{path} stream={plan['stream']}: {type(exc).__name__}: {exc}")


async def _run(url: str, model: str, load: Load) -> Report:
    import httpx

    report = Report()
    queue: asyncio.Queue = asyncio.Queue()
    for plan in _plan(load):
        queue.put_nowait(plan)
    limits = httpx.Limits(max_connections=load.concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                await _one(client, url, model, queue.get_nowait(), load, report)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        report.wall_s = time.monotonic() - start
    return report


def run_load(url: str, model: str, load: Load = Load()) -> Report:
    """Send ``load`` to the server at ``url`` (loopback only) and report what happened."""
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"the load generator only targets servers on this machine, not {url}")
    return asyncio.run(_run(url.rstrip("/"), model, load))

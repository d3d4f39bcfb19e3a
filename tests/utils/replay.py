"""Live and offline agree: one fixed workload through a live server and through ``simulate``.

A static batch (every request at once, fixed input and output lengths, ``ignore_eos``) is what
``simulate`` runs by default. Sent over HTTP, the same requests reach vLLM's engine over a few
host milliseconds, and the engine starts its first step with whichever came first: the live
run then prefills in two steps where the simulator prefills in one, and the first request's
TTFT and everyone's first decode differ (seen: mean TTFT 10-27% short, TPOT up to 3% long;
benchmarks/README.md). So the replay
pauses the scheduler (``POST /pause?mode=keep``, served with ``VLLM_SERVER_DEV_MODE=1``),
sends the batch, gives it ``settle_s`` to reach the engine (a paused engine publishes no
queue length to wait on) and resumes: the engine then sees the batch at once, as the
simulator does; a run whose step count differs from the simulator's did not. The pause is
not on the emulated clock: the requests are open, so the device is not idle, and no step
runs. SGLang needs no pause: its tokenizer hands a batch of token-id prompts to the
scheduler in one message (``pause=False``); its policy then matches the simulator's where
it prefills as vLLM does (a batch that fits one step's budget), and not where vLLM would
mix decodes into chunked prefills (SGLang prefills first). The emulated figures are read
from the server's own ``/metrics`` (the difference of two scrapes), so other traffic must
not overlap.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

from maia_serving.emulator.sim.simulate import Simulation
from maia_serving.emulator.sim.workload import Request
from maia_serving.tools.calibrate_host import stream_completion
from tests.utils.launch import metric, scrape, settled_scrape

# A prompt's tokens: distinct per request from the first token on, so no request shares a
# prefix-cache block with another (the simulator's synthetic requests share none); each replay
# also salts the prefix cache anew, so none reuses an earlier replay's blocks.
_FIRST_TOKEN = 10
_BODY_TOKENS = range(100, 1900)


@dataclass(frozen=True)
class Figures:
    """Emulated figures of one run: busy time (the sum of the steps), and means per request."""

    busy_s: float
    ttft_s: float
    tpot_s: float
    num_steps: int
    num_requests: int

    def ratio_to(self, other: Figures) -> dict[str, float]:
        """Each figure of this run over ``other``'s."""
        return {name: getattr(self, name) / getattr(other, name) for name in ("busy_s", "ttft_s", "tpot_s")}


def simulated_figures(sim: Simulation) -> Figures:
    """The figures of a simulation, as /metrics would count them: busy time is the steps' charged work
    (``StepCost.total_s``), which with pipeline stages is not their overlapping spans; TTFT from when a request
    reached the scheduler, as the engine's own clock counts it (without the front end's share)."""
    tpots = [t.tpot_s for t in sim.timings if t.tpot_s is not None]
    return Figures(
        busy_s=sum(sim.steps.work_s),
        ttft_s=sum(t.ttft_s - t.front_end_s for t in sim.timings) / len(sim.timings),
        tpot_s=sum(tpots) / len(tpots),
        num_steps=len(sim.steps.step_s),
        num_requests=len(sim.timings),
    )


def emulated_figures(before: dict[str, float], after: dict[str, float]) -> Figures:
    """The figures between two scrapes of ``maia:*`` metrics."""

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    requests = delta("maia:emulated_time_to_first_token_seconds_count")
    tpot_count = delta("maia:emulated_time_per_output_token_seconds_count")
    if not requests or not tpot_count:
        raise ValueError("no request finished between the two scrapes")
    return Figures(
        busy_s=delta("maia:emulated_busy_seconds_total"),
        ttft_s=delta("maia:emulated_time_to_first_token_seconds_sum") / requests,
        tpot_s=delta("maia:emulated_time_per_output_token_seconds_sum") / tpot_count,
        num_steps=round(delta("maia:emulated_step_seconds_count")),
        num_requests=round(requests),
    )


def token_prompts(num_requests: int, input_len: int) -> list[list[int]]:
    """``num_requests`` prompts of exactly ``input_len`` token ids, sharing no prefix."""
    return [_prompt(i, input_len) for i in range(num_requests)]


def _prompt(i: int, input_len: int) -> list[int]:
    """Request ``i``'s prompt: its own first token, then a body no other request's shares."""
    body = len(_BODY_TOKENS)
    return [_FIRST_TOKEN + i] + [_BODY_TOKENS[(7 * j + i) % body] for j in range(input_len - 1)]


@dataclass(frozen=True)
class Trace:
    """A trace replayed in real time: when each request really left (host seconds after the first, what
    ``simulate`` is then given), the server's emulated figures, and the client's own stopwatch: mean time
    to the first streamed token and per output token after it."""

    sent: tuple[Request, ...]
    emulated: Figures
    client_ttft_s: float
    client_tpot_s: float


def replay_trace(url: str, model: str, requests: list[Request], timeout_s: float = 300.0) -> Trace:
    """Send each of ``requests`` at its ``arrival_s`` (host seconds from the start) in its own streaming
    request, as a load generator does, every one producing exactly ``output_len`` tokens, timed by a plain HTTP
    client (``stream_completion``): the OpenAI SDK's own work per request is ~10 ms on this host, which would be
    the client's time in the TTFT, not the server's."""
    salt = uuid.uuid4().hex
    before = scrape(url)
    rows: list[tuple[float, float, float] | BaseException | None] = [None] * len(requests)
    start = time.monotonic()

    def send(i: int, request: Request) -> None:
        try:
            time.sleep(max(0.0, start + request.arrival_s - time.monotonic()))
            sent = time.monotonic()
            first_s, last_s = stream_completion(
                url, model, _prompt(i, request.input_len), request.output_len, timeout_s, cache_salt=salt
            )
            rows[i] = (sent - start, first_s, (last_s - first_s) / max(1, request.output_len - 1))
        except BaseException as exc:  # re-raised in the caller's thread
            rows[i] = exc

    threads = [threading.Thread(target=send, args=(i, r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    if failed := next((r for r in rows if not isinstance(r, tuple)), None):
        raise failed if isinstance(failed, BaseException) else TimeoutError("a request did not finish")
    sent = tuple(Request(row[0], r.input_len, r.output_len) for row, r in zip(rows, requests))
    order = sorted(range(len(sent)), key=lambda i: sent[i].arrival_s)
    emulated = emulated_figures(before, _settled(url, before, len(rows)))
    return Trace(
        sent=tuple(sent[i] for i in order),
        emulated=emulated,
        client_ttft_s=sum(r[1] for r in rows) / len(rows),
        client_tpot_s=sum(r[2] for r in rows) / len(rows),
    )


def _post(url: str) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read()


def replay_at_once(
    url: str,
    model: str,
    num_requests: int,
    input_len: int,
    output_len: int,
    pause: bool = True,
    settle_s: float = 2.0,
    timeout_s: float = 300.0,
) -> Figures:
    """Serve the static batch on the server at ``url`` (vLLM in dev mode, for /pause) and return its
    emulated figures; every request must produce exactly ``output_len`` tokens. ``pause=False``
    sends it as a plain client would, in one HTTP request: for SGLang, or to show what the pause
    changes under vLLM."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout_s)
    before = scrape(url)
    salt = uuid.uuid4().hex
    result: dict[str, object] = {}

    def send() -> None:
        try:
            result["out"] = client.completions.create(
                model=model,
                prompt=token_prompts(num_requests, input_len),
                max_tokens=output_len,
                temperature=0,
                extra_body={"ignore_eos": True, "cache_salt": salt},
            )
        except Exception as exc:  # re-raised in the caller's thread
            result["error"] = exc

    sender = threading.Thread(target=send)
    if pause:
        _post(f"{url}/pause?mode=keep")
        try:
            sender.start()
            time.sleep(settle_s)
        finally:
            _post(f"{url}/resume")
    else:
        sender.start()
    sender.join(timeout_s)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    completion_tokens = result["out"].usage.completion_tokens  # type: ignore[union-attr]
    if completion_tokens != num_requests * output_len:
        raise ValueError(f"expected {num_requests * output_len} output tokens, got {completion_tokens}")
    return emulated_figures(before, _settled(url, before, num_requests))


def _settled(url: str, before: dict[str, float], num_requests: int) -> dict[str, float]:
    """A settled scrape that counts every request's TPOT: the engine's last records reach /metrics just
    after the answer."""
    name = "maia:emulated_time_per_output_token_seconds_count"
    return settled_scrape(url, lambda after: metric(after, name) - metric(before, name) >= num_requests, timeout_s=10)

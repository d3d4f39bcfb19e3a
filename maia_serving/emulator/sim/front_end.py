"""The serving front end as a simulation sees it: one worker (vLLM's API server is one process on one event loop)
that serves its work first come, first served, beside the engine.

Its work: each request's input (the HTTP request, tokenization, the hand-off to the engine:
``FrontEnd.of(input_len)``, after which the scheduler has it), each step's outputs taken in from the engine
(``FrontEnd.per_step_s``) and each output token's way back (detokenization, the streamed event:
``FrontEnd.per_output_token_s``), which reaches the client when the worker is done with it. A lone
request pays its own work; under load a request also waits for the work of those before it, which is how a
client's TTFT grows with the rate on a front end busy streaming other requests' tokens. A client limit
(``--max-concurrency``) sends the next request when a client has seen its last token.
"""

from __future__ import annotations

from collections import deque

from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.hardware import FrontEnd
from maia_serving.emulator.sim.workload import Request


class FrontEndQueue:
    """Requests through the front end, in the order they are sent: when each reaches the scheduler, and when each
    token reaches its client. ``timings`` gets each request's send time and first and last token as the client sees
    them, and the front end's share of its TTFT."""

    def __init__(
        self, front_end: FrontEnd, requests: list[Request], timings: list[RequestTiming], limit: int | None
    ) -> None:
        self.front_end = front_end
        self.requests = requests
        self.timings = timings
        self.limited = limit is not None
        self.limit = limit or len(requests)
        self.free_s = 0.0  # when the worker is next free
        self.num_sent = 0
        self.open = 0  # sent, and the last token not yet seen by the client
        self.opened_s = 0.0  # when a client last saw its last token (under a limit, the next send)
        self._ready: deque[tuple[float, int]] = deque()  # (reaches the scheduler at, request), in sending order

    @property
    def has_work(self) -> bool:
        """Requests left to send, or on their way to the scheduler."""
        return self.num_sent < len(self.requests) or bool(self._ready)

    def send_s(self) -> float | None:
        """When the next request is sent: when it arrives, or when a client's slot opens; None if none can be."""
        if self.num_sent == len(self.requests) or self.open >= self.limit:
            return None
        return max(self.requests[self.num_sent].arrival_s, self.opened_s)

    def send_until(self, now_s: float) -> None:
        """Every request sent by ``now_s`` queues its input on the worker, ahead of any later work."""
        while (sent := self.send_s()) is not None and sent <= now_s:
            index = self.num_sent
            request = self.requests[index]
            self.free_s = max(self.free_s, sent) + self.front_end.of(request.input_len)
            self._ready.append((self.free_s, index))
            self.timings[index].arrival_s = sent
            self.timings[index].front_end_s = self.free_s - sent
            self.num_sent += 1
            self.open += 1

    def next_ready_s(self) -> float | None:
        """When the next request reaches the scheduler (None: none is on its way)."""
        if not self._ready:
            sent = self.send_s()
            if sent is None:
                return None
            self.send_until(sent)
        return self._ready[0][0]

    def ready(self, now_s: float) -> list[int]:
        """The requests that have reached the scheduler by ``now_s``, in order."""
        self.send_until(now_s)
        out = []
        while self._ready and self._ready[0][0] <= now_s:
            out.append(self._ready.popleft()[1])
        return out

    def step(self, end_s: float, sampled: tuple[int, ...], finished: tuple[int, ...]) -> None:
        """The step that ended at ``end_s`` sampled a token for each of ``sampled`` (``finished``: their last): the
        worker takes the step's outputs in (``per_step_s``) and streams each token, after what it already has
        (sends up to ``end_s`` first); a client sees its token when the worker is done with it."""
        front_end, timings = self.front_end, self.timings
        per_token = front_end.per_output_token_s
        streams = bool(front_end.per_step_s or per_token)
        seen_s = end_s
        if streams:
            self.send_until(end_s)
            self.free_s = max(self.free_s, end_s) + front_end.per_step_s
        for index in sampled:
            if streams:
                self.free_s += per_token
                seen_s = self.free_s
            timing = timings[index]
            if timing.first_token_s is None:
                timing.first_token_s = seen_s
                timing.front_end_s += seen_s - end_s
            timing.last_token_s = seen_s
            timing.num_output_tokens += 1
            if finished and index in finished:
                self.open -= 1
                if self.limited:
                    self.opened_s = max(self.opened_s, seen_s)

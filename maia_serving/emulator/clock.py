"""An emulated clock: advances by each step's emulated time, times each request.

The engine runs on the host; the clock says when each step *would* have finished on
the emulated device. A request arrives at the emulated time the engine first sees
it; its first token comes at the end of the step that finishes its prefill.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestTiming:
    """Emulated figures of one request, in seconds of emulated time."""

    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_output_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.last_token_s is None else self.last_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.num_output_tokens < 2 or self.first_token_s is None or self.last_token_s is None:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_output_tokens - 1)


class EmulatedClock:
    """Per-engine emulated time and per-request timings."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.num_steps = 0
        self.requests: dict[str, RequestTiming] = {}

    def arrive(self, request_id: str) -> RequestTiming:
        timing = self.requests.get(request_id)
        if timing is None:
            timing = self.requests[request_id] = RequestTiming(arrival_s=self.now_s)
        return timing

    def advance(self, step_s: float, tokens_out: dict[str, int]) -> list[RequestTiming]:
        """End a step of ``step_s`` seconds in which each request emitted ``tokens_out[id]``;
        returns the timings of the requests whose first token this was."""
        if step_s < 0:
            raise ValueError(f"a step cannot take negative time ({step_s})")
        start_s = self.now_s
        self.now_s += step_s
        self.num_steps += 1
        firsts = []
        for request_id, count in tokens_out.items():
            if count <= 0:
                continue
            timing = self.requests.get(request_id)
            if timing is None:  # not arrive()d: the engine first saw it when this step began
                timing = self.requests[request_id] = RequestTiming(arrival_s=start_s)
            if timing.first_token_s is None:
                timing.first_token_s = self.now_s
                firsts.append(timing)
            timing.last_token_s = self.now_s
            timing.num_output_tokens += count
        return firsts

    def finish(self, request_id: str) -> RequestTiming | None:
        """Forget a finished request and return its timing."""
        return self.requests.pop(request_id, None)

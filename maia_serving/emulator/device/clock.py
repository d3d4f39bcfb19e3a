"""An emulated clock: advances by each step's emulated time, times each request.

The engine runs on the host; the clock says when each step *would* have finished on
the emulated device. A request's first token comes at the end of the step that
finishes its prefill.

Idle time (the rule both engines follow): the device is idle while no request is open
(arrived and not yet finished or aborted), and while idle the emulated clock runs with
the host's wall clock. A request that arrives ``d`` host seconds after the device went
idle arrives ``d`` emulated seconds after its last step ended, so the gaps a client
leaves between requests are kept, as ``simulate`` keeps the gaps of a trace. While
busy, a request arrives at the emulated time the engine first sees it: between steps,
at the end of the step in flight, where the simulator also admits it.

Why not stamp every arrival with its host time: while busy, the host and the emulated
device run the same steps at different speeds, so no host instant has one emulated
counterpart; the engine's own order of events (which step a request joins) is the one
thing both timelines share, and the clock keeps it. An idle gap has no step in it, so
it maps one to one. The arrivals on the emulated timeline are therefore the host's
arrivals exactly when the device idles between them, and otherwise as the host engine
batched them: a host much slower than the device batches more requests per step than
the device would have, and a host faster than the device fewer.

Pacing (``paced``, MAIA_SERVING_PACE=1) closes the second gap: after each step the engine waits
(``pace_s``) until the host's clock has gone as far since the device last went busy as the
emulated clock has, so while the host is faster the two clocks run together, a request that
arrives while the device is busy joins the step the device would be running, and a client's
own stopwatch reads the device's latency. A request that reached the server while the engine
waited (the engine sees it when the wait is over; ``age_s`` says how long before) arrived, on the
emulated timeline too, that long before the step's end, as ``simulate`` times an arrival during a
step (it joins the queue when the step ends, its wait counted). Where a step takes the
host longer than the device, the host's clock is the later one and nothing is waited (the two are
lined up again from there); a request arriving while the host runs a step arrives at its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RequestTiming:
    """Emulated figures of one request, in seconds of emulated time."""

    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_output_tokens: int = 0
    front_end_s: float = 0.0  # of the TTFT, the serving front end's (simulate.py; the live clock starts after it)

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
    """Per-engine emulated time and per-request timings; ``host_time`` (seconds, monotonic)
    is the host's clock that idle time follows."""

    def __init__(self, host_time: Callable[[], float] = time.monotonic) -> None:
        self.now_s = 0.0
        self.busy_s = 0.0  # the sum of the steps: now_s less the idle time
        self.num_steps = 0
        self.requests: dict[str, RequestTiming] = {}
        self._host_time = host_time
        self._idle_since_host_s: float | None = host_time()  # None while a request is open
        self.paced = False  # MAIA_SERVING_PACE: the engine waits out pace_s after each step
        self._paced_host_s: float | None = None  # the host time the emulated clock's now_s stands for
        self._last_step_s = 0.0

    def arrive(self, request_id: str, age_s: float = 0.0) -> RequestTiming:
        """A request the engine has just seen, ``age_s`` host seconds after it reached the server; on an idle
        device, the host's idle time passes first."""
        waited_s = self._waited_s(age_s)
        if self._idle_since_host_s is not None:
            host_s = self._host_time()
            self.now_s += host_s - self._idle_since_host_s
            self._idle_since_host_s = None
            self._paced_host_s = host_s
        timing = self.requests.get(request_id)
        if timing is None:
            timing = self.requests[request_id] = RequestTiming(arrival_s=self.now_s - waited_s)
        return timing

    def _waited_s(self, age_s: float) -> float:
        """Paced and busy: how long before the last step's end the request reached the server (while the engine
        waited out that step), at most the step; 0 otherwise."""
        if not self.paced or self._paced_host_s is None or self._idle_since_host_s is not None:
            return 0.0
        return min(max(0.0, self._paced_host_s - (self._host_time() - age_s)), self._last_step_s)

    def advance(self, step_s: float, tokens_out: dict[str, int]) -> list[RequestTiming]:
        """End a step of ``step_s`` seconds in which each request emitted ``tokens_out[id]``;
        returns the timings of the requests whose first token this was."""
        if step_s < 0:
            raise ValueError(f"a step cannot take negative time ({step_s})")
        start_s = self.now_s
        self.now_s += step_s
        self.busy_s += step_s
        self._last_step_s = step_s
        if self._paced_host_s is not None:
            self._paced_host_s += step_s
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
        # Open requests (even ones never announced) keep the device busy; a step that ran while none
        # was open (all aborted mid-step) was busy time, so the idle time starts again at its end.
        if self.requests:
            self._idle_since_host_s = None
        elif step_s > 0:
            self._idle_since_host_s = self._host_time()
        return firsts

    def pace_s(self) -> float:
        """Host seconds to wait for the host's clock to catch up with the emulated one (module docstring);
        0 where the host is behind, which lines the two up from now."""
        host_s = self._host_time()
        if self._paced_host_s is None or self._paced_host_s <= host_s:
            self._paced_host_s = host_s
            return 0.0
        return self._paced_host_s - host_s

    def finish(self, request_id: str) -> RequestTiming | None:
        """Forget a finished request and return its timing; the last one leaves the device idle."""
        timing = self.requests.pop(request_id, None)
        if timing is not None and not self.requests:
            self._idle_since_host_s = self._host_time()
        return timing

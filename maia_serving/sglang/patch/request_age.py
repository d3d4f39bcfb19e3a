"""Patch: a request's creation time travels to the scheduler, so that a paced clock can stamp its arrival.

Why: with ``MAIA_SERVING_PACE=1`` the engine waits out each step's emulated time, and a request that reached the
server during that wait is stamped as arrived that long before the step's end (the rule in
``maia_serving.emulator.device.clock``; vLLM's ``Request.arrival_time`` gives it). SGLang's scheduler learns of a
request from a ``TokenizedGenerateReqInput`` whose time stats (``APIServerReqTimeStats``, set by the tokenizer
manager in the API server) SGLang 0.5.23 pickles without their times: its ``__getstate__`` leaves
``created_time`` out, with a comment on how to add it. This adds it; SGLang's own ``__setstate__`` moves every
key ending in ``time`` onto the receiving process's clock. ``request_age_s`` reads it in the scheduler.

When it can go: when SGLang sends a request's creation time to the scheduler.
"""

from __future__ import annotations

import time

TARGET = "sglang.srt.observability.req_time_stats.APIServerReqTimeStats.__getstate__"


def register() -> None:
    from sglang.srt.observability.req_time_stats import APIServerReqTimeStats

    original = APIServerReqTimeStats.__getstate__
    if getattr(original, "maia_request_age", False):
        return

    def __getstate__(self) -> object:
        state = original(self)
        if self.created_time:
            state["created_time"] = self.created_time
        return state

    __getstate__.maia_request_age = True
    APIServerReqTimeStats.__getstate__ = __getstate__


def request_age_s(recv_req, now: float | None = None) -> float:
    """Seconds since the API server created the request (``time.perf_counter``, system-wide on Linux), or 0 when
    its time stats did not carry that time (a request from another path, or the patch not applied there)."""
    created = getattr(getattr(recv_req, "time_stats", None), "created_time", 0.0) or 0.0
    if created <= 0:
        return 0.0
    return max(0.0, (time.perf_counter() if now is None else now) - created)

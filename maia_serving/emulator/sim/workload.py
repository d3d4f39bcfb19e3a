"""Workloads for the simulator: a static batch, Poisson arrivals, or a JSONL trace.

Arrivals follow vLLM's ``vllm bench serve``: the first request comes at 0 s and each
next one after an exponential gap of mean ``1 / rate`` (a Poisson process); an
infinite rate sends everything at once.

A trace is JSON Lines, one request per line, in any order (it is sorted by arrival)::

    {"arrival_s": 0.0, "input_len": 512, "output_len": 128}
    {"arrival_s": 0.25, "input_len": 900, "output_len": 64, "prefix_id": "system-a", "prefix_len": 768}

``arrival_s`` (seconds from the start, >= 0), ``input_len`` and ``output_len`` (tokens,
>= 1) are required. ``prefix_id`` and ``prefix_len`` are optional: requests with the
same ``prefix_id`` share their first tokens, as many as the smaller ``prefix_len`` of
the two, which prefix caching can reuse in whole KV blocks. Blank lines are skipped;
any other key is an error, so a misspelt field is not silently ignored.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it arrives and how many tokens go in and come out."""

    arrival_s: float
    input_len: int
    output_len: int
    prefix_id: str | None = None
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}")
        if not 0 <= self.prefix_len <= self.input_len:
            raise ValueError(f"prefix_len must be in [0, input_len={self.input_len}], got {self.prefix_len}")
        if self.prefix_len and self.prefix_id is None:
            raise ValueError("prefix_len needs a prefix_id: the requests it is shared with")


def arrival_times(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Poisson arrivals at ``request_rate`` per second, reproducible from ``seed``; all at 0 s
    when the rate is infinite."""
    if num_requests < 1:
        raise ValueError(f"the number of requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"the request rate must be > 0 (inf for all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(num_requests - 1):
        times.append(times[-1] + rng.expovariate(request_rate))
    return times


def synthetic(
    num_requests: int, input_len: int, output_len: int, request_rate: float = math.inf, seed: int = 0
) -> list[Request]:
    """``num_requests`` of the same lengths: a static batch at an infinite rate, else Poisson."""
    return [Request(t, input_len, output_len) for t in arrival_times(num_requests, request_rate, seed)]


# Trace fields: the JSON types each may have, and how an error names them.
_REQUIRED = {
    "arrival_s": ((int, float), "a number"),
    "input_len": ((int,), "an integer"),
    "output_len": ((int,), "an integer"),
}
_OPTIONAL = {"prefix_id": ((str, int), "a string or an integer"), "prefix_len": ((int,), "an integer")}


def _field(obj: dict[str, object], key: str, types: tuple[type, ...], kind: str) -> Any:
    """``obj[key]`` of a parsed trace line, checked to be one of ``types`` at run time (so Any to the checker)."""
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):  # JSON true is a Python int
        raise ValueError(f"{key} must be {kind}, got {json.dumps(value)}")
    return value


def parse_trace_line(line: str) -> Request:
    """One trace line as a Request; ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (required: {', '.join(_REQUIRED)})")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field {', '.join(unknown)} (allowed: {', '.join([*_REQUIRED, *_OPTIONAL])})")
    values = {k: _field(obj, k, *spec) for k, spec in {**_REQUIRED, **_OPTIONAL}.items() if k in obj}
    if "prefix_id" in values:
        values["prefix_id"] = str(values["prefix_id"])
    values["arrival_s"] = float(values["arrival_s"])
    return Request(**values)


def read_trace(path: Path, limit: int | None = None) -> list[Request]:
    """The requests of a JSONL trace, sorted by arrival; the first ``limit`` lines' worth if given.
    A bad line stops the read with its file name and line number."""
    requests: list[Request] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(requests) == limit:
                break
            if not line.strip():
                continue
            try:
                requests.append(parse_trace_line(line))
            except ValueError as exc:
                raise ValueError(f"{path}, line {number}: {exc}") from None
    if not requests:
        raise ValueError(f"{path}: no requests in the trace")
    return sorted(requests, key=lambda r: r.arrival_s)

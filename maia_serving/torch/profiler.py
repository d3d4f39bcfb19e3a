"""``with maia_serving.torch.profile() as prof:``: what the block ran on maia, per operator, in emulated time.

Shaped as ``torch.profiler``'s ``key_averages().table()``: one row per operator with its calls, emulated time,
FLOPs, bytes, arithmetic intensity, what bounds it and its share of the total; and beside it the host
time the emulation spent (the CPU kernels), so a user sees both what the chip would take and what the
emulation costs. ``export_chrome_trace`` writes the emulated timeline, one track per chip, for Perfetto.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.formats.units import format_bytes, format_seconds
from maia_serving.torch import pricing
from maia_serving.torch.pricing import OpPrice


@dataclass(frozen=True)
class OpRun:
    """One run of an operator in the block: its signature's price, the chip, the host time it took."""

    price: OpPrice
    device: int
    host_s: float

    def __getattr__(self, name: str) -> Any:  # op, flops, bytes, compute_s, time_s, bound ... of the price
        return getattr(self.price, name)


@dataclass(frozen=True)
class OpSummary:
    """One operator's runs in the block, summed."""

    op: str
    calls: int
    time_s: float
    flops: float
    bytes: float
    host_s: float
    compute_s: float
    memory_s: float
    link_s: float
    launch_s: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def bound(self) -> str:
        return pricing.bound(self.compute_s, self.memory_s, self.link_s, self.launch_s)


def summarize(prices: list[OpPrice], calls: list[int], host_s: list[float]) -> list[OpSummary]:
    """Signatures' prices (each run ``calls`` times, taking ``host_s`` on the host in all) summed per operator,
    most emulated time first."""
    by_op: dict[str, list[tuple[OpPrice, int, float]]] = defaultdict(list)
    for price, n, h in zip(prices, calls, host_s, strict=True):
        by_op[price.op].append((price, n, h))
    summaries = [
        OpSummary(
            op=op,
            calls=sum(n for _, n, _ in rows),
            time_s=sum(n * p.time_s for p, n, _ in rows),
            flops=sum(n * p.flops for p, n, _ in rows),
            bytes=sum(n * p.bytes for p, n, _ in rows),
            host_s=sum(h for _, _, h in rows),
            compute_s=sum(n * p.compute_s for p, n, _ in rows),
            memory_s=sum(n * p.memory_s for p, n, _ in rows),
            link_s=sum(n * p.link_s for p, n, _ in rows),
            launch_s=sum(n * p.launch_s for p, n, _ in rows),
        )
        for op, rows in by_op.items()
    ]
    return sorted(summaries, key=lambda s: s.time_s, reverse=True)


class profile:  # noqa: N801 (named as torch.profiler.profile, used the same way)
    """Collects every maia operator run inside the block, priced on the device profile."""

    def __init__(self) -> None:
        self._records: list[np.ndarray] = []

    def __enter__(self) -> profile:
        from maia_serving.torch import backend

        backend.enable()
        pricing.catch_up()  # what ran before the block is not the block's
        pricing.LEDGER.listeners.append(self._records.append)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        pricing.catch_up()
        pricing.LEDGER.listeners.remove(self._records.append)

    @property
    def runs(self) -> np.ndarray:
        """The block's runs in order: (signature id, chip, host ns)."""
        return np.concatenate(self._records) if self._records else np.zeros(0, dtype=pricing.RUN)

    @property
    def ops(self) -> list[OpRun]:
        prices = pricing.LEDGER.prices
        return [OpRun(prices[i], int(d), ns / 1e9) for i, d, ns in self.runs.tolist()]

    @property
    def total_s(self) -> float:
        """Emulated seconds of the block, summed over its chips."""
        return float(pricing.LEDGER.times[self.runs["id"]].sum())

    @property
    def host_s(self) -> float:
        return float(self.runs["host_ns"].sum() / 1e9)

    def key_averages(self, on: DeviceProfile | None = None) -> list[OpSummary]:
        """Per operator, most emulated time first; ``on``: priced on another profile than the node's (the same
        operators and shapes: what this block would take there)."""
        runs = self.runs
        ids, calls = np.unique(runs["id"], return_counts=True)
        host_s = np.bincount(runs["id"], weights=runs["host_ns"])[ids] / 1e9
        if on is None:
            prices = [pricing.LEDGER.prices[i] for i in ids.tolist()]
        else:  # a Pricer of its own: the node's prices stay the node's
            pricer = pricing.Pricer(on)
            prices = [pricer.price(pricing.LEDGER.signatures[i]) for i in ids.tolist()]
        return summarize(prices, calls.tolist(), host_s.tolist())

    def table(self, row_limit: int = 20) -> str:
        """The per-operator table, as ``torch.profiler``'s ``key_averages().table()`` prints one."""
        from maia_serving.torch.backend import profile as device_profile

        total = self.total_s or 1.0
        head = ("Operator", "Calls", "Emulated", "Share", "FLOPs", "Bytes", "FLOP/B", "Bound", "Host")
        body = [
            (
                s.op,
                str(s.calls),
                format_seconds(s.time_s),
                f"{100 * s.time_s / total:.1f}%",
                f"{s.flops:.3g}",
                format_bytes(s.bytes),
                f"{s.intensity:.1f}",
                s.bound,
                format_seconds(s.host_s),
            )
            for s in self.key_averages()[:row_limit]
        ]
        widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
        line = "-" * (sum(widths) + 2 * (len(widths) - 1))

        def row(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        name = device_profile().name
        foot = (
            f"Emulated total on {name}: {format_seconds(self.total_s)} ({len(self.runs)} operators); "
            f"host time of the emulation: {format_seconds(self.host_s)}"
        )
        return "\n".join([line, row(head), line, *map(row, body), line, foot])

    def export_chrome_trace(self, path: str | Path) -> None:
        """The block's operators on an emulated timeline (Chrome trace event format: Perfetto and
        chrome://tracing open it), one track per chip, back to back as the chip would run them."""
        events, clocks = [], defaultdict(float)
        for op in self.ops:
            start = clocks[op.device]
            clocks[op.device] += op.time_s
            events.append(
                {
                    "name": op.op,
                    "ph": "X",
                    "pid": 0,
                    "tid": op.device,
                    "ts": start * 1e6,
                    "dur": op.time_s * 1e6,
                    "args": {"flops": op.flops, "bytes": op.bytes, "bound": op.bound, "host_us": op.host_s * 1e6},
                }
            )
        names = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": d, "args": {"name": f"maia:{d}"}} for d in clocks]
        Path(path).write_text(json.dumps({"traceEvents": names + events, "displayTimeUnit": "ns"}))

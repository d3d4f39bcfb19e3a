"""The collectives an engine step really performed, counted where the engine performs them.

A rank's communicator records each call (which collective, its bytes, the group's size) in the
process's tally; the rank that hands the step's output to the scheduler ships the tally with it,
and the scheduler prices every call on the emulated interconnect (``EmulatedDevice.charge``).
Pipeline stages relay their tally downstream with the activations they send, so the last stage's
tally holds the whole step. Engine-free: the adapters own the transport.

A tally travels as rows of five integers, ``(op, group, nbytes, count, stage)``: ``op`` indexes
``interconnect.COLLECTIVE_OPS``, ``stage`` is the sending stage of a ``send`` (which decides whether
the hop leaves a node) and 0 otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from maia_serving.emulator.cost.interconnect import COLLECTIVE_OPS

Row = tuple[int, int, int, int, int]
_CODE = {op: code for code, op in enumerate(COLLECTIVE_OPS)}


class CollectiveTally:
    """Calls since the last ``take``, grouped by (op, group, bytes, stage)."""

    def __init__(self) -> None:
        self._calls: Counter[tuple[int, int, int, int]] = Counter()

    def record(self, op: str, group: int, nbytes: int, stage: int = 0) -> None:
        self._calls[(_CODE[op], group, nbytes, stage)] += 1

    def merge(self, rows: Iterable[Iterable[int]]) -> None:
        """Add rows shipped by another rank; ValueError if one is malformed."""
        for row in rows:
            op, group, nbytes, count, stage = (int(x) for x in row)
            if not 0 <= op < len(COLLECTIVE_OPS) or group < 1 or nbytes < 0 or count < 1 or stage < 0:
                raise ValueError(f"not a collective tally row: {tuple(row)}")
            self._calls[(op, group, nbytes, stage)] += count

    def rows(self) -> list[Row]:
        return [(op, group, nbytes, count, stage) for (op, group, nbytes, stage), count in self._calls.items()]

    def take(self) -> list[Row]:
        """The rows so far, and start afresh."""
        rows = self.rows()
        self._calls.clear()
        return rows

    def clear(self) -> None:
        self._calls.clear()


def op_name(row: Row) -> str:
    return COLLECTIVE_OPS[row[0]]


class _Tensor(Protocol):
    """What tensor_bytes reads off a tensor (torch.Tensor has both)."""

    def numel(self) -> int: ...

    def element_size(self) -> int: ...


def tensor_bytes(tensor: _Tensor) -> int:
    """The bytes a tensor holds, as a collective moves them (any object with numel and element_size)."""
    return tensor.numel() * tensor.element_size()

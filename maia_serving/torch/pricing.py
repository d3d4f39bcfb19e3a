"""Every operator maia ran, priced on the profile's roofline by the emulator's cost model.

The C++ device records each operator (its name, its arguments' shapes, strides and dtypes, its results',
the host time it took); ``catch_up`` drains that log and prices each record:

- FLOPs from PyTorch's own formulas (``torch.utils.flop_counter``'s registry: mm, addmm, bmm, convolution
  and their backwards; attention from its ``sdpa_flop_count``), zero for the rest;
- bytes from the tensors read and written, a broadcast dimension (stride 0) counted once, as
  ``torch.utils._runtime_estimation`` does;
- time as the serving path prices an operator (``emulator.cost``): the larger of FLOPs over the dtype's peak
  times the profile's efficiency (a GEMM's tile padding and waves from ``gemm_utilization``; attention at
  the profile's attention efficiency) and bytes over the effective HBM bandwidth, plus one kernel launch;
- copies over the link they cross: the host link, the chips' interconnect, or the chip's own HBM.

Each chip has an emulated clock that these prices advance. Pricing is lazy (a drained batch at a time)
so that the operators themselves pay only for the record.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter

from maia_serving.emulator.cost.efficiency import gemm_utilization
from maia_serving.emulator.cost.interconnect import send_recv_s
from maia_serving.emulator.hardware import DeviceProfile

# A recorded tensor, as the extension hands it over: (sizes, strides, storage offset, c10 dtype name,
# bytes per element, chip or -1 for the host).
Meta = tuple[list[int], list[int], int, str, int, int]
Event = tuple[str, int, list[Any], list[Meta], int]

# c10's dtype names -> the emulator's formats (the peak a GEMM in that dtype runs at).
FORMATS = {
    "Float": "fp32",
    "BFloat16": "bf16",
    "Half": "fp16",
    "Float8_e4m3fn": "fp8_e4m3",
    "Float8_e5m2": "fp8_e5m2",
    "Char": "int8",
}
GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"})
ATTENTION = "_scaled_dot_product_fused_attention_overrideable"
COPY = "_copy_from"
FLUSH_EVENTS = 1 << 16  # the log's size at which the device prices what it holds without being asked


@dataclass(frozen=True)
class OpPrice:
    """One operator on one chip: what it computed and moved, and what that costs on the profile."""

    op: str
    device: int
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    link_s: float  # a copy across the host link or the interconnect
    launch_s: float
    host_s: float  # what the host's CPU kernel took (the emulation's own cost, not the chip's)

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.link_s + self.launch_s

    @property
    def bound(self) -> str:
        if self.link_s > max(self.compute_s, self.memory_s):
            return "link"
        return "compute" if self.compute_s >= self.memory_s else "memory"


def tensor_bytes(meta: Meta) -> int:
    """Bytes a kernel touches in the tensor: each element once, a broadcast (stride 0) dimension once."""
    sizes, strides, _, _, itemsize, _ = meta
    return itemsize * math.prod(s for s, st in zip(sizes, strides, strict=True) if st != 0)


def _is_meta(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 6 and isinstance(value[0], list)


@functools.cache
def schema(op: str) -> torch.FunctionSchema:
    """The schema of ``aten::name.overload``."""
    qualified, _, overload = op.partition(".")
    namespace, _, name = qualified.partition("::")
    packet = getattr(getattr(torch.ops, namespace), name)
    return getattr(packet, overload or "default")._schema


def _shape(value: Any) -> Any:
    if _is_meta(value):
        return torch.Size(value[0])
    if isinstance(value, list) and value and all(_is_meta(v) for v in value):
        return [torch.Size(v[0]) for v in value]
    return value


def _widened(query: Meta, kv: Meta) -> torch.Size:
    """A grouped-query key or value as the attention kernel reads it against ``query``'s heads."""
    b, _, s, d = kv[0]
    return torch.Size([b, query[0][1], s, d])


def flops(op: str, args: Sequence[Any], outputs: Sequence[Meta]) -> float:
    """PyTorch's FLOP count for the operator (0 where its registry has no formula)."""
    name = op.partition("::")[2].partition(".")[0]
    if name == ATTENTION:
        q, k, v = args[:3]
        return float(flop_counter.sdpa_flop_count(torch.Size(q[0]), _widened(q, k), _widened(q, v)))
    if name == ATTENTION + "_backward":
        grad, q, k, v = args[:4]
        return float(
            flop_counter.sdpa_backward_flop_count(torch.Size(grad[0]), torch.Size(q[0]), _widened(q, k), _widened(q, v))
        )
    formula = flop_counter.flop_registry.get(getattr(torch.ops.aten, name, None))
    if formula is None:
        return 0.0
    positional, keywords = [], {}
    for argument, value in zip(schema(op).arguments, args, strict=True):
        if argument.is_out:
            continue
        if argument.kwarg_only:
            keywords[argument.name] = _shape(value)
        else:
            positional.append(_shape(value))
    shapes = [torch.Size(o[0]) for o in outputs]
    return float(formula(*positional, **keywords, out_val=shapes[0] if len(shapes) == 1 else tuple(shapes)))


def _inputs(op: str, args: Sequence[Any]) -> list[Meta]:
    """The tensors an operator reads: its tensor arguments but its out= ones."""
    arguments = schema(op).arguments if op.startswith("aten::") and op != "aten::" + COPY else None
    found: list[Meta] = []
    for i, value in enumerate(args):
        if arguments is not None and i < len(arguments) and arguments[i].is_out:
            continue
        if _is_meta(value):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if _is_meta(v))
    return found


class Pricer:
    """Prices the records of one profile; a record's price depends only on its shapes, so each is kept."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        self._flops_per_s = {f: profile.effective_flops(f) for f in set(FORMATS.values())}
        attention = profile.attention_compute_efficiency or profile.compute_efficiency
        self._attention_flops_per_s = {f: profile.peak_flops(f) * attention for f in set(FORMATS.values())}
        self._bytes_per_s = profile.effective_bandwidth_bytes_per_s

    def price(self, event: Event) -> OpPrice:
        op, device, args, outputs, host_ns = event
        return _price(self, op, device, _frozen(args), _frozen(outputs), host_ns / 1e9)

    def _compute(self, op: str, args: list[Any], outputs: list[Meta], device: int) -> OpPrice:
        name = op.partition("::")[2].partition(".")[0]
        if name == COPY:
            return self._copy(op, args, device)
        reads = _inputs(op, args)
        nbytes = float(sum(tensor_bytes(m) for m in reads) + sum(tensor_bytes(m) for m in outputs))
        count = flops(op, args, outputs)
        fmt = next((FORMATS[m[3]] for m in reads if m[3] in FORMATS), "bf16")
        rate = (self._attention_flops_per_s if name.startswith(ATTENTION) else self._flops_per_s)[fmt]
        compute_s = count / rate
        if name in GEMMS and self.profile.gemm and outputs:
            *batch, rows, cols = outputs[0][0]
            tiling = self.profile.gemm
            groups = math.prod(batch)
            compute_s /= gemm_utilization(rows * groups, cols, groups, tiling.tile_m, tiling.tile_n, tiling.units)
        return OpPrice(
            op, device, count, nbytes, compute_s, nbytes / self._bytes_per_s, 0.0, self.profile.kernel_launch_s, 0.0
        )

    def _copy(self, op: str, args: list[Any], device: int) -> OpPrice:
        src, dst = args[0], args[1]
        nbytes = float(tensor_bytes(dst))
        if src[5] >= 0 and dst[5] >= 0 and src[5] == dst[5]:  # on one chip: read and write its HBM
            return OpPrice(
                op, device, 0.0, 2 * nbytes, 0.0, 2 * nbytes / self._bytes_per_s, 0.0, self.profile.kernel_launch_s, 0.0
            )
        if src[5] >= 0 and dst[5] >= 0:  # chip to chip
            link_s = send_recv_s(self.profile.network, nbytes)
        else:
            link = self.profile.host_link
            link_s = link.latency_s + nbytes / link.bandwidth_bytes_per_s
        return OpPrice(op, device, 0.0, nbytes, 0.0, 0.0, link_s, 0.0, 0.0)


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 6 and isinstance(value[3], str):  # a Meta
        return (list(value[0]), list(value[1]), *value[2:])
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@functools.lru_cache(maxsize=1 << 14)
def _priced(pricer: Pricer, op: str, device: int, args: tuple[Any, ...], outputs: tuple[Any, ...]) -> OpPrice:
    return pricer._compute(op, _thawed(args), [_thawed(o) for o in outputs], device)


def _price(
    pricer: Pricer, op: str, device: int, args: tuple[Any, ...], outputs: tuple[Any, ...], host_s: float
) -> OpPrice:
    priced = _priced(pricer, op, device, args, outputs)
    return OpPrice(**{**priced.__dict__, "host_s": host_s})


class Ledger:
    """The emulated clocks of the node's chips, and whoever listens to each priced operator (profilers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clocks: list[float] = []
        self.listeners: list[Callable[[OpPrice], None]] = []
        self.pricer: Pricer | None = None

    def reset(self, profile: DeviceProfile, chips: int) -> None:
        with self._lock:
            self.pricer = Pricer(profile)
            self.clocks = [0.0] * chips

    def add(self, events: list[Event]) -> None:
        with self._lock:
            if self.pricer is None:
                return
            for event in events:
                price = self.pricer.price(event)
                self.clocks[price.device] += price.time_s
                for listen in self.listeners:
                    listen(price)


LEDGER = Ledger()


def catch_up() -> None:
    """Price everything the device ran since the last call."""
    from maia_serving.torch import extension

    LEDGER.add(extension.load_built().drain())


def clock_s(device: int | None = None) -> float:
    """Emulated seconds chip ``device`` (None: the current one) has been busy since the process began."""
    from maia_serving.torch import device as maia

    catch_up()
    return LEDGER.clocks[maia.current_device() if device is None else device]

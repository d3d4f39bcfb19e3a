"""Every operator maia ran, priced on the profile's roofline by the emulator's cost model.

The C++ device records each operator (its name, its arguments' shapes, strides and dtypes, its results',
the host time it took); ``catch_up`` drains that log and prices each record:

- FLOPs from PyTorch's own formulas (``torch.utils.flop_counter``'s registry: mm, addmm, bmm, convolution
  and their backwards; attention from its ``sdpa_flop_count``, times the pairs a causal mask keeps), zero
  for the rest;
- bytes from the tensors read and written, a broadcast dimension (stride 0) counted once, as
  ``torch.utils._runtime_estimation`` does;
- time as the serving path prices an operator (``emulator.cost``): the larger of FLOPs over the dtype's peak
  times the profile's efficiency (a GEMM's tile padding and waves from ``gemm_utilization``; attention at
  the profile's attention efficiency) and bytes over the effective HBM bandwidth, plus one kernel launch;
- copies over the link they cross: the host link, the chips' interconnect, or the chip's own HBM.

Each chip has an emulated clock that these prices advance. Pricing is lazy and once per signature (the
extension logs runs of signatures it keeps once), so that the operators pay only for the record.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import flop_counter

from maia_serving.emulator.cost.efficiency import gemm_utilization
from maia_serving.emulator.cost.interconnect import send_recv_s
from maia_serving.emulator.cost.model import roofline
from maia_serving.emulator.hardware import DeviceProfile

# A recorded tensor, as the extension hands it over: (sizes, strides, storage offset, c10 dtype name,
# bytes per element, chip or -1 for the host); None for an undefined one.
Meta = tuple[tuple[int, ...], tuple[int, ...], int, str, int, int]
# An operator's signature: its name, its arguments (Metas, tuples of Metas, scalars, int tuples) and results.
Signature = tuple[str, tuple[Any, ...], tuple[Meta | None, ...]]
# One run of a signature, as the extension logs it: its id, the chip, the host nanoseconds it took.
RUN = np.dtype([("id", "<u4"), ("device", "<i4"), ("host_ns", "<i8")])

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
    """One operator signature: what it computes and moves, and what that costs on the profile."""

    op: str
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    link_s: float  # a copy across the host link or the interconnect
    launch_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.link_s + self.launch_s

    @property
    def bound(self) -> str:
        return bound(self.compute_s, self.memory_s, self.link_s, self.launch_s)


def bound(compute_s: float, memory_s: float, link_s: float, launch_s: float = 0.0) -> str:
    """What limits an operator (or a sum of them): the link it crosses, its kernel launches (an operator too small
    for its compute or memory traffic to outweigh the launch), its compute, or its memory traffic."""
    if link_s > max(compute_s, memory_s, launch_s):
        return "link"
    if launch_s > max(compute_s, memory_s):
        return "launch"
    return "compute" if compute_s >= memory_s else "memory"


def tensor_bytes(meta: Meta) -> int:
    """Bytes a kernel touches in the tensor: each element once, a broadcast (stride 0) dimension once."""
    sizes, strides, _, _, itemsize, _ = meta
    return itemsize * math.prod(s for s, st in zip(sizes, strides, strict=True) if st != 0)


def _is_meta(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 6 and isinstance(value[3], str)


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
    if isinstance(value, tuple) and value and all(_is_meta(v) for v in value):
        return [torch.Size(v[0]) for v in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _widened(query: Meta, kv: Meta) -> torch.Size:
    """A grouped-query key or value as the attention kernel reads it against ``query``'s heads."""
    b, _, s, d = kv[0]
    return torch.Size([b, query[0][1], s, d])


def causal_share(query: Meta, key: Meta) -> float:
    """Share of the query-key pairs a causal mask keeps, the queries being the last of the keys (as in a
    prefill or a decode): the fused kernel skips the masked tiles, as the serving cost model counts pairs."""
    s_q, s_k = query[0][2], key[0][2]
    kept = s_q * s_k - s_q * (s_q - 1) // 2 if s_q <= s_k else s_k * (s_k + 1) // 2
    return kept / (s_q * s_k) if s_q and s_k else 1.0


def flops(op: str, args: Sequence[Any], outputs: Sequence[Meta | None]) -> float:
    """PyTorch's FLOP count for the operator (0 where its registry has no formula); attention's scaled by the
    pairs a causal mask keeps."""
    name = op.partition("::")[2].partition(".")[0]
    if name == ATTENTION:
        q, k, v, _, _, is_causal = args[:6]
        full = flop_counter.sdpa_flop_count(torch.Size(q[0]), _widened(q, k), _widened(q, v))
        return float(full) * (causal_share(q, k) if is_causal else 1.0)
    if name == ATTENTION + "_backward":
        grad, q, k, v, _, _, is_causal = args[:7]
        full = flop_counter.sdpa_backward_flop_count(
            torch.Size(grad[0]), torch.Size(q[0]), _widened(q, k), _widened(q, v)
        )
        return float(full) * (causal_share(q, k) if is_causal else 1.0)
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
    shapes = [None if o is None else torch.Size(o[0]) for o in outputs]  # positions kept: out_shape[1] is a grad
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
        elif isinstance(value, tuple):
            found.extend(v for v in value if _is_meta(v))
    return found


class Pricer:
    """Prices signatures on one profile."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        self._attention_efficiency = profile.attention_compute_efficiency or profile.compute_efficiency
        self._unpriced: set[str] = set()

    def price(self, signature: Signature) -> OpPrice:
        op, args, results = signature
        outputs = [o for o in results if o is not None]
        name = op.partition("::")[2].partition(".")[0]
        if name == COPY:
            return self._copy(op, args)
        reads = _inputs(op, args)
        nbytes = float(sum(tensor_bytes(m) for m in reads) + sum(tensor_bytes(m) for m in outputs))
        count = self._flops(op, args, results)
        fmt = next((FORMATS[m[3]] for m in reads if m[3] in FORMATS), "bf16")
        cost = roofline(self.profile, op, count, nbytes, fmt)  # the serving path's own
        compute_s = cost.compute_s
        if name.startswith(ATTENTION):  # at the attention kernels' share of peak, as CostModel prices attention
            compute_s = count / (self.profile.peak_flops(fmt) * self._attention_efficiency)
        if name in GEMMS and self.profile.gemm and outputs:
            *batch, rows, cols = outputs[0][0]
            tiling = self.profile.gemm
            groups = math.prod(batch)
            compute_s /= gemm_utilization(rows * groups, cols, groups, tiling.tile_m, tiling.tile_n, tiling.units)
        return OpPrice(op, count, nbytes, compute_s, cost.memory_s, 0.0, self.profile.kernel_launch_s)

    def _flops(self, op: str, args: tuple[Any, ...], results: tuple[Meta | None, ...]) -> float:
        """The FLOP count, or 0 with one warning per operator where PyTorch's formula cannot read the arguments:
        a model must not fail because its price could not be worked out."""
        try:
            return flops(op, args, results)
        except Exception as exc:  # any formula's failure
            if op not in self._unpriced:
                self._unpriced.add(op)
                warnings.warn(
                    f"maia-serving: {op} is priced on its bytes alone ({type(exc).__name__}: {exc})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return 0.0

    def _copy(self, op: str, args: tuple[Any, ...]) -> OpPrice:
        (src_chip, dst_chip), nbytes = (args[0][5], args[1][5]), float(tensor_bytes(args[1]))
        if src_chip == dst_chip >= 0:  # on one chip: read and write its HBM
            memory_s = roofline(self.profile, op, 0.0, 2 * nbytes).memory_s
            return OpPrice(op, 0.0, 2 * nbytes, 0.0, memory_s, 0.0, self.profile.kernel_launch_s)
        if src_chip >= 0 and dst_chip >= 0:  # chip to chip
            link_s = send_recv_s(self.profile.network, nbytes)
        else:
            link = self.profile.host_link
            link_s = link.latency_s + nbytes / link.bandwidth_bytes_per_s
        return OpPrice(op, 0.0, nbytes, 0.0, 0.0, link_s, 0.0)


class Ledger:
    """Every signature the device has run (by the extension's ids), its price on the current profile, the
    emulated clocks of the node's chips, and whoever listens to the runs (profilers)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.signatures: list[Signature] = []
        self.prices: list[OpPrice] = []
        self.times = np.zeros(0)  # each signature's emulated seconds, by id
        self.clocks = np.zeros(0)
        self.listeners: list[Callable[[np.ndarray], None]] = []
        self.pricer: Pricer | None = None

    def reset(self, profile: DeviceProfile, chips: int) -> None:
        """A new profile: its chips' clocks from zero, every known signature priced again."""
        with self._lock:
            self.pricer = Pricer(profile)
            self.prices = [self.pricer.price(s) for s in self.signatures]
            self.times = np.array([p.time_s for p in self.prices], dtype=float)
            self.clocks = np.zeros(chips)

    def add(self, signatures: list[Signature], runs: bytes) -> None:
        with self._lock:
            self.signatures.extend(signatures)
            if self.pricer is None:
                return
            fresh = [self.pricer.price(s) for s in signatures]
            self.prices.extend(fresh)
            self.times = np.concatenate([self.times, [p.time_s for p in fresh]])
            records = np.frombuffer(runs, dtype=RUN)
            np.add.at(self.clocks, records["device"], self.times[records["id"]])
            for listen in self.listeners:
                listen(records)


LEDGER = Ledger()


def catch_up() -> None:
    """Price everything the device ran since the last call."""
    from maia_serving.torch import extension

    LEDGER.add(*extension.load_built().drain())


def clock_s(device: int | None = None) -> float:
    """Emulated seconds chip ``device`` (None: the current one) has been busy since its profile was set."""
    from maia_serving.torch import device as maia

    catch_up()
    return float(LEDGER.clocks[maia.current_device() if device is None else device])

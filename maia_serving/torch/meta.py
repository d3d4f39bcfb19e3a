"""``with meta_profile() as run:``: a model's operators recorded on PyTorch's meta device (shapes, no data, no
host memory) in the signatures the maia device records, so that a model too large for the host is priced as the
device would price it: Llama-3-8B's forward, Stable Diffusion's UNet at a batch that fills a Maia 200.

What the device records, this records: each kernel-running aten operator on the meta tensors (the host's own
work on CPU tensors is not the device's) with its arguments' shapes, strides and dtypes, not views (a view runs
no kernel), not allocations; ``scaled_dot_product_attention`` as the device's one fused attention operator (on
meta, PyTorch would write it out as its math fallback). Memory is counted as the
device counts it: each new storage from its creation until the last tensor on it dies, over the resident
weights and inputs.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.torch import pricing
from maia_serving.torch.pricing import Meta, Signature
from maia_serving.torch.profiler import OpSummary, summarize

# Operators that run no kernel on the device beyond the views PyTorch marks: allocations and aliases.
NO_KERNEL = frozenset({"empty", "empty_strided", "_unsafe_view", "alias", "detach", "lift_fresh", "t"})
# Operators the device runs as its copy (``_copy_from``: read one tensor, write another).
COPIES = frozenset({"_to_copy", "copy_", "clone"})


@functools.cache
def _c10_name(dtype: torch.dtype) -> str:
    """c10's name of ``dtype`` (``Float``, ``BFloat16``), as the device's records carry it."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def meta_of(t: torch.Tensor) -> Meta:
    """A tensor as the device records one: on chip 0, or on the host (-1) for a CPU tensor (a copy from it
    crosses the host link)."""
    chip = -1 if t.device.type == "cpu" else 0
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset(), _c10_name(t.dtype), t.element_size(), chip)


def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return meta_of(v)
    if isinstance(v, (list, tuple)):
        return tuple(_value(x) for x in v)
    return v


class LiveBytes:
    """Bytes of the storages the run made that some tensor still holds, and their peak, over ``resident``."""

    def __init__(self, resident: int) -> None:
        self.current = resident
        self.peak = resident
        self._held: dict[int, list[int]] = {}  # storage -> [bytes, tensors holding it]

    def track(self, tensors: list[torch.Tensor], inputs: set[int]) -> None:
        """Outputs of one operator: a storage no input shares is new (a view's or an in-place result's is not;
        one of a resident tensor is not counted again)."""
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key not in self._held:
                if key in inputs:
                    continue  # a view of, or a write into, a resident tensor
                self._held[key] = [t.untyped_storage().nbytes(), 0]
                self.current += self._held[key][0]
                self.peak = max(self.peak, self.current)
            self._held[key][1] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._held[key]


class _Recorder(TorchDispatchMode):
    def __init__(self, run: meta_profile) -> None:
        super().__init__()
        self.run = run

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.partition(".")[0]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if not outputs:
            return out  # the host's work (an ONNX graph's shape arithmetic): not the device's
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.run.memory.track(outputs, inputs)
        if name in COPIES:  # the device records a copy by its source and destination
            source = args[1] if name == "copy_" else args[0]
            self.run.signatures.append((f"aten::{pricing.COPY}", (meta_of(source), meta_of(outputs[0])), ()))
        elif not (func.is_view or name in NO_KERNEL):
            self.run.signatures.append(_signature(func, args, kwargs, outputs))
        return out


def _signature(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], outputs: list[torch.Tensor]) -> Signature:
    """The call as the device records it: every schema argument in order (defaults filled in)."""
    values = []
    for i, argument in enumerate(func._schema.arguments):
        if i < len(args) and not argument.kwarg_only:
            value = args[i]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            value = argument.default_value if argument.has_default_value() else None
        values.append(_value(value))
    return (f"aten::{func.__name__}", tuple(values), tuple(meta_of(t) for t in outputs))


class _FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the device runs it: its fused operator."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        out = torch.ops.aten._scaled_dot_product_fused_attention_overrideable(
            q, k, v, mask, dropout, causal, scale=kwargs.get("scale")
        )[0]
        return out


class meta_profile:  # noqa: N801 (used as maia_serving.torch.profile is)
    """Records the block's operators on meta tensors; ``resident``: the bytes already held (weights, inputs)."""

    def __init__(self, resident: int = 0) -> None:
        self.signatures: list[Signature] = []
        self.memory = LiveBytes(resident)
        self._modes = (_FusedAttention(), _Recorder(self))

    def __enter__(self) -> meta_profile:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(kind, exc, tb)

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak

    def key_averages(self, on: DeviceProfile) -> list[OpSummary]:
        """Per operator, most emulated time first, priced on ``on``."""
        pricer = pricing.Pricer(on)
        counts = Counter(self.signatures)  # records are tuples all through (_value): hashable as they are
        prices = [pricer.price(s) for s in counts]
        return summarize(prices, list(counts.values()), [0.0] * len(counts))

"""``torch.maia``: the device module, named and shaped as ``torch.cuda``'s functions that a model or a
training loop calls (device count and name, the current chip, seeds, synchronize, memory statistics).

Memory figures come from the C++ allocator (the statistics CUDA's caching allocator keeps, under the same
keys), read directly: on a CPU build of torch ``torch.accelerator`` answers for maia too, on a CUDA build
for CUDA. There is no cache, so reserved equals allocated and ``empty_cache()`` has nothing to give back.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from maia_serving.formats.units import format_bytes

_Device = torch.device | str | int | None


class InductorUnsupportedError(Exception):
    """Not a RuntimeError: Inductor swallows those when it looks for a device's code generators."""


INDUCTOR_HOOKS = ("Scheduling", "PythonWrapperCodegen", "CppWrapperCodegen", "WrapperFxCodegen")


def __getattr__(name: str) -> Any:
    """Inductor asks the device module for its code generators (``torch.maia.Scheduling`` ...): maia has none."""
    if name in INDUCTOR_HOOKS:
        raise InductorUnsupportedError(
            "torch.compile's default backend (Inductor) generates kernels for the devices it knows, and maia is not "
            "one. Compile with torch.compile(model, backend='maia'): the captured graph runs operator by operator on "
            "maia, each priced as in eager mode."
        )
    raise AttributeError(f"module 'torch.maia' has no attribute {name!r}")


def _ext() -> Any:
    from maia_serving.torch import extension

    return extension.load_built()


def _index(device: _Device = None) -> int:
    """The chip a torch.cuda-style ``device`` argument names (None: the current one)."""
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "maia":
        raise ValueError(f"expected a maia device, got {d}")
    return current_device() if d.index is None else d.index


def is_available() -> bool:
    return device_count() > 0


def is_initialized() -> bool:
    return bool(_ext().configured())


def _is_in_bad_fork() -> bool:
    """torch.random.fork_rng asks a device module this; a forked child's maia is its parent's host memory."""
    return False


def device_count() -> int:
    return int(_ext().device_count())


def current_device() -> int:
    return int(_ext().current_device())


def set_device(device: _Device) -> None:
    _ext().set_device(_index(device))


def get_device_name(device: _Device = None) -> str:
    from maia_serving.torch.backend import chip_name, profile

    _index(device)
    return chip_name(profile())


def get_device_properties(device: _Device = None) -> Any:
    """The profile the chip is emulated from (name, HBM, bandwidth, peaks, links)."""
    from maia_serving.torch.backend import profile

    _index(device)
    return profile()


@contextlib.contextmanager
def device(which: _Device) -> Iterator[None]:
    """``with torch.maia.device(1):`` makes maia:1 the current chip inside the block."""
    before = current_device()
    set_device(which)
    try:
        yield
    finally:
        set_device(before)


def synchronize(device: _Device = None) -> None:
    """Every maia operator has finished when it returns (the host ran it); this prices what ran since the
    last call on the emulated clocks (``maia_serving.torch.pricing``)."""
    from maia_serving.torch import pricing

    _index(device)
    pricing.catch_up()


# Seeds: random operators run on the host's CPU kernels with the CPU generator, so the CPU's seed is
# the one that decides; a maia generator exists for APIs that ask for one.
def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def seed() -> None:
    torch.default_generator.seed()


def seed_all() -> None:
    torch.default_generator.seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


def get_rng_state(device: _Device = "maia") -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(new_state: torch.Tensor, device: _Device = "maia") -> None:
    torch.set_rng_state(new_state)


def memory_stats(device: _Device = None) -> OrderedDict[str, Any]:
    """The chip's allocator statistics under ``torch.cuda.memory_stats``' keys (the ``all`` pool)."""
    return OrderedDict(sorted(_ext().memory_stats(_index(device)).items()))


def memory_allocated(device: _Device = None) -> int:
    return int(memory_stats(device)["allocated_bytes.all.current"])


def max_memory_allocated(device: _Device = None) -> int:
    return int(memory_stats(device)["allocated_bytes.all.peak"])


def memory_reserved(device: _Device = None) -> int:
    return int(memory_stats(device)["reserved_bytes.all.current"])


def max_memory_reserved(device: _Device = None) -> int:
    return int(memory_stats(device)["reserved_bytes.all.peak"])


def reset_peak_memory_stats(device: _Device = None) -> None:
    _ext().reset_peak(_index(device))


def reset_accumulated_memory_stats(device: _Device = None) -> None:
    _ext().reset_accumulated(_index(device))


def empty_cache() -> None:
    """Nothing is cached: freed memory goes back at once."""


def mem_get_info(device: _Device = None) -> tuple[int, int]:
    """(free, total) bytes of the chip's HBM, as ``torch.cuda.mem_get_info``."""
    free, total = _ext().memory_info(_index(device))
    return int(free), int(total)


def memory_summary(device: _Device = None, abbreviated: bool = False) -> str:
    """The chip's memory in a few lines: what is allocated now, the peak, the capacity, allocations, OOMs."""
    index = _index(device)
    stats = memory_stats(index)
    free, total = mem_get_info(index)
    rows = [
        ("Allocated now", format_bytes(stats.get("allocated_bytes.all.current", 0))),
        ("Allocated peak", format_bytes(stats.get("allocated_bytes.all.peak", 0))),
        ("Free", format_bytes(free)),
        ("Capacity (HBM)", format_bytes(total)),
        ("Tensors now", str(stats.get("allocation.all.current", 0))),
        ("Allocations so far", str(stats.get("allocation.all.allocated", 0))),
        ("Out-of-memory errors", str(stats.get("num_ooms", 0))),
    ]
    title = f"maia:{index} ({get_device_name(index)}) memory summary"
    width = max(len(title), *(len(k) + len(v) + 3 for k, v in rows))
    lines = ["=" * width, title, "-" * width, *(f"{k}:{v:>{width - len(k) - 1}}" for k, v in rows), "=" * width]
    return "\n".join(lines)

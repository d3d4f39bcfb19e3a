"""Every environment variable maia-serving reads: one table, parsed and checked by name.

Each setting has a default, a parser that says what is allowed, and one line of why.
Adapters call ``check_all()`` while the engine builds its configuration (in the
process the user started, before any engine process), so a bad value stops the
server at once with the variable, the value and what is allowed. Values are read
lazily, when asked for, because child processes inherit them from the parent.

Imports nothing heavy: the engines import this module in every process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast


class SettingError(ValueError):
    """A setting's value is not allowed; the message names the variable and the choices."""


T = TypeVar("T")


class Name(str, Generic[T]):
    """A setting's environment variable: the name itself (a ``str``, for ``os.environ`` and messages) that also
    carries the type its parser returns, so ``get(MAIA_SERVING_PACE)`` is a ``bool`` to a type checker."""

    __slots__ = ()


@dataclass(frozen=True)
class Setting(Generic[T]):
    name: Name[T]
    default: str
    parse: Callable[[str], T]  # raises ValueError with what is wrong
    allowed: str  # what a user may set, in words
    why: str
    engines: str = "both"  # "vllm", "sglang", "both", or "tools" (CLI, tests, benchmarks)
    user_facing: bool = True  # listed in the README's settings table

    def read(self, environ: dict[str, str] | None = None) -> T:
        raw = (os.environ if environ is None else environ).get(self.name, "")
        value = raw.strip() or self.default
        try:
            return self.parse(value)
        except ValueError as exc:
            raise SettingError(
                f"{self.name}={raw!r} is not valid ({exc}); allowed: {self.allowed}. {self.name}: {self.why}"
            ) from None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"not one of {', '.join(repr(c) for c in choices if c)}")
        return value

    return parse


def _flag(value: str) -> bool:
    """0 or 1, as a bool."""
    return _choice("0", "1")(value) == "1"


def _number(low: float, high: float, low_open: bool = True) -> Callable[[str], float]:
    """A finite float in (low, high] (or [low, high] when ``low_open`` is False)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
            raise ValueError("out of range")
        return number

    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError("not an integer") from None
        if not low <= number <= high:
            raise ValueError("out of range")
        return number

    return parse


def _stats_addr(value: str) -> str:
    """Only a Unix socket in a private folder: nothing else may reach the metrics channel."""
    if not value:
        return ""
    if not value.startswith("ipc://"):
        raise ValueError("not an ipc:// address")
    folder = os.path.dirname(value.removeprefix("ipc://"))
    try:
        st = os.stat(folder)
    except OSError:
        raise ValueError(f"folder {folder} does not exist") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"folder {folder} is not private to this user (mode 0700)")
    return value


def _block_scaled_kv(value: str) -> str:
    """A block-scaled KV format of the dtype vocabulary, or "" (imported only when one is set)."""
    if not value:
        return ""
    from maia_serving.formats.precision import BLOCK_SCALED_KV_FORMATS

    return _choice(*BLOCK_SCALED_KV_FORMATS)(value)


def _text(value: str) -> str:
    return value


MAIA_SERVING_DEVICE: Name[str] = Name("MAIA_SERVING_DEVICE")
MAIA_SERVING_PROFILE: Name[str] = Name("MAIA_SERVING_PROFILE")
MAIA_SERVING_MODEL: Name[str] = Name("MAIA_SERVING_MODEL")
MAIA_SERVING_EXPERT_LOAD: Name[str] = Name("MAIA_SERVING_EXPERT_LOAD")
MAIA_SERVING_LOG_INTERVAL_S: Name[float] = Name("MAIA_SERVING_LOG_INTERVAL_S")
MAIA_SERVING_PACE: Name[bool] = Name("MAIA_SERVING_PACE")
MAIA_SERVING_ATTENTION: Name[str] = Name("MAIA_SERVING_ATTENTION")
MAIA_SERVING_KV_SCALES: Name[str] = Name("MAIA_SERVING_KV_SCALES")
MAIA_SERVING_KV_CACHE_DTYPE: Name[str] = Name("MAIA_SERVING_KV_CACHE_DTYPE")
MAIA_SERVING_KERNELS: Name[str] = Name("MAIA_SERVING_KERNELS")
MAIA_SERVING_HOST_KERNEL: Name[str] = Name("MAIA_SERVING_HOST_KERNEL")
MAIA_SERVING_HOST_KV_GIB: Name[float] = Name("MAIA_SERVING_HOST_KV_GIB")
MAIA_SERVING_TORCH_DEVICE: Name[str] = Name("MAIA_SERVING_TORCH_DEVICE")
VLLM_CPU_KVCACHE_SPACE: Name[int] = Name("VLLM_CPU_KVCACHE_SPACE")
MAIA_SERVING_STATS_ADDR: Name[str] = Name("MAIA_SERVING_STATS_ADDR")
MAIA_SERVING_CACHE_DIR: Name[str] = Name("MAIA_SERVING_CACHE_DIR")
MAIA_SERVING_SGLANG_PYTHON: Name[str] = Name("MAIA_SERVING_SGLANG_PYTHON")

DEFAULT_PROFILE = "maia200"
# A host KV cache larger than this many GiB is a typo, not a machine.
_MAX_HOST_KV_GIB = 1 << 20

SETTINGS: dict[str, Setting[Any]] = {
    s.name: s
    for s in (
        Setting(
            MAIA_SERVING_DEVICE,
            "",
            _choice("", "maia"),
            "maia, or unset",
            "activates the maia platform where no --device flag can be given (offline LLM(...), "
            "sglang.Engine); `--device maia` sets it for the engine's child processes",
        ),
        Setting(
            MAIA_SERVING_PROFILE,
            DEFAULT_PROFILE,
            _text,
            "a name from `maia-serving profiles`",
            "the emulated device when the engine's own configuration names none",
        ),
        Setting(
            MAIA_SERVING_MODEL,
            "",
            _text,
            "a built-in shape (`maia-serving fit --help` lists them), a config.json path or a model folder; or unset",
            "a proxy shape when the engine's own configuration names none: "
            "every step is priced and the emulated KV cache sized as this model, while the served (small) model "
            "runs on the host; unset: the served model itself",
        ),
        Setting(
            MAIA_SERVING_EXPERT_LOAD,
            "",
            _text,
            "a JSON file of per-expert token counts (`maia-serving "
            "route-stats` writes one; `simulate --expert-load` reads the same); or unset",
            "the measured routing a MoE priced model is charged with when the engine's own configuration names "
            "none (vLLM: `--additional-config maia_expert_load`); unset: uniform routing",
        ),
        Setting(
            MAIA_SERVING_LOG_INTERVAL_S,
            "10",
            _number(0, 86400, low_open=False),
            "seconds, 0 (every step) to 86400",
            "how often the engine logs its `Maia emulation [profile]` line",
        ),
        Setting(
            MAIA_SERVING_PACE,
            "0",
            _flag,
            "0 or 1",
            "1: each busy step lasts at least its emulated time on the host's clock (the engine waits out the "
            "difference), so a device slower than the host serves clients at the device's speed and arrivals "
            "map one to one onto the emulated timeline; 0: the host runs as fast as it can",
        ),
        Setting(
            MAIA_SERVING_ATTENTION,
            "maia",
            _choice("maia", "vllm-cpu"),
            "maia or vllm-cpu",
            "the host attention under vLLM: ours (BF16/FP8 KV, maia numerics) or vLLM's C++ CPU kernel "
            "(BF16 only, emulated figures only)",
            engines="vllm",
        ),
        Setting(
            MAIA_SERVING_KV_SCALES,
            "per_tensor",
            _choice("per_tensor", "per_head"),
            "per_tensor or per_head",
            "FP8 KV scales: the checkpoint's per-tensor ones, or the per-head sidecar of `calibrate-kv`",
        ),
        Setting(
            MAIA_SERVING_KV_CACHE_DTYPE,
            "",
            _block_scaled_kv,
            "mxfp8, mxfp6, mxfp6_e2m3, mxfp4 or nvfp4; or unset",
            "a block-scaled KV cache (OCP MX or NVFP4), which the engines' own configurations cannot hold: "
            "vLLM's --kv-cache-dtype on --device maia and SGLang's --kv-cache-dtype mxfp8/nvfp4 set it; "
            "offline LLM(...) and sglang.Engine read it (the engine's own kv cache dtype stays auto)",
        ),
        Setting(
            MAIA_SERVING_KERNELS,
            "auto",
            _choice("auto", "triton", "torch"),
            "auto, triton or torch",
            "KV ops: Triton kernels where a Triton device is, the torch path on a host (auto)",
        ),
        Setting(
            MAIA_SERVING_HOST_KERNEL,
            "auto",
            _choice("auto", "native", "torch"),
            "auto, native or torch",
            "the host attention: one C++ call per layer that decodes the KV cache while reading it (native; "
            "`make setup` builds it), the chain of torch ops (torch), or native where it builds (auto)",
        ),
        Setting(
            MAIA_SERVING_TORCH_DEVICE,
            "auto",
            _choice("auto", "on", "off"),
            "auto, on or off",
            "torch.device('maia') at `import torch` (PyTorch's device autoload): on, off, or on except in a process "
            "that runs vLLM or SGLang (auto), whose code takes any PyTorch accelerator for a GPU; the serving path has "
            "its own maia platform. `import maia_serving.torch` loads it whatever this says",
            engines="tools",
        ),
        Setting(
            MAIA_SERVING_HOST_KV_GIB,
            "1",
            _number(0, _MAX_HOST_KV_GIB),
            "GiB, > 0",
            "the most host memory SGLang's KV pool may take of what the emulated HBM would hold",
            engines="sglang",
        ),
        Setting(
            VLLM_CPU_KVCACHE_SPACE,
            "1",
            _integer(1, _MAX_HOST_KV_GIB),
            "whole GiB, >= 1 (vLLM reads an integer)",
            "vLLM's own CPU KV-cache knob; on maia, the most host memory the KV cache may take of "
            "what the emulated HBM would hold",
            engines="vllm",
        ),
        Setting(
            MAIA_SERVING_STATS_ADDR,
            "",
            _stats_addr,
            "ipc:// in a folder private to this user",
            "the engine-to-API-server metrics channel of vLLM; set by the platform, not by users",
            engines="vllm",
            user_facing=False,
        ),
        Setting(
            MAIA_SERVING_CACHE_DIR,
            "",
            _text,
            "a folder",
            "where `calibrate-host` keeps the measured host profile (default ~/.cache/maia-serving)",
            engines="tools",
        ),
        Setting(
            MAIA_SERVING_SGLANG_PYTHON,
            "",
            _text,
            "a Python with sglang and maia-serving",
            "the SGLang environment the tests, demo and benchmarks start servers from "
            "(default .venv-sglang/bin/python)",
            engines="tools",
        ),
    )
}


def get(name: Name[T]) -> T:
    """The parsed value of setting ``name``, of the type its parser returns; SettingError if it is not allowed."""
    return cast(T, SETTINGS[name].read())


def check_all(engine: str | None = None) -> None:
    """Parse every setting the engine reads (all when ``engine`` is None); one error naming
    each bad variable."""
    errors = []
    for setting in SETTINGS.values():
        if engine is not None and setting.engines not in ("both", engine):
            continue
        try:
            setting.read()
        except SettingError as exc:
            errors.append(str(exc))
    if errors:
        raise SettingError("\n".join(errors))


def user_facing() -> Iterable[Setting[Any]]:
    return (s for s in SETTINGS.values() if s.user_facing)


def markdown_table() -> str:
    """The README's settings table, generated from this one (a test keeps them equal)."""
    rows = ["| variable | default | allowed | engines | why |", "|---|---|---|---|---|"]
    for s in user_facing():
        rows.append(
            f"| `{s.name}` | {f'`{s.default}`' if s.default else 'unset'} | {s.allowed} | {s.engines} | {s.why} |"
        )
    return "\n".join(rows)


def device_requested() -> bool:
    return os.environ.get(MAIA_SERVING_DEVICE, "").strip().lower() == "maia"


def device_flag(argv: list[str]) -> str | None:
    """The value of ``--device`` on a command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def profile_name(configured: str | None = None) -> str:
    return str(configured or get(MAIA_SERVING_PROFILE))


def priced_model(configured: str | None = None) -> str | None:
    """The shape to price instead of the served model (the engine's setting, else MAIA_SERVING_MODEL), or None."""
    return str(configured or get(MAIA_SERVING_MODEL)) or None


def expert_load(configured: str | None = None) -> str | None:
    """The routing file to price the MoE layers with (the engine's setting, else MAIA_SERVING_EXPERT_LOAD), or None."""
    return str(configured or get(MAIA_SERVING_EXPERT_LOAD)) or None


def gib_bytes(name: Name[float] | Name[int]) -> int:
    """A GiB setting, as bytes."""
    gib: float = SETTINGS[name].read()
    return int(gib * 2**30)

"""Device profiles: the emulated hardware as frozen dataclasses in SI units.

Profiles are data files (``profiles/*.yaml``); every figure carries its unit and
its source, and figures that are ours rather than published say ``estimate: true``.
The loader converts units once, so the cost model only ever sees bytes, seconds
and FLOP/s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from maia_serving import envs
from maia_serving.formats import precision

# Multipliers into SI base units (bytes, bytes/s, FLOP/s, seconds).
_UNITS: dict[str, float] = {
    "B": 1.0,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KiB": 2.0**10,
    "MiB": 2.0**20,
    "GiB": 2.0**30,
    "B/s": 1.0,
    "GB/s": 1e9,
    "TB/s": 1e12,
    "FLOP/s": 1.0,
    "GFLOP/s": 1e9,
    "TFLOP/s": 1e12,
    "PFLOP/s": 1e15,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "ns": 1e-9,
    "ratio": 1.0,
    "count": 1.0,
    "flag": 1.0,
}

# How a tier's chips are wired (interconnect.py prices each): every pair directly linked, all through one
# switch (NVSwitch, an Ethernet or InfiniBand fabric), or through the host's PCIe switch.
TOPOLOGIES = ("full_mesh", "switch", "pcie")
VARIANT_SEPARATOR = "@"


class UnknownProfileError(ValueError):
    """Raised for a profile name that has no data file."""


@dataclass(frozen=True)
class LinkProfile:
    """One tier of a chip's network: how its ``chips`` are wired, a chip's per-direction injection bandwidth
    into the tier and the latency of one hop (software included)."""

    topology: str
    chips: int
    bandwidth_bytes_per_s: float  # per direction, per chip
    latency_s: float
    # full_mesh: the direct links between one pair of chips, per direction (a chip's injection bandwidth is
    # this times its peers, unless some of its ports go elsewhere).
    pair_bandwidth_bytes_per_s: float | None = None
    in_network_reduction: bool = False  # the switch reduces (NVLink SHARP, NCCL's NVLS algorithm)
    # Fixed cost of one collective (its kernel's launch and synchronization, NCCL's baseLat), on top of
    # latency_s per step (NCCL's hwLat); 0 where latency_s already includes the software.
    collective_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; known: {', '.join(TOPOLOGIES)}")
        if self.bandwidth_bytes_per_s <= 0 or min(self.latency_s, self.collective_latency_s) < 0 or self.chips < 1:
            raise ValueError(f"link figures must be positive, got {self}")
        if (self.topology == "full_mesh") != (self.pair_bandwidth_bytes_per_s is not None):
            raise ValueError(f"a full_mesh tier, and only one, gives its pair bandwidth, got {self}")
        if self.in_network_reduction and self.topology != "switch":
            raise ValueError(f"only a switch reduces in the network, got {self}")


@dataclass(frozen=True)
class Network:
    """A chip's tiers: ``scale_up`` connects the chips of one node; ``scale_out`` (None: the profile names
    none) connects nodes, each chip through its own NICs."""

    scale_up: LinkProfile
    scale_out: LinkProfile | None = None

    @property
    def node_chips(self) -> int:
        return self.scale_up.chips


@dataclass(frozen=True)
class GemmTiling:
    """How a GEMM is cut up on the chip: output tiles of ``tile_m x tile_n`` run in waves over ``units``."""

    tile_m: int
    tile_n: int
    units: int

    def __post_init__(self) -> None:
        if min(self.tile_m, self.tile_n, self.units) < 1:
            raise ValueError(f"GEMM tiling figures must be >= 1, got {self}")


@dataclass(frozen=True)
class CudaGraphs:
    """Decode-only steps of at most ``max_batch`` sequences replay a captured graph, launched in ``launch_s``."""

    launch_s: float
    max_batch: int


@dataclass(frozen=True)
class FrontEnd:
    """The serving front end's own time per request, which the device never sees: from a client's send to the
    scheduler (the HTTP request, input processing, whose tokenization grows with the prompt, the hand-off to the
    engine) and the first token's way back. A client's TTFT holds it; the engine's own clock does not."""

    fixed_s: float = 0.0
    per_input_token_s: float = 0.0
    per_output_token_s: float = 0.0  # its work to stream one token back (sim/front_end.py: it queues)
    per_step_s: float = 0.0  # its work to take one step's outputs in from the engine

    def of(self, input_len: int) -> float:
        return self.fixed_s + self.per_input_token_s * input_len


NO_FRONT_END = FrontEnd()  # the device's time alone, as the engine's own clock counts TTFT


@dataclass(frozen=True)
class DeviceProfile:
    """One emulated chip. Figures are in SI units; ``sources`` maps each to its citation."""

    name: str
    description: str
    hbm_capacity_bytes: float
    hbm_bandwidth_bytes_per_s: float
    sram_bytes: float
    peak_flops_per_s: dict[str, float]
    compute_efficiency: float
    memory_efficiency: float
    runtime_reserve_bytes: float
    kernel_launch_s: float  # fixed device-side cost of each kernel a step runs (fill, drain, the gap to the next)
    scale_up: LinkProfile
    host_link: LinkProfile
    scale_out: LinkProfile | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    estimates: tuple[str, ...] = field(default=(), compare=False)
    # The shape-aware figures (cost.py); each optional, and absent means the flat model: no tile or wave
    # quantization, attention at compute_efficiency, no host time beyond kernel_launch_s.
    gemm: GemmTiling | None = None
    attention_compute_efficiency: float | None = None  # prefill attention's share of peak (flash kernels)
    attention_split_tokens: int = 0  # decode attention's KV split (split-KV kernels); 0: no occupancy model
    host_launch_s: float = 0.0  # host time to launch one kernel eagerly; overlapped with the device's work
    graph: CudaGraphs | None = None  # decode steps replayed as one graph: one launch, not one per kernel
    step_overhead_s: float = 0.0  # host time per step the device waits on: scheduling, inputs, sampling
    # and what that host time grows by per running sequence and per scheduled token (calibrate-host fits
    # both on the live engine; the GPU profiles leave them 0)
    step_overhead_per_seq_s: float = 0.0
    step_overhead_per_token_s: float = 0.0
    front_end: FrontEnd = NO_FRONT_END  # per request, before the scheduler (``request_overhead`` figures)

    def __post_init__(self) -> None:
        if "bf16" not in self.peak_flops_per_s:
            raise ValueError(f"profile {self.name!r} needs a bf16 peak compute figure")
        unknown = set(self.peak_flops_per_s) - set(precision.PEAK_FALLBACK)
        if unknown:
            raise ValueError(
                f"profile {self.name!r}: unknown peak formats {sorted(unknown)}; "
                f"known: {', '.join(precision.PEAK_FALLBACK)}"
            )
        for name in ("compute_efficiency", "memory_efficiency", "attention_compute_efficiency"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"profile {self.name!r}: {name} must be in (0, 1], got {value}")

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s of a GEMM in ``dtype`` (a peak format such as "fp8", or any dtype spelling);
        a format without a figure here runs at the next wider one that has one (precision.PEAK_FALLBACK)."""
        key = dtype if dtype in precision.PEAK_FALLBACK else precision.dtype(dtype).peak
        return self.peak_flops_per_s[precision.resolve_peak(self.peak_flops_per_s, key)]

    def effective_flops(self, dtype: str) -> float:
        return self.peak_flops(dtype) * self.compute_efficiency

    @property
    def effective_bandwidth_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_bytes_per_s * self.memory_efficiency

    @property
    def network(self) -> Network:
        return Network(self.scale_up, self.scale_out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hbm_capacity_bytes": self.hbm_capacity_bytes,
            "hbm_bandwidth_TB_per_s": self.hbm_bandwidth_bytes_per_s / 1e12,
            "bf16_TFLOP_per_s": self.peak_flops("bf16") / 1e12,
            "scale_up_GB_per_s_per_direction": self.scale_up.bandwidth_bytes_per_s / 1e9,
            "chips_per_node": self.scale_up.chips,
            "topology": self.scale_up.topology,
            "scale_out_GB_per_s_per_direction": self.scale_out.bandwidth_bytes_per_s / 1e9 if self.scale_out else None,
        }


def _figure(entry: Any, key: str, sources: dict[str, str], estimates: list[str]) -> float:
    """Convert one ``{value, unit, source}`` entry to SI, recording its provenance."""
    if not isinstance(entry, dict) or not {"value", "unit", "source"} <= entry.keys():
        raise ValueError(f"figure {key!r} needs value, unit and source, got {entry!r}")
    unit = entry["unit"]
    if unit not in _UNITS:
        raise ValueError(f"figure {key!r} has unknown unit {unit!r}; known: {', '.join(_UNITS)}")
    sources[key] = str(entry["source"])
    if entry.get("estimate"):
        estimates.append(key)
    return float(entry["value"]) * _UNITS[unit]


def _link(raw: dict[str, Any], key: str, sources: dict[str, str], estimates: list[str]) -> LinkProfile:
    def fig(name: str) -> float:
        return _figure(raw[name], f"{key}.{name}", sources, estimates)

    chips = raw.get("chips", {"value": 1, "unit": "count", "source": "point-to-point"})
    return LinkProfile(
        topology=raw["topology"],
        chips=int(_figure(chips, f"{key}.chips", sources, estimates)),
        bandwidth_bytes_per_s=fig("bandwidth"),
        latency_s=fig("latency"),
        pair_bandwidth_bytes_per_s=fig("pair_bandwidth") if "pair_bandwidth" in raw else None,
        in_network_reduction=bool(fig("in_network_reduction")) if "in_network_reduction" in raw else False,
        collective_latency_s=fig("collective_latency") if "collective_latency" in raw else 0.0,
    )


def profile_from_dict(raw: dict[str, Any]) -> DeviceProfile:
    """Build a profile from the parsed data file (see ``profiles/maia100.yaml``)."""
    sources: dict[str, str] = {}
    estimates: list[str] = []

    def fig(key: str) -> float:
        return _figure(raw[key], key, sources, estimates)

    peaks = {
        dtype: _figure(entry, f"peak_compute.{dtype}", sources, estimates)
        for dtype, entry in raw["peak_compute"].items()
    }

    def optional(key: str, default: float) -> float:
        return fig(key) if key in raw else default

    gemm = graph = None
    if "gemm" in raw:
        g = raw["gemm"]
        gemm = GemmTiling(*(int(_figure(g[k], f"gemm.{k}", sources, estimates)) for k in ("tile_m", "tile_n", "units")))
    if "cuda_graphs" in raw:
        g = raw["cuda_graphs"]
        graph = CudaGraphs(
            _figure(g["launch"], "cuda_graphs.launch", sources, estimates),
            int(_figure(g["max_batch"], "cuda_graphs.max_batch", sources, estimates)),
        )
    attention = fig("attention_compute_efficiency") if "attention_compute_efficiency" in raw else None
    split, host_launch = optional("attention_split", 0), optional("host_launch", 0.0)
    overheads = [optional(key, 0.0) for key in ("step_overhead", "step_overhead_per_seq", "step_overhead_per_token")]
    front_end = FrontEnd(
        *(
            optional(key, 0.0)
            for key in ("request_overhead", "request_overhead_per_input_token", "token_output_time", "step_output_time")
        )
    )
    return DeviceProfile(
        name=raw["name"],
        description=raw.get("description", ""),
        hbm_capacity_bytes=fig("hbm_capacity"),
        hbm_bandwidth_bytes_per_s=fig("hbm_bandwidth"),
        sram_bytes=fig("sram"),
        peak_flops_per_s=peaks,
        compute_efficiency=fig("compute_efficiency"),
        memory_efficiency=fig("memory_efficiency"),
        runtime_reserve_bytes=fig("runtime_reserve"),
        kernel_launch_s=fig("kernel_launch"),
        scale_up=_link(raw["scale_up"], "scale_up", sources, estimates),
        host_link=_link(raw["host_link"], "host_link", sources, estimates),
        scale_out=_link(raw["scale_out"], "scale_out", sources, estimates) if "scale_out" in raw else None,
        sources=sources,
        estimates=tuple(estimates),  # read every figure above this line: reading one appends to estimates
        gemm=gemm,
        attention_compute_efficiency=attention,
        attention_split_tokens=int(split),
        host_launch_s=host_launch,
        graph=graph,
        step_overhead_s=overheads[0],
        step_overhead_per_seq_s=overheads[1],
        step_overhead_per_token_s=overheads[2],
        front_end=front_end,
    )


def _builtin_dir() -> Path:
    return Path(str(resources.files("maia_serving.emulator") / "profiles"))


def host_profile_path() -> Path:
    """Where ``maia-serving calibrate-host`` caches the measured host profile."""
    cache = envs.get(envs.MAIA_SERVING_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maia-serving"
    )
    return Path(cache) / "host.yaml"


def _builtin_raw() -> dict[str, dict[str, Any]]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(_builtin_dir().glob("*.yaml"))}


def profile_names() -> list[str]:
    """Built-in profile names, each topology variant as ``name@variant``, plus ``host`` (measured on demand)."""
    names = []
    for name, raw in _builtin_raw().items():
        names += [name] + [f"{name}{VARIANT_SEPARATOR}{v}" for v in raw.get("variants", {})]
    return names + ["host"]


def with_variant(raw: dict[str, Any], variant: str) -> dict[str, Any]:
    """The profile's data with a topology variant's keys over its own: the same chip wired another way
    (an SXM GPU on PCIe only, NVSwitch without in-switch reduction), so the chip's figures are written once."""
    variants = raw.get("variants", {})
    if variant not in variants:
        raise UnknownProfileError(
            f"profile {raw['name']!r} has no variant {variant!r}; its variants: {', '.join(variants) or 'none'}"
        )
    return {
        **{k: v for k, v in raw.items() if k != "variants"},
        **variants[variant],
        "name": f"{raw['name']}{VARIANT_SEPARATOR}{variant}",
    }


class HostProfileMissing(UnknownProfileError):
    """``host`` was asked for before this machine was measured: measuring needs torch, which the emulator does
    not import, so the caller measures (``maia_serving.serving.profiles.load_profile`` does) and asks again."""

    def __init__(self, path: Path):
        super().__init__(f"no host profile at {path}: run `maia-serving calibrate-host` to measure this machine")
        self.path = path


def load_profile(name: str) -> DeviceProfile:
    """Load a profile by name (``h100-sxm@pcie``: a variant); ``host`` is the one ``calibrate-host`` wrote
    (HostProfileMissing before then)."""
    if name == "host":
        path = host_profile_path()
        if not path.exists():
            raise HostProfileMissing(path)
        return profile_from_dict(yaml.safe_load(path.read_text()))
    base, _, variant = name.partition(VARIANT_SEPARATOR)
    path = _builtin_dir() / f"{base}.yaml"
    if not path.exists():
        raise UnknownProfileError(f"unknown device profile {name!r}; known profiles: {', '.join(profile_names())}")
    raw = yaml.safe_load(path.read_text())
    return profile_from_dict(with_variant(raw, variant) if variant else raw)

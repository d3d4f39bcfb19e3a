"""Which tensor x pipeline layout of N chips serves a model best, on each device: ``maia-serving plan``.

Every ``tp x pp = N`` is tried on every device; for a MoE model also every ``tp x pp x dp = N`` with ``dp``
data-parallel replicas, each with and without expert parallelism (vLLM's ``-dp`` and
``--enable-expert-parallel``), as MoE deployments are laid out. A layout is rejected with a reason when it breaks a rule
vLLM enforces (query heads divisible by ``tp``; KV heads divisible by ``tp`` or ``tp`` by them, vLLM then
replicating them; at most one stage per layer; vLLM splits layers unevenly otherwise, and the uneven
stage is priced) or does not fit (the memory plan's refusal, the message `fit` and `simulate` give).
The others are served the same workload by the simulator, the cost model the live engines are charged
by, and ranked by their output throughput within the SLOs: the tokens per second of the requests that
meet every SLO given (all of them without SLOs), so the ranking compares topologies and layouts on
what they serve, not on a separate formula.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.routing import eplb_error
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.memory import NotEnoughMemory, ServingConfig
from maia_serving.emulator.model_shape import ModelShape
from maia_serving.emulator.sim.report import SLO, meets, served_s, summarize
from maia_serving.emulator.sim.simulate import Simulation, simulate_device
from maia_serving.emulator.sim.workload import Request


@dataclass(frozen=True)
class LayoutResult:
    """One layout on one device: why it was rejected, or what it serves."""

    device: str
    topology: str
    tp: int
    pp: int
    fits: bool
    dp: int = 1
    ep: bool = False
    eplb: int | None = None  # EPLB's redundant experts where it places them (None: vLLM's linear placement)
    reason: str | None = None
    output_throughput_tok_s: float | None = None
    goodput_tok_s: float | None = None  # output tokens per second of the requests meeting every SLO
    ttft_ms: float | None = None  # mean
    tpot_ms: float | None = None  # mean
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    comm_share: float | None = None  # communication's share of the steps' work
    eplb_rearranged: bool | None = None  # whether EPLB balanced the experts within the run (None: no EPLB)
    rank: int | None = None  # 1: the most goodput; None when rejected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_V = TypeVar("_V", int, float)


def _figure(result: LayoutResult, value: _V | None) -> _V:
    """``value``, a figure of ``result``: evaluate sets every one of a layout that fits (and ranked its rank);
    ValueError for a rejected layout."""
    if value is None:
        raise ValueError(f"{result.device} {_label(result)} has no such figure: it was rejected ({result.reason})")
    return value


def label(tp: int, pp: int, dp: int = 1, ep: bool = False) -> str:
    """ "tp4 pp1", with " dp2" and " ep" where they apply: the plots' name for a layout."""
    return f"tp{tp} pp{pp}" + (f" dp{dp}" if dp > 1 else "") + (" ep" if ep else "")


def layouts(num_devices: int, moe: bool = False, eplb: int | None = None) -> list[Parallel]:
    """Every (tp, pp) with tp * pp = num_devices, widest tensor parallelism first; with ``moe`` every
    (tp, pp, dp), each without and with expert parallelism where the experts have more than one chip (placed by
    EPLB with ``eplb`` redundant experts, where given)."""
    if num_devices < 1:
        raise ValueError(f"--num-devices must be at least 1, got {num_devices}")
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    if not moe:
        return [Parallel(num_devices // pp, pp) for pp in divisors]
    out = []
    for dp in divisors:
        for pp in (d for d in divisors if num_devices // dp % d == 0):
            tp = num_devices // dp // pp
            out += [Parallel(tp, pp, dp)] + ([Parallel(tp, pp, dp, ep=True, eplb=eplb)] if tp * dp > 1 else [])
    return out


def layout_error(model: ModelShape, tp: int, pp: int) -> str | None:
    """The rule of vLLM's that (tp, pp) breaks for ``model``, or None."""
    if model.num_heads % tp:
        return f"{model.num_heads} attention heads are not divisible by tp={tp}"
    kv = model.num_kv_heads
    if not model.mla and kv % tp and tp % kv:
        return f"{kv} KV heads: neither divisible by tp={tp} nor dividing it"
    if pp > model.num_layers:
        return f"pp={pp} stages for {model.num_layers} layers: each stage needs a layer"
    return None


def network_error(profile: DeviceProfile, chips: int) -> str | None:
    """Why ``chips`` chips of ``profile`` cannot be connected, or None."""
    net = profile.network
    most = net.scale_out.chips if net.scale_out else net.node_chips
    if chips > most:
        return f"{chips} chips: the network of {profile.name} connects at most {most}"
    return None


def topology_name(profile: DeviceProfile) -> str:
    """How the profile's chips are wired, in a few words: the plots' and the table's label."""
    up = profile.scale_up
    reduction = " + in-switch reduction" if up.in_network_reduction else ""
    return f"{up.topology}{reduction} of {up.chips}"


def goodput_tok_s(sim: Simulation, slo: SLO, duration_s: float) -> float:
    """Output tokens per second of the requests that meet every SLO given."""
    good = sum(t.num_output_tokens for t in sim.timings if meets(served_s(t.ttft_s, "first token", t), t.tpot_s, slo))
    return good / duration_s


def comm_share(sim: Simulation) -> float:
    """Communication's share of the work of every step (each stage's and each send's time, waits aside)."""
    work = sum(sim.steps.work_s)
    return sum(sim.steps.comm_s) / work if work else 0.0


def evaluate(
    profile: DeviceProfile,
    model: ModelShape,
    config: ServingConfig,
    requests: list[Request],
    slo: SLO,
    layout: Parallel,
    enable_prefix_caching: bool = True,
    max_concurrency: int | None = None,
) -> LayoutResult:
    """One layout (its all2all backend is ``config``'s) on one device: its rejection, or the simulator's figures
    for ``requests`` (at most ``max_concurrency`` in flight)."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    base = LayoutResult(profile.name, topology_name(profile), tp, pp, fits=False, dp=dp, ep=layout.ep, eplb=layout.eplb)
    eplb = layout.eplb is not None
    error = (
        layout_error(model, tp, pp)
        or network_error(profile, layout.chips)
        or (layout.eplb is not None and eplb_error(model.require_moe().num_experts, layout.eplb, tp * dp))
    )
    if error:
        return replace(base, reason=error)
    serving = replace(
        config,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        data_parallel_size=dp,
        enable_expert_parallel=layout.ep,
        enable_eplb=eplb,
        num_redundant_experts=layout.eplb or 0,
    )
    try:
        sim = simulate_device(profile, model, serving, requests, enable_prefix_caching, max_concurrency)
    except NotEnoughMemory as exc:
        return replace(base, reason=str(exc))
    report = summarize(sim, slo)
    tpot = report.tpot_ms
    return replace(
        base,
        fits=True,
        output_throughput_tok_s=report.output_throughput_tok_s,
        goodput_tok_s=goodput_tok_s(sim, slo, report.duration_s),
        ttft_ms=report.ttft_ms.mean,
        tpot_ms=tpot.mean if tpot else None,
        ttft_p99_ms=report.ttft_ms.p99,
        tpot_p99_ms=tpot.p99 if tpot else None,
        comm_share=comm_share(sim),
        eplb_rearranged=None if sim.eplb_initial_steps is None else sim.eplb_initial_steps < report.num_steps,
    )


def ranked(results: list[LayoutResult]) -> list[LayoutResult]:
    """Served layouts by goodput, best first, numbered; then the rejected ones in their order."""
    served = sorted((r for r in results if r.fits), key=lambda r: -_figure(r, r.goodput_tok_s))
    return [replace(r, rank=i) for i, r in enumerate(served, 1)] + [r for r in results if not r.fits]


def plan(
    profiles: list[DeviceProfile],
    model: ModelShape,
    num_devices: int,
    config: ServingConfig,
    requests: list[Request],
    slo: SLO | None = None,
    enable_prefix_caching: bool = True,
    eplb: int | None = None,
    max_concurrency: int | None = None,
) -> list[LayoutResult]:
    """Every layout of ``num_devices`` chips on every profile, ranked (module docstring); no SLO: every request
    counts. ``eplb``: the expert-parallel layouts' experts placed by EPLB with that many redundant experts;
    ``max_concurrency``: the client's limit on requests in flight (``simulate_device``)."""
    slo = slo or SLO()
    if eplb is not None and model.moe is None:
        raise ValueError(f"--enable-eplb balances routed experts; {model.name} has none (a dense model)")
    return ranked(
        [
            evaluate(profile, model, config, requests, slo, layout, enable_prefix_caching, max_concurrency)
            for profile in profiles
            for layout in layouts(num_devices, model.moe is not None, eplb)
        ]
    )


def _label(result: LayoutResult) -> str:
    return label(result.tp, result.pp, result.dp, result.ep)


def _pyplot() -> ModuleType:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'maia-serving[bench]'") from None
    return plt


def write_plots(out_dir: Path, results: list[LayoutResult], title: str) -> list[Path]:
    """Throughput against TPOT per layout, and communication's share per topology and layout; the files."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    served = [r for r in results if r.fits]
    devices = list(dict.fromkeys(r.device for r in results))
    fig, ax = plt.subplots(figsize=(9, 6))
    for device in devices:
        rows = [r for r in served if r.device == device and r.tpot_ms is not None]
        ax.scatter([r.tpot_ms for r in rows], [r.output_throughput_tok_s for r in rows], label=device, s=40)
        # Every point named, or with a MoE model's many layouts the three best of each device (the table has all).
        named = rows if len(rows) <= 6 else sorted(rows, key=lambda r: _figure(r, r.rank))[:3]
        for r in named:
            ax.annotate(
                _label(r), (r.tpot_ms, r.output_throughput_tok_s), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
    ax.set_xlabel("mean time per output token (ms)")
    ax.set_ylabel("output throughput (tok/s)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "throughput_vs_tpot.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    labels = list(dict.fromkeys(_label(r) for r in results))
    width = 0.8 / max(len(devices), 1)
    fig, ax = plt.subplots(figsize=(max(9.0, 0.55 * len(labels)), 5))
    for i, device in enumerate(devices):
        share = {_label(r): 100 * _figure(r, r.comm_share) for r in served if r.device == device}
        ax.bar(
            [j + i * width for j in range(len(labels))],
            [share.get(label, 0.0) for label in labels],
            width,
            label=device,
        )
    tilted = len(labels) > 6  # a MoE model's layouts: too many labels to sit side by side
    ax.set_xticks(
        [j + width * (len(devices) - 1) / 2 for j in range(len(labels))],
        labels,
        rotation=45 if tilted else 0,
        ha="right" if tilted else "center",
    )
    ax.set_ylabel("communication's share of the steps' work (%)")
    ax.set_title(f"{title}: communication per topology (no bar: rejected)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "comm_share.png")
    fig.savefig(paths[1])
    plt.close(fig)
    return paths

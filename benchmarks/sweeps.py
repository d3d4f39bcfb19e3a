"""Published concurrency sweeps replayed by `simulate --max-concurrency`: mean TTFT, mean TPOT and output
throughput against data/published_sweeps.yaml, which the emulator was not built on (issue 31's second family).

Each source the emulator has a model shape for carries an ``emulate`` block (the profile, the weight and KV
formats the run is assumed to use); each point is simulated as the source measured it: a closed loop of
``concurrency`` clients at an infinite rate, requests of the point's lengths, measured as its load generator measures
(``measured``).
Reported: the ratio emulated / published per point, the mean absolute percentage
error per source and per regime (low concurrency: 16 or fewer clients; prefill- or decode-heavy by lengths).

    cd benchmarks && ../.venv-vllm/bin/python sweeps.py --plot plots/sweeps.png   # writes out/sweeps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import common  # noqa: F401  (the repository root on the path)
import yaml

from maia_serving.emulator import ServingConfig, load_model_shape
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic

METRICS = ("ttft_ms", "tpot_ms", "output_tok_s")


@dataclass
class Replay:
    source: str
    concurrency: int
    input_len: int
    output_len: int
    published: dict[str, float | None]
    emulated: dict[str, float]

    @property
    def regime(self) -> str:
        load = "low concurrency" if self.concurrency <= 16 else "high concurrency"
        shape = "prefill-heavy" if self.input_len > self.output_len else "decode-heavy"
        return f"{load}, {shape}" if self.input_len != self.output_len else f"{load}, balanced"


def measured(sim, concurrency: int, window: str) -> dict[str, float]:
    """Mean TTFT, TPOT and output throughput of a closed loop as the source's load generator measured it
    (``measurement`` in the data file): ``all`` requests, start and drain included (``vllm bench serve`` and
    SGLang's bench_serving count every prompt they send), or only once ``steady`` (GenAI-Perf and AIPerf report
    a measurement window they have found stable): the requests sent after the first two rounds of
    ``concurrency`` and before the last one, so neither the start, when every client sends at once and the
    prefills queue behind each other, nor the drain is in it. Throughput by Little's law: ``concurrency``
    requests in flight, each ``output_len`` tokens in its mean end-to-end time; over ``all``, the tokens over
    the run's span, as the benchmarks count it."""
    timings = sorted(sim.timings, key=lambda t: t.arrival_s)
    if window == "steady":
        timings = timings[2 * concurrency : len(timings) - concurrency] or timings
        e2e_s = sum(t.e2e_s for t in timings) / len(timings)
        throughput = concurrency * timings[0].num_output_tokens / e2e_s
    else:
        span_s = max(t.last_token_s for t in timings) - timings[0].arrival_s
        throughput = sum(t.num_output_tokens for t in timings) / span_s
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return {
        "ttft_ms": 1e3 * sum(t.ttft_s for t in timings) / len(timings),
        "tpot_ms": 1e3 * sum(tpots) / len(tpots) if tpots else None,
        "output_tok_s": throughput,
    }


def replay(
    source: dict,
    point: dict,
    num_per_client: int,
    policy: str | None = None,
    per_seq_us: float | None = None,
) -> dict[str, float]:
    emulate = source["emulate"]
    profile = load_profile(emulate["profile"])
    per_seq_us = emulate.get("step_overhead_per_seq_us", 0.0) if per_seq_us is None else per_seq_us
    if per_seq_us:
        profile = replace(profile, step_overhead_per_seq_s=per_seq_us * 1e-6)
    serving = ServingConfig(
        tensor_parallel_size=source["tp"],
        weight_dtype=emulate["weight_dtype"],
        kv_cache_dtype=emulate["kv_cache_dtype"],
        max_model_len=point["input_len"] + point["output_len"],
        scheduler_policy=policy or emulate.get("scheduler_policy", "vllm"),
    )
    c = point["concurrency"]
    count = point.get("num_requests") or emulate.get("requests_per_client", num_per_client) * c
    requests = synthetic(count, point["input_len"], point["output_len"])
    sim = simulate_device(profile, load_model_shape(source["emulator_shape"]), serving, requests, True, c)
    return measured(sim, c, emulate.get("measurement", "all"))


def mape(rows: list[Replay], metric: str) -> tuple[float | None, int]:
    errors = [
        abs(r.emulated[metric] - r.published[metric]) / r.published[metric]
        for r in rows
        if r.published.get(metric) and r.emulated.get(metric) is not None
    ]
    return (100 * sum(errors) / len(errors) if errors else None), len(errors)


def tpot_slopes(rows: list[Replay]) -> list[str]:
    """Per source and shape, how much each added client adds to TPOT (ms), published and emulated, over 10 to 100
    clients (past that, KV limits cap the batch in some shapes): where the two differ, a cost per sequence in a
    step is missing or too small."""
    groups: dict[tuple[str, int, int], list[Replay]] = defaultdict(list)
    for r in rows:
        if 10 <= r.concurrency <= 100 and r.published.get("tpot_ms") and r.emulated.get("tpot_ms"):
            groups[(r.source, r.input_len, r.output_len)].append(r)
    lines = ["| source | in / out | TPOT ms per client, published | emulated | ratio |", "|---|---|---:|---:|---:|"]
    for (source, isl, osl), members in sorted(groups.items()):
        if len({r.concurrency for r in members}) < 3:
            continue
        clients = [r.concurrency for r in members]
        published = statistics.linear_regression(clients, [r.published["tpot_ms"] for r in members]).slope
        emulated = statistics.linear_regression(clients, [r.emulated["tpot_ms"] for r in members]).slope
        lines.append(f"| {source} | {isl} / {osl} | {published:.4f} | {emulated:.4f} | {emulated / published:.2f} |")
    return lines


def plot(rows: list[Replay], path) -> None:
    """Emulated against published, log-log, one panel per metric, one colour per source, the diagonal and +-20%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r.source for r in rows})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sources)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, metric, name in zip(axes, METRICS, ("mean TTFT ms", "mean TPOT ms", "output tok/s")):
        pairs = [(r.published[metric], r.emulated[metric], r.source) for r in rows]
        pairs = [p for p in pairs if p[0] and p[1]]
        for source in sources:
            xs = [p[0] for p in pairs if p[2] == source]
            ax.scatter(xs, [p[1] for p in pairs if p[2] == source], s=9, color=colors[source], label=source)
        low, high = min(min(p[:2]) for p in pairs), max(max(p[:2]) for p in pairs)
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        for k in (0.8, 1.2):
            ax.plot([low, high], [k * low, k * high], color="grey", linewidth=0.6, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"published {name}")
        ax.set_ylabel(f"emulated {name}")
    axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle("simulate --max-concurrency against published sweeps (diagonal: equal; dashed: +-20%)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=6,
        help="where the source does not say how many it sent (a steady window measures the middle three)",
    )
    parser.add_argument("--sources", nargs="*", help="only these source keys")
    parser.add_argument("--plot", type=Path, default=None, help="write the emulated-against-published plot here")
    parser.add_argument("--scheduler-policy", default=None, help="instead of each source's (to compare)")
    parser.add_argument(
        "--step-overhead-per-seq-us", type=float, default=None, help="instead of each source's (to compare)"
    )
    args = parser.parse_args()
    data = yaml.safe_load((common.OUT.parent / "data" / "published_sweeps.yaml").read_text())
    sources = {k: v for k, v in data["sources"].items() if "emulate" in v and (not args.sources or k in args.sources)}
    rows = []
    for point in data["points"]:
        source = sources.get(point["source"])
        if source is None:
            continue
        published = {m: point.get(m) for m in METRICS}
        rows.append(
            Replay(
                point["source"],
                point["concurrency"],
                point["input_len"],
                point["output_len"],
                published,
                replay(
                    source,
                    point,
                    args.requests_per_client,
                    args.scheduler_policy,
                    args.step_overhead_per_seq_us,
                ),
            )
        )
    groups: dict[str, list[Replay]] = defaultdict(list)
    for r in rows:
        groups[f"source {r.source}"].append(r)
        groups[r.regime].append(r)
    print("| group | points | TTFT MAPE | TPOT MAPE | throughput MAPE |\n|---|---:|---:|---:|---:|")
    for name, members in [("all", rows), *sorted(groups.items())]:
        cells = []
        for metric in METRICS:
            value, n = mape(members, metric)
            cells.append("-" if value is None else f"{value:.1f}% ({n})")
        print(f"| {name} | {len(members)} | {' | '.join(cells)} |")
    print("\n" + "\n".join(tpot_slopes(rows)))
    if args.plot:
        plot(rows, args.plot)
    common.OUT.mkdir(exist_ok=True)
    (common.OUT / "sweeps.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()

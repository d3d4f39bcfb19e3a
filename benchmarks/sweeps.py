"""Published concurrency sweeps replayed by `simulate --max-concurrency`: mean TTFT, mean TPOT and output
throughput against data/published_sweeps.yaml, which the emulator was not built on (issue 31's second family).

Each source the emulator has a model shape for carries an ``emulate`` block (the profile, the weight and KV
formats the run is assumed to use); each point is simulated as the source measured it: a closed loop of
``concurrency`` clients at an infinite rate, requests of the point's lengths, measured once steady (``steady``).
Reported: the ratio emulated / published per point, the mean absolute percentage
error per source and per regime (low concurrency: 16 or fewer clients; prefill- or decode-heavy by lengths).

    cd benchmarks && ../.venv-vllm/bin/python sweeps.py                    # writes out/sweeps.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, replace

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


def steady(sim, concurrency: int) -> dict[str, float]:
    """Mean TTFT, TPOT and output throughput of a closed loop once it is steady, as the sources measure it
    (GenAI-Perf's concurrency mode reports a measurement window it has found stable; ``vllm bench serve`` runs
    10 x the concurrency in its sweeps): the requests sent after the first two rounds of ``concurrency`` and
    before the last one, so neither the start, when every client sends at once and the prefills queue behind
    each other, nor the drain is in it. Throughput by Little's law: ``concurrency`` requests in flight, each
    ``output_len`` tokens in its mean end-to-end time."""
    timings = sorted(sim.timings, key=lambda t: t.arrival_s)
    window = timings[2 * concurrency : len(timings) - concurrency] or timings
    tpots = [t.tpot_s for t in window if t.tpot_s is not None]
    e2e_s = sum(t.e2e_s for t in window) / len(window)
    return {
        "ttft_ms": 1e3 * sum(t.ttft_s for t in window) / len(window),
        "tpot_ms": 1e3 * sum(tpots) / len(tpots) if tpots else None,
        "output_tok_s": concurrency * window[0].num_output_tokens / e2e_s,
    }


def replay(
    source: dict, point: dict, num_per_client: int, token_output_us: float | None = None, policy: str | None = None
) -> dict[str, float]:
    emulate = source["emulate"]
    profile = load_profile(emulate["profile"])
    per_token_us = emulate.get("token_output_us", 0.0) if token_output_us is None else token_output_us
    front_end = replace(profile.front_end, per_output_token_s=per_token_us * 1e-6)
    serving = ServingConfig(
        tensor_parallel_size=source["tp"],
        weight_dtype=emulate["weight_dtype"],
        kv_cache_dtype=emulate["kv_cache_dtype"],
        max_model_len=point["input_len"] + point["output_len"],
        scheduler_policy=policy or emulate.get("scheduler_policy", "vllm"),
    )
    c = point["concurrency"]
    requests = synthetic(num_per_client * c, point["input_len"], point["output_len"])
    sim = simulate_device(profile, load_model_shape(source["emulator_shape"]), serving, requests, True, c, front_end)
    return steady(sim, c)


def mape(rows: list[Replay], metric: str) -> tuple[float | None, int]:
    errors = [
        abs(r.emulated[metric] - r.published[metric]) / r.published[metric]
        for r in rows
        if r.published.get(metric) and r.emulated.get(metric) is not None
    ]
    return (100 * sum(errors) / len(errors) if errors else None), len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=6, help="of which the middle three are measured")
    parser.add_argument("--sources", nargs="*", help="only these source keys")
    parser.add_argument(
        "--token-output-us", type=float, default=None, help="the front end's work per streamed token, for every source"
    )
    parser.add_argument("--scheduler-policy", default=None, help="instead of each source's (to compare)")
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
                replay(source, point, args.requests_per_client, args.token_output_us, args.scheduler_policy),
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
    common.OUT.mkdir(exist_ok=True)
    (common.OUT / "sweeps.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()

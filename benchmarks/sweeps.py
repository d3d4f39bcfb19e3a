"""Published concurrency sweeps replayed by `simulate --max-concurrency`: mean TTFT, mean TPOT and output
throughput against data/published_sweeps.yaml, which the emulator was not built on (issue 31's second family).

Each source the emulator has a model shape for carries an ``emulate`` block (the profile, the weight and KV
formats the run is assumed to use); each point is simulated as the source measured it: a closed loop of
``concurrency`` clients at an infinite rate, requests of the point's lengths, enough of them that most of the
run is at full concurrency. Reported: the ratio emulated / published per point, the mean absolute percentage
error per source and per regime (low concurrency: 16 or fewer clients; prefill- or decode-heavy by lengths).

    cd benchmarks && ../.venv-vllm/bin/python sweeps.py                    # writes out/sweeps.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass

import common  # noqa: F401  (the repository root on the path)
import yaml

from maia_serving.emulator import ServingConfig, load_model_shape
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.sim.report import summarize
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


def replay(source: dict, point: dict, num_per_client: int) -> dict[str, float]:
    emulate = source["emulate"]
    serving = ServingConfig(
        tensor_parallel_size=source["tp"],
        weight_dtype=emulate["weight_dtype"],
        kv_cache_dtype=emulate["kv_cache_dtype"],
        max_model_len=point["input_len"] + point["output_len"],
        scheduler_policy=emulate.get("scheduler_policy", "vllm"),
    )
    c = point["concurrency"]
    requests = synthetic(max(num_per_client * c, 32), point["input_len"], point["output_len"])
    sim = simulate_device(
        load_profile(emulate["profile"]), load_model_shape(source["emulator_shape"]), serving, requests, True, c
    )
    report = summarize(sim)
    return {
        "ttft_ms": report.ttft_ms.mean,
        "tpot_ms": report.tpot_ms.mean if report.tpot_ms else None,
        "output_tok_s": report.output_throughput_tok_s,
    }


def mape(rows: list[Replay], metric: str) -> tuple[float | None, int]:
    errors = [
        abs(r.emulated[metric] - r.published[metric]) / r.published[metric]
        for r in rows
        if r.published.get(metric) and r.emulated.get(metric) is not None
    ]
    return (100 * sum(errors) / len(errors) if errors else None), len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--sources", nargs="*", help="only these source keys")
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
                replay(source, point, args.requests_per_client),
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

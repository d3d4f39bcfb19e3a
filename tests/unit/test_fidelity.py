"""benchmarks/fidelity.py: the published data file is well formed, and the ratio arithmetic is right.

No network, no assertion on a prediction's accuracy (that is the benchmark's job, not a test's): the
one simulated case checks that a prediction comes back through the CLI's machinery, not its value.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(fidelity):
    return fidelity.load()


def test_the_data_file_is_well_formed(fidelity, data):
    assert fidelity.problems(data) == []
    assert len(data["cases"]) >= 15


def test_every_case_names_its_source_and_every_source_its_address(data):
    for case in data["cases"]:
        source = data["sources"][case["source"]]
        assert source["address"].startswith("https://")
        assert source["software"] and source["hardware"] and source["method"]
        assert case["precision"]["weights"] and case["precision"]["kv_cache"]


@pytest.mark.parametrize(
    "damage, complaint",
    [
        (lambda d: d["cases"][0].pop("value"), "no value"),
        (lambda d: d["cases"][0].update(source="nowhere"), "is not under sources"),
        (lambda d: d["sources"][d["cases"][0]["source"]].pop("address"), "no address"),
        (lambda d: d["cases"][0].update(metric="tokens"), "metric 'tokens'"),
        (lambda d: d["cases"][0].update(tp=0), "tp must be a positive integer"),
        (lambda d: d["cases"][1].update(id=d["cases"][0]["id"]), "appears twice"),
        (lambda d: d.update(cases=d["cases"][:14]), "at least 15"),
        (lambda d: d.update(cases=[c for c in d["cases"] if not c["shape"].startswith("mixtral")]), "a MoE model"),
        (lambda d: d.update(cases=[c for c in d["cases"] if c["profile"] != "h200"]), "an H200 case"),
        (lambda d: d.update(cases=[c for c in d["cases"] if c["regime"] != "prefill-heavy"]), "a prefill-heavy case"),
    ],
)
def test_a_damaged_data_file_is_refused_with_the_reason(fidelity, data, damage, complaint):
    broken = copy.deepcopy(data)
    damage(broken)
    assert any(complaint in p for p in fidelity.problems(broken)), fidelity.problems(broken)


def test_speed_ratio_inverts_latencies(fidelity):
    # A throughput predicted at 120 of a measured 100 is 20% optimistic; so is a latency of 100 predicted at 80:
    # 100 / 80 = 1.25 (the speed is 1.25x), not 0.8.
    assert fidelity.speed_ratio("output_throughput_tok_s", 120.0, 100.0) == pytest.approx(1.2)
    assert fidelity.speed_ratio("e2e_latency_ms", 80.0, 100.0) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown metric"):
        fidelity.speed_ratio("tokens", 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        fidelity.speed_ratio("e2e_latency_ms", 0.0, 1.0)


def test_geometric_mean_and_worst_case(fidelity):
    # exp((log 2 + log 0.5 + log 1) / 3) = exp(0) = 1: a 2x over- and a 2x under-prediction cancel.
    assert fidelity.geometric_mean([2.0, 0.5, 1.0]) == pytest.approx(1.0)
    # (1.1 * 0.9 * 1.21)^(1/3) = 1.1979^(1/3) = 1.0620
    assert fidelity.geometric_mean([1.1, 0.9, 1.21]) == pytest.approx(1.0620, abs=1e-4)
    results = [
        fidelity.Result(f"c{i}", "h100-sxm", "balanced", "output_throughput_tok_s", 100.0, p)
        for i, p in enumerate([130.0, 70.0, 101.0])
    ]
    # |log 1.3| = 0.262 < |log 0.7| = 0.357: 0.7 is the worse miss.
    assert fidelity.worst(results).id == "c1"
    assert [fidelity.within(r.ratio, 0.25) for r in results] == [False, False, True]


def test_a_small_case_is_predicted_through_the_simulator(fidelity, data):
    """One vLLM latency case (8 requests), end to end through simulate_device and summarize: the ratio is a
    finite positive number, and halving the published latency doubles it."""
    case = next(c for c in data["cases"] if c["metric"] == "e2e_latency_ms" and c["shape"] == "llama-3-8b")
    settings = data["sources"][case["source"]]["settings"]
    predicted = fidelity.predict(case, settings)
    assert predicted > 0 and math.isfinite(predicted)
    r = fidelity.Result(case["id"], case["profile"], case["regime"], case["metric"], case["value"], predicted)
    half = fidelity.Result(case["id"], case["profile"], case["regime"], case["metric"], case["value"] / 2, predicted)
    assert half.ratio == pytest.approx(r.ratio / 2)

"""Measured expert routing (``--expert-load``): experts touched, the busiest expert-parallel chip, the file's
refusals, worked by hand. Mixtral-8x7B: 32 MoE layers of 8 experts, top 2."""

import json
import math

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator import load_model_shape, load_profile
from maia_serving.emulator.cost import CostModel, Parallel, StepShape, expert_imbalance
from maia_serving.emulator.model_shape import MoE, with_expert_load
from maia_serving.emulator.routing import from_counts

HOT = [80, 20, 20, 20, 20, 20, 10, 10]  # expert 0 takes 40% of the 200 choices: p = 0.8, 0.2 x 5, 0.1 x 2


@pytest.fixture(scope="module")
def mixtral():
    return load_model_shape("mixtral-8x7b")


def _write(tmp_path, data, name="load.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_counts_become_each_experts_chance_of_being_chosen():
    """4 experts, top 2, counts 2, 1, 1, 0 of 4 choices (2 tokens): p = 1, 0.5, 0.5, 0; two tokens touch
    1 + 0.75 + 0.75 + 0 = 2.5 experts, where uniform routing (p = 0.5 each) touches 4 x 0.75 = 3."""
    load = from_counts([2, 1, 1, 0], 4, 2, 1)
    assert load.shares == ((1.0, 0.5, 0.5, 0.0),)
    assert load.experts_touched(2) == pytest.approx(2.5, rel=1e-12)
    assert from_counts([1] * 4, 4, 2, 1).experts_touched(2) == pytest.approx(3.0, rel=1e-12)
    assert MoE(4, 2, 1).experts_touched(2) == pytest.approx(3.0, rel=1e-12)


def test_uniform_chip_shares_are_the_uniform_imbalance():
    shares = from_counts([[5] * 8] * 3, 8, 2, 3).chip_shares(8)
    for tokens in (1, 16, 4096):
        assert expert_imbalance(tokens, 2, 8, 1, shares) == pytest.approx(expert_imbalance(tokens, 2, 8, 1), rel=1e-12)


def test_a_hot_expert_sets_the_busiest_chip_by_hand():
    """One expert a chip, chip 0 gets 40% of the draws. 4,096 tokens: 8,192 draws, chip 0's mean 3,276.8, sigma
    sqrt(8192 x 0.4 x 0.6) = 44.340, times sqrt(2 ln 8) = 2.03933: 3,367.2 rows against the mean chip's 1,024,
    3.2883x (uniform: 1.060x). 16 tokens: 12.8 + 5.65 rows, past the cap of one row a token: 16 / 4 = 4x."""
    shares = from_counts(HOT, 8, 2, 1).chip_shares(8)
    assert shares == ((0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05),)
    assert expert_imbalance(4096, 2, 8, 1, shares) == pytest.approx(3367.225 / 1024, rel=1e-5)
    assert expert_imbalance(16, 2, 8, 1, shares) == 4.0
    two_layers = from_counts([[1] * 8, HOT], 8, 2, 2).chip_shares(8)  # each layer its own busiest chip, averaged
    assert expert_imbalance(4096, 2, 8, 1, two_layers) == pytest.approx(
        (expert_imbalance(4096, 2, 8, 1) + 3367.225 / 1024) / 2, rel=1e-5)


def test_experts_spread_over_chips_as_vllm_places_them():
    """8 experts over 3 chips, linear placement: ceil(8/3) = 3, 3 and the last 2."""
    assert from_counts(HOT, 8, 2, 1).chip_shares(3)[0] == pytest.approx((120 / 200, 60 / 200, 20 / 200), rel=1e-12)


def test_measured_routing_prices_both_ways(mixtral, tmp_path):
    """8 H100s. 16 decode tokens split in width (no EP): a hot expert serves more of the tokens, so fewer experts
    are touched (7.49 of 8 against 7.92) and the step reads less. A prefill of 512 under EP: chip 0 runs 3.45x
    the mean rows against 1.17x, and the compute-bound step takes longer. Under EP the bytes are the chip that
    touches most of its experts: with one expert a chip, at most 1 (uniform: the mean chip's 7.92 / 8)."""
    skewed = with_expert_load(mixtral, _write(tmp_path, {"source": "test", "layers": HOT}))
    assert skewed.moe.load.source == "test" and len(skewed.moe.load.shares) == 1
    assert skewed.moe.experts_touched(16) == pytest.approx(1 + 5 * (1 - 0.8**16) + 2 * (1 - 0.9**16), rel=1e-12)
    assert skewed.moe.load.busiest_chip_touched(16, 8) == pytest.approx(1 - 0.2**16, rel=1e-12)
    h100, decode, prefill = load_profile("h100-sxm"), StepShape.of([(1, 100)] * 16), StepShape.of([(512, 512)])
    for parallel, step, slower in ((Parallel(tp=8), decode, False), (Parallel(tp=8, ep=True), prefill, True)):
        base = CostModel(h100, mixtral, parallel).cost(step).total_s
        priced = CostModel(h100, skewed, parallel).cost(step).total_s
        assert (priced > base) if slower else (priced < base), parallel


def test_simulate_and_plan_take_an_expert_load(tmp_path, capsys):
    path = _write(tmp_path, {"source": "a hand-made hot expert", "layers": HOT})
    common = ["--model", "mixtral-8x7b", "--num-prompts", "16", "--input-len", "128", "--output-len", "16", "--json"]
    rows = {}
    for load in ([], ["--expert-load", str(path)]):
        assert main(["simulate", "--device", "h100-sxm", "-tp", "8", "--enable-expert-parallel", *common, *load]) == 0
        rows[bool(load)] = json.loads(capsys.readouterr().out)[0]["output_throughput_tok_s"]
    assert rows[True] < rows[False]
    assert main(["plan", "--device", "h100-sxm", "--num-devices", "8", "--expert-load", str(path),
                 *common[:-1]]) == 0
    assert "expert routing measured (a hand-made hot expert)" in capsys.readouterr().out


BAD = [
    ("[1, 2]", "expected"),
    ("{not json", "is not valid JSON"),
    ({"layers": [1, 2, 3]}, "layer 0 has 3 entries; the model has 8 experts"),
    ({"layers": [[1] * 8] * 3}, "3 layer lists for a model with 32 MoE layers"),
    ({"layers": [1, 1, 1, 1, 1, 1, 1, -1]}, "finite, non-negative and not all zero"),
    ({"layers": [0] * 8}, "finite, non-negative and not all zero"),
    ({"layers": [10, 1, 1, 1, 1, 1, 1, 1]}, "expert 0 has 10 of 17 choices, more than 1/top_k = 1/2"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m for _, m in BAD])
def test_a_bad_expert_load_is_refused_by_what_is_wrong(mixtral, tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as caught:
        with_expert_load(mixtral, path)
    assert str(path) in str(caught.value)


def test_an_expert_load_needs_a_moe_model_and_a_file(mixtral, tmp_path):
    with pytest.raises(ValueError, match="has no routed experts"):
        with_expert_load(load_model_shape("llama-3-8b"), _write(tmp_path, {"layers": HOT}))
    with pytest.raises(FileNotFoundError, match="no such file"):
        with_expert_load(mixtral, tmp_path / "missing.json")
    assert math.isclose(sum(from_counts(HOT, 8, 2, 1).shares[0]), 2.0)

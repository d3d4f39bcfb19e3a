"""Measured expert routing (``--expert-load``): experts touched, the busiest expert-parallel chip, the file's
refusals, worked by hand. Mixtral-8x7B: 32 MoE layers of 8 experts, top 2."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator import load_model_shape, load_profile
from maia_serving.emulator.cost.efficiency import expert_imbalance
from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel, StepShape
from maia_serving.emulator.cost.routing import from_counts
from maia_serving.emulator.memory import ServingConfig, weight_bytes_per_chip
from maia_serving.emulator.model_shape import MoE, with_expert_load
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic

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
        (expert_imbalance(4096, 2, 8, 1) + 3367.225 / 1024) / 2, rel=1e-5
    )


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
    assert main(["plan", "--device", "h100-sxm", "--num-devices", "8", "--expert-load", str(path), *common[:-1]]) == 0
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


def test_experts_that_do_not_divide_go_one_more_to_the_first_chips():
    """10 experts over 4 chips: 3, 3, 2, 2, as vLLM's determine_expert_map places them (linear)."""
    load = from_counts([1] * 10, 10, 2, 1)
    assert [len(chip) for chip in load.placed(4)[0]] == [3, 3, 2, 2]


def test_eplb_places_a_hot_expert_by_hand():
    """HOT over 4 chips, 2 each. Linear: chip 0 holds experts 0 and 1, half the choices. EPLB without redundant
    experts packs the heaviest first onto the lightest chip with room: 0.8 | 0.2 | 0.2 | 0.2, then 0.2 to chip 1
    and 0.2 to chip 2 (ties to the lower chip), 0.1 to chip 3, the last 0.1 to chip 0: 0.9, 0.4, 0.4, 0.3 of 2.
    Four redundant experts all go to expert 0 (0.8 -> 0.4 -> 0.267 -> 0.2, then the tie at 0.2 to the lowest
    index): five replicas of 0.16; 12 over 4 chips, 3 each: 0.5, 0.52, 0.52, 0.46."""
    load = from_counts(HOT, 8, 2, 1)
    assert load.chip_shares(4)[0] == pytest.approx((0.5, 0.2, 0.2, 0.1), rel=1e-12)
    assert load.placed(4, 0)[0] == ((0.8, 0.1), (0.2, 0.2), (0.2, 0.2), (0.2, 0.1))
    assert load.chip_shares(4, 0)[0] == pytest.approx((0.45, 0.2, 0.2, 0.15), rel=1e-12)
    want = ((0.2, 0.2, 0.1), (0.2, 0.16, 0.16), (0.2, 0.16, 0.16), (0.2, 0.16, 0.1))
    for chip, shares in zip(load.placed(4, 4)[0], want):
        assert chip == pytest.approx(shares, rel=1e-12)
    assert load.chip_shares(4, 4)[0] == pytest.approx((0.25, 0.26, 0.26, 0.23), rel=1e-12)
    # The busiest chip of 4,096 tokens (8,192 draws, a mean chip's 2,048; spread sqrt(2 ln 4) = 1.66511):
    # linear, chip 0 at 0.5: (4096 + sqrt(8192 x 0.25) x 1.66511) / 2048 = 2.0368x the mean rows; EPLB, 0.45:
    # 1.8366x; with redundant experts, 0.26: 1.0723x.
    factors = [expert_imbalance(4096, 2, 4, 2, load.chip_shares(4, r)) for r in (None, 0)]
    factors.append(expert_imbalance(4096, 2, 4, 3, load.chip_shares(4, 4)))
    assert factors == pytest.approx([2.0368, 1.8366, 1.0723], abs=1e-4)


def test_before_it_rearranges_eplb_holds_vllms_initial_map():
    """HOT over 4 chips with 4 redundant experts, before any rearrangement: vLLM's initial map is experts 0-7,
    then replicas of experts 0-3, the 12 slots in order, 3 a chip; experts 0-3 each split over two replicas."""
    load = from_counts(HOT, 8, 2, 1)
    assert load.placed(4, 4, rearranged=False)[0] == (
        (0.4, 0.1, 0.1),
        (0.1, 0.2, 0.2),
        (0.1, 0.1, 0.4),
        (0.1, 0.1, 0.1),
    )
    assert load.placed(4, 0, rearranged=False) == load.placed(4)  # no replicas: the linear placement
    # As many replicas as experts: i % E, every expert twice, each chip the whole layer at half its shares.
    half = tuple(p / 2 for p in load.shares[0])
    assert load.placed(2, 8, rearranged=False)[0] == (half, half)


def test_simulate_serves_the_initial_map_until_eplb_rearranges(tmp_path, capsys):
    """A fresh vLLM server's EPLB balances a quarter of step_interval steps in: a run shorter than that is served
    by the initial map throughout (the linear placement, with no replicas); with an interval of 40, the first 10
    steps are and every later one is balanced, cheaper for the same shapes (a static batch schedules alike)."""
    counts = [1000 / (r + 10) for r in range(128)]
    model = with_expert_load(load_model_shape("qwen3-30b-a3b"), _write(tmp_path, {"source": "test", "layers": counts}))
    h100, requests = load_profile("h100-sxm"), synthetic(16, 256, 32)
    ep = dict(tensor_parallel_size=8, enable_expert_parallel=True)
    linear = simulate_device(h100, model, ServingConfig(**ep), requests).steps.work_s
    fresh = simulate_device(h100, model, ServingConfig(**ep, enable_eplb=True), requests)
    assert fresh.eplb_initial_steps == len(fresh.steps.work_s) < 750 and fresh.steps.work_s == linear
    quick = simulate_device(h100, model, ServingConfig(**ep, enable_eplb=True, eplb_step_interval=40), requests)
    assert quick.eplb_initial_steps == 10 and quick.steps.work_s[:10] == linear[:10]
    assert all(q < w for q, w in zip(quick.steps.work_s[10:], linear[10:]))
    assert simulate_device(h100, model, ServingConfig(**ep), requests).eplb_initial_steps is None
    with pytest.raises(ValueError, match="step_interval must be a whole number of steps, at least 1"):
        ServingConfig(**ep, enable_eplb=True, eplb_step_interval=0)
    # The CLI says which map served, and takes vLLM's spelling of the interval.
    run = [
        "simulate",
        "--model",
        "qwen3-30b-a3b",
        "--device",
        "h100-sxm",
        "-tp",
        "8",
        "-ep",
        "--enable-eplb",
        "--num-prompts",
        "16",
        "--input-len",
        "256",
        "--output-len",
        "32",
    ]
    assert main(run) == 0
    assert "EPLB never rearranged: all" in capsys.readouterr().out
    assert main([*run, "--eplb-config", '{"step_interval": 40}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["eplb_initial_steps"] == 10
    with pytest.raises(SystemExit):
        main([*run, "--eplb-config", '{"step_interval": 0}'])
    assert "step_interval must be a whole number, at least 1" in capsys.readouterr().err


def test_eplb_of_uniform_routing_changes_nothing_but_the_replicas(mixtral):
    """Without a measured load EPLB balances uniform routing: no redundant experts, the linear placement's
    price; 8 redundant experts (two replicas of each, two a chip of 8) each chip reads two experts' weights
    where it read one, and holds them."""
    h100, decode = load_profile("h100-sxm"), StepShape.of([(1, 100)] * 64)
    linear = CostModel(h100, mixtral, Parallel(tp=8, ep=True)).cost(decode)
    assert CostModel(h100, mixtral, Parallel(tp=8, ep=True, eplb=0)).cost(decode) == linear
    replicated = CostModel(h100, mixtral, Parallel(tp=8, ep=True, eplb=8)).cost(decode)
    assert replicated.memory_s > 1.5 * linear.memory_s
    experts = 32 * 3 * 4096 * 14336 * 2  # one expert in every layer
    one = weight_bytes_per_chip(mixtral, ServingConfig(tensor_parallel_size=8, enable_expert_parallel=True))
    two = weight_bytes_per_chip(
        mixtral,
        ServingConfig(tensor_parallel_size=8, enable_expert_parallel=True, enable_eplb=True, num_redundant_experts=8),
    )
    assert two - one == pytest.approx(experts, rel=1e-9)


def test_eplb_wins_back_a_measured_imbalance(tmp_path):
    """Qwen3-30B-A3B on 8 H100s with a skewed per-layer load: a prefill of 4,096 tokens waits for a busiest chip
    that EPLB's placement evens out, and redundant experts even it further."""
    model = load_model_shape("qwen3-30b-a3b")
    counts = [[1000 / (r + 10) for r in range(128)][:: 1 if i % 2 else -1] for i in range(model.num_moe_layers)]
    skewed = with_expert_load(model, _write(tmp_path, {"source": "test", "layers": counts}))
    h100, prefill = load_profile("h100-sxm"), StepShape.of([(4096, 4096)])
    times = [CostModel(h100, skewed, Parallel(tp=8, ep=True, eplb=r)).cost(prefill).total_s for r in (None, 0, 8)]
    assert times[1] < times[0]
    busiest = [CostModel(h100, skewed, Parallel(tp=8, ep=True, eplb=r))._busiest_factor(4096) for r in (None, 0, 8)]
    assert busiest[0] > 1.3 > 1.1 > busiest[1] >= busiest[2] >= 1.0


def test_eplb_balances_a_grouped_model_per_node_across_nodes():
    """DeepSeek-V2-Lite's measured load as if its 64 experts were DeepSeek-V3's 8 groups, on 16 H100s (2 nodes
    of 8): vLLM's EPLB packs whole groups onto each node before it balances the node's chips, so the busiest chip
    carries more than the global policy would give it; on one node the groups change nothing."""
    data = Path(__file__).parents[4] / "benchmarks" / "data" / "expert-load-esft-vanilla-lite.json"
    model = with_expert_load(load_model_shape("deepseek-v2-lite"), data)
    grouped = replace(model, moe=replace(model.moe, num_groups=8))
    h100, two_nodes = load_profile("h100-sxm"), Parallel(tp=8, dp=2, ep=True, eplb=0)
    assert CostModel(h100, grouped, two_nodes)._chip_shares == model.moe.load.chip_shares(16, 0, True, 8, 2)
    busiest = [CostModel(h100, m, two_nodes)._busiest_factor(4096) for m in (model, grouped)]
    assert busiest[1] > busiest[0] * 1.001
    one_node = Parallel(tp=8, ep=True, eplb=0)
    assert CostModel(h100, grouped, one_node)._chip_shares == CostModel(h100, model, one_node)._chip_shares


@pytest.mark.parametrize(
    ("parallel", "config", "message"),
    [
        (Parallel(tp=8, ep=True, eplb=3), None, r"8 experts \+ 3 redundant do not divide over 8"),
        (Parallel(ep=True, eplb=0), None, "needs tensor or data parallelism"),
        (None, dict(tensor_parallel_size=8, enable_eplb=True), "add --enable-expert-parallel"),
        (None, dict(tensor_parallel_size=8, enable_expert_parallel=True, num_redundant_experts=8), "without EPLB"),
    ],
)
def test_eplb_refuses_what_vllm_refuses(mixtral, parallel, config, message):
    with pytest.raises(ValueError, match=message):
        CostModel(load_profile("h100-sxm"), mixtral, parallel) if parallel else ServingConfig(**config)


def test_eplb_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="dense model"):
        CostModel(load_profile("h100-sxm"), load_model_shape("llama-3-8b"), Parallel(tp=2, ep=True, eplb=0))


def test_simulate_and_plan_take_vllms_eplb_flags(tmp_path, capsys):
    eplb = ["--enable-eplb", "--eplb-config", '{"num_redundant_experts": 8, "window_size": 500}']
    assert (
        main(
            [
                "simulate",
                "--model",
                "mixtral-8x7b",
                "--device",
                "h100-sxm",
                "-tp",
                "8",
                "-ep",
                *eplb,
                "--num-prompts",
                "16",
                "--input-len",
                "128",
                "--output-len",
                "8",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fits"] and rows[0]["output_throughput_tok_s"] > 0
    # 6 devices: EP over 6 chips cannot hold 8 + 2 experts evenly (a reason), over 2 it can.
    assert (
        main(
            [
                "plan",
                "--model",
                "mixtral-8x7b",
                "--device",
                "h100-sxm",
                "--num-devices",
                "6",
                "--enable-eplb",
                "--eplb-config",
                '{"num_redundant_experts": 2}',
                "--num-prompts",
                "8",
                "--json",
            ]
        )
        == 0
    )
    layouts = json.loads(capsys.readouterr().out)
    refused = {(r["tp"], r["dp"]): r["reason"] for r in layouts if r["ep"] and not r["fits"]}
    assert any("do not divide over 6" in reason for reason in refused.values())
    assert any(r["ep"] and r["fits"] and r["tp"] * r["dp"] == 2 for r in layouts)  # 10 over 2 divides
    assert {r["eplb"] for r in layouts if r["ep"]} == {2} and {r["eplb"] for r in layouts if not r["ep"]} == {None}
    # 8 requests end long before a fresh server's first rearrangement (750 steps); an interval of 4 makes it the
    # first step's end.
    assert {r["eplb_rearranged"] for r in layouts if r["ep"] and r["fits"]} == {False}
    assert {r["eplb_rearranged"] for r in layouts if not r["ep"]} == {None}
    assert (
        main(
            [
                "plan",
                "--model",
                "mixtral-8x7b",
                "--device",
                "h100-sxm",
                "--num-devices",
                "2",
                "--enable-eplb",
                "--eplb-config",
                '{"num_redundant_experts": 2, "step_interval": 4}',
                "--num-prompts",
                "8",
                "--json",
            ]
        )
        == 0
    )
    assert {r["eplb_rearranged"] for r in json.loads(capsys.readouterr().out) if r["ep"] and r["fits"]} == {True}
    with pytest.raises(SystemExit):
        main(
            [
                "simulate",
                "--model",
                "mixtral-8x7b",
                "--device",
                "h100-sxm",
                "-tp",
                "8",
                "-ep",
                "--enable-eplb",
                "--eplb-config",
                '{"num_redundant_expert": 8}',
                "--num-prompts",
                "4",
            ]
        )
    assert "unknown key(s) num_redundant_expert" in capsys.readouterr().err
    for command in (["simulate", "-tp", "8", "-ep"], ["plan", "--num-devices", "8"]):  # both refuse them alike
        assert (
            main(
                [
                    *command,
                    "--model",
                    "mixtral-8x7b",
                    "--device",
                    "h100-sxm",
                    "--eplb-config",
                    '{"num_redundant_experts": 8}',
                    "--num-prompts",
                    "4",
                ]
            )
            == 2
        )
        assert "num_redundant_experts=8 without EPLB" in capsys.readouterr().err


def test_uniform_routing_over_uneven_chips_waits_for_the_fuller_chip(mixtral):
    """8 experts over dp=3 chips under EP: vLLM places 3, 3 and 2. Uniform routing sends each of the first two
    chips 3/8 of the draws, not a third, and they read 3 experts' weights: 16 tokens a replica (48 in all)
    touch 3 (1 - 0.75^48) experts there, against the mean chip's 8/3 of them."""
    costs = CostModel(load_profile("h100-sxm"), mixtral, Parallel(dp=3, ep=True))
    rows, experts = costs._routing(16)
    assert experts == pytest.approx(3 * (1 - 0.75**48), rel=1e-12)
    assert rows == pytest.approx(16 * expert_imbalance(48, 2, 3, 3, ((3 / 8, 3 / 8, 2 / 8),)), rel=1e-12)
    assert rows > 16 * expert_imbalance(48, 2, 3, 8 / 3)  # the even-chips formula


# The expert-load files benchmarks/README.md prices, with the model each is for.
BENCHMARK_LOADS = {
    "expert-load-one-hot-expert.json": "mixtral-8x7b",
    "expert-load-zipf-qwen3-30b-a3b.json": "qwen3-30b-a3b",
    "expert-load-esft-vanilla-lite.json": "deepseek-v2-lite",
    "expert-load-esft-vanilla-lite-translation.json": "deepseek-v2-lite",
}


@pytest.mark.parametrize("name", sorted(BENCHMARK_LOADS))
def test_the_benchmarks_expert_loads_load_for_their_model_and_name_their_source(name):
    data = Path(__file__).parents[4] / "benchmarks" / "data"
    assert sorted(p.name for p in data.glob("expert-load-*.json")) == sorted(BENCHMARK_LOADS)
    model = with_expert_load(load_model_shape(BENCHMARK_LOADS[name]), data / name)
    assert len(model.moe.load.source) > 40  # where the counts come from, and whether they are measured


def test_the_measured_deepseek_load_counts_every_choice():
    """26 MoE layers of 64 experts, each row the top-6 choices of the 33,279 tokens of ESFT's four tasks."""
    data = json.loads(
        (Path(__file__).parents[4] / "benchmarks" / "data" / "expert-load-esft-vanilla-lite.json").read_text()
    )
    assert len(data["layers"]) == 26 and {len(layer) for layer in data["layers"]} == {64}
    assert {sum(layer) for layer in data["layers"]} == {6 * 33_279}

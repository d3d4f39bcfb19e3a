"""Expert and data parallelism: the all-to-all, where the experts sit, what a MoE layer moves, worked by hand.

Maia 100: a mesh of 4, 150 GB/s a pair, 5 us a hop, no per-collective latency; 150 GB/s a chip to the
scale-out switches, 10 us. H100 SXM: NVSwitch of 8, 450 GB/s a GPU, 0.6 us a step and 6.6 us a collective;
``@pcie``: 64 GB/s, 1 us. Mixtral-8x7B: hidden 4096, 32 MoE layers of 8 experts (top 2) of width 14336, BF16.
"""

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.cost.efficiency import expert_imbalance
from maia_serving.emulator.cost.interconnect import all_gather, all_to_all
from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel, StepShape
from maia_serving.emulator.cost.terms import op_terms
from maia_serving.emulator.memory import weight_bytes_per_chip
from maia_serving.emulator.sim.plan import label, layouts, plan
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic

US = 1e-6
N = 64e6
HIDDEN = 4096 * 2  # one token's hidden state in BF16, bytes


@pytest.fixture(scope="module")
def mixtral():
    return load_model_shape("mixtral-8x7b")


A2A_CASES = [
    # Each chip sends N / 4 = 16 MB to each of 3 peers at once over their pair links: 5 us + 16 MB / 150 GB/s.
    ("maia100", 4, (5 + 106.6667) * US),
    # Through NVSwitch all 7 shares of 8 MB leave through one GPU's 450 GB/s: 6.6 + 0.6 + 56 MB / 450 GB/s.
    ("h100-sxm", 8, (6.6 + 0.6 + 124.4444) * US),
    ("h100-sxm@pcie", 8, (6.6 + 1 + 875) * US),
    # Two Maia 100 nodes, shares of 8 MB: in the node 5 us + 8 MB / 150 GB/s, to the 4 chips of the other node
    # 10 us + 32 MB / 150 GB/s through the chip's NICs, the two at once: the longer.
    ("maia100", 8, (10 + 213.3333) * US),
]


@pytest.mark.parametrize(("profile", "group", "seconds"), A2A_CASES, ids=[f"{c[0]}-{c[1]}" for c in A2A_CASES])
def test_all_to_all_on_each_topology_by_hand(profile, group, seconds):
    chosen = all_to_all(load_profile(profile).network, N, group)
    assert chosen.algorithm == "direct"
    assert chosen.time_s == pytest.approx(seconds, rel=1e-5)


def test_a_group_with_one_chip_a_node_goes_over_the_scale_out_tier():
    """Data parallelism's group of 4 Maia 100 replicas of 4 chips: one chip on each node, so the all-gather is a
    ring of 3 steps of 16 MB over the scale-out NICs, 3 (10 + 106.667) us, not the node's direct exchange."""
    net = load_profile("maia100").network
    spread = all_gather(net, N, 4, per_node=1)
    assert (spread.algorithm, spread.time_s) == ("ring", pytest.approx(3 * (10 + 106.6667) * US, rel=1e-5))
    assert all_gather(net, N, 4).time_s == pytest.approx((5 + 106.6667) * US, rel=1e-5)
    assert all_to_all(net, 0, 4).time_s == all_to_all(net, N, 1).time_s == 0.0


def test_expert_parallelism_keeps_experts_whole_and_gives_a_chip_its_share_of_the_routed_rows(mixtral):
    """tp=2: without EP each chip holds half of every expert's width and runs all top-2 rows of each token; with
    EP it holds 4 whole experts and runs the 2/2 = 1 row a token routes to it on average. The FLOPs are the
    same; one expert touched reads 2x the bytes, and half as many of this chip's experts are touched."""
    split = {t.name: t for t in op_terms(mixtral, Parallel(tp=2))}
    whole = {t.name: t for t in op_terms(mixtral, Parallel(tp=2, ep=True))}
    up_split, up_whole = split["experts.gate_up_proj"], whole["experts.gate_up_proj"]
    assert up_split.gemm_rows[0] == 2 and up_whole.gemm_rows[0] == 1
    assert up_split.gemm_n == 14336 and up_whole.gemm_n == 2 * 14336
    assert up_split.flops[0] == up_whole.flops[0] == 32 * 2 * 4096 * 2 * 14336
    assert up_whole.bytes[7] == 2 * up_split.bytes[7] == 32 * 4096 * 2 * 14336 * 2  # per expert touched
    one = StepShape.of([(1, 100)])
    cost_split = CostModel(load_profile("h100-sxm"), mixtral, Parallel(tp=2)).cost(one, detail=True)
    cost_whole = CostModel(load_profile("h100-sxm"), mixtral, Parallel(tp=2, ep=True)).cost(one, detail=True)
    read = {c.name: c.bytes for c in cost_whole.ops}
    assert read["experts.gate_up_proj"] == pytest.approx(
        {c.name: c.bytes for c in cost_split.ops}["experts.gate_up_proj"], rel=1e-3
    )


def test_the_busiest_expert_chip_sets_the_layers_rows_by_hand():
    """Uniform routing over 8 chips of one expert each. One token: 2 draws, the mean chip runs 1/4 of a row, the
    busiest 1 (the cap: a chip holding one expert runs one row a token): 4x. 16 tokens: 32 draws, mean 4, sigma
    sqrt(32 x 1/8 x 7/8) = 1.871, times sqrt(2 ln 8) = 2.039: 7.815 rows, 1.954x. 4,096 tokens: mean 1,024,
    sigma 29.93: 1,085.0 rows, 1.060x. One chip, or no tokens: 1."""
    assert expert_imbalance(1, 2, 8, 1) == 4.0
    assert expert_imbalance(16, 2, 8, 1) == pytest.approx(7.815 / 4, rel=1e-3)
    assert expert_imbalance(4096, 2, 8, 1) == pytest.approx(1085.04 / 1024, rel=1e-4)
    assert expert_imbalance(100, 2, 1, 8) == 1.0 and expert_imbalance(0, 2, 8, 1) == 1.0


def test_under_expert_parallelism_a_step_runs_the_busiest_chips_rows(mixtral):
    """16 decode tokens, tp=8: with EP the routed experts' FLOPs are the busiest chip's (1.954x the mean 1/4 row a
    token); split in width every chip runs every row alike, and the router is no routed expert."""
    h100, step = load_profile("h100-sxm"), StepShape.of([(1, 100)] * 16)
    for parallel, factor in ((Parallel(tp=8, ep=True), expert_imbalance(16, 2, 8, 1)), (Parallel(tp=8), 1.0)):
        ops = {c.name: c for c in CostModel(h100, mixtral, parallel).cost(step, detail=True).ops}
        terms = {t.name: t for t in op_terms(mixtral, parallel)}
        for name in ("experts.gate_up_proj", "experts.down_proj", "router"):
            scale = factor if name.startswith("experts.") else 1.0
            assert ops[name].flops == pytest.approx(terms[name].flops[0] * 16 * scale, rel=1e-12), (parallel, name)


def test_with_replicas_every_replicas_tokens_reach_the_experts(mixtral):
    """dp=4 tp=1: without EP each chip runs the 4 replicas' tokens on a quarter of each expert (8 rows a token of
    this replica); with EP the 8 experts spread 2 a chip and it runs 4 * 2 / 4 = 2 rows a token."""
    assert {t.name: t for t in op_terms(mixtral, Parallel(dp=4))}["experts.down_proj"].gemm_rows[0] == 8
    assert {t.name: t for t in op_terms(mixtral, Parallel(dp=4, ep=True))}["experts.down_proj"].gemm_rows[0] == 2


def test_expert_weights_per_chip_whole_experts_round_up(mixtral):
    """8 experts over dp=3: split, a chip holds a third of each; whole, the first chips hold 3 (ceil(8/3)) of 8.
    The rest (attention, router, embeddings) is each replica's own and the same either way."""
    experts = 32 * 8 * 3 * 4096 * 14336 * 2  # bytes of all routed experts
    split = weight_bytes_per_chip(mixtral, ServingConfig(data_parallel_size=3))
    whole = weight_bytes_per_chip(mixtral, ServingConfig(data_parallel_size=3, enable_expert_parallel=True))
    assert whole - split == pytest.approx(experts * (3 / 8 - 1 / 3), rel=1e-9)
    one = weight_bytes_per_chip(mixtral, ServingConfig())
    assert one - split == pytest.approx(experts * (1 - 1 / 3), rel=1e-9)


MOVE_CASES = [
    # 100 tokens a replica, Maia 100 (one node of 4). dp=4 tp=1, the default backend: all-gather of 4 x 100
    # tokens' hidden states and 8 router logits (4 * 100 * 8208 B) in a direct phase, 5 us + 3.2832 MB / 4 / 150
    # GB/s, and the reduce-scatter of 4 * 100 * 8192 B back, 5 us + 3.2768 MB / 4 / 150 GB/s.
    (Parallel(dp=4, ep=True), (5 + 5.472) + (5 + 5.461333)),
    # DeepEP: each chip sends its 100 tokens' 2 routed hidden states (1.6384 MB), a quarter staying, to its peers
    # and back: 2 (5 us + 409.6 KB / 150 GB/s).
    (Parallel(dp=4, ep=True, all2all="deepep_high_throughput"), 2 * (5 + 2.730667)),
    # dp=2 tp=4 on two nodes: the replicas' group has one chip a node, so a ring of 2 over the NICs each way:
    # (10 us + 1.6416 MB / 2 / 150 GB/s) + (10 us + 1.6384 MB / 2 / 150 GB/s).
    (Parallel(tp=4, dp=2), (10 + 5.472) + (10 + 5.461333)),
    # Sequence-parallel MoE (ep, tp=2, dp=2): the gather and scatter run over the 4 chips of the EP group,
    # (5 + 1.6416 MB / 4 / 150 GB/s) + (5 + 1.6384 MB / 4 / 150 GB/s), and the tensor-parallel all-gather of the
    # 100 tokens' output (5 us + 819.2 KB / 2 / 150 GB/s) replaces the layer's one-shot all-reduce (5 us +
    # 819.2 KB / 150 GB/s).
    (Parallel(tp=2, dp=2, ep=True), (5 + 2.736) + (5 + 2.730667) + (5 + 2.730667) - (5 + 5.461333)),
    # One replica: no all2all at all.
    (Parallel(tp=4, ep=True), 0.0),
]


@pytest.mark.parametrize(("parallel", "us"), MOVE_CASES, ids=[str(i) for i in range(len(MOVE_CASES))])
def test_what_a_moe_layer_moves_between_replicas_by_hand(mixtral, parallel, us):
    assert CostModel(load_profile("maia100"), mixtral, parallel).moe_layer_s(100) == pytest.approx(us * US, rel=1e-5)


def test_the_step_charges_each_moe_layers_moves_on_every_stage(mixtral):
    """comm_s adds 32 layers' moves to what one replica's collectives cost; with 2 stages each carries its 16."""
    m100 = load_profile("maia100")
    alone, replicated = CostModel(m100, mixtral, Parallel(tp=2)), CostModel(m100, mixtral, Parallel(tp=2, dp=2))
    assert replicated.comm_s(100, 4) - alone.comm_s(100, 4) == pytest.approx(32 * replicated.moe_layer_s(100))
    staged = CostModel(m100, mixtral, Parallel(tp=2, pp=2, dp=2))
    flat = CostModel(m100, mixtral, Parallel(tp=2, pp=2))
    step = StepShape.of([(1, 500)] * 100)
    extra = staged.cost(step).comm_s - flat.cost(step).comm_s
    assert extra == pytest.approx(32 * staged.moe_layer_s(100), rel=1e-9)


def test_a_dense_model_and_one_replica_move_nothing_more():
    llama = load_model_shape("llama-3-8b")
    m100 = load_profile("maia100")
    assert CostModel(m100, llama, Parallel(tp=2, dp=2, ep=True)).moe_layer_s(100) == 0.0
    step = StepShape.of([(1, 300)] * 8)
    assert (
        CostModel(m100, llama, Parallel(tp=2, dp=2)).cost(step).total_s
        == CostModel(m100, llama, Parallel(tp=2)).cost(step).total_s
    )


def test_faster_links_never_make_expert_parallelism_slower(mixtral):
    step = StepShape.of([(1, 800)] * 64)
    slow = CostModel(load_profile("h100-sxm@pcie"), mixtral, Parallel(tp=2, dp=4, ep=True)).cost(step)
    fast = CostModel(load_profile("h100-sxm"), mixtral, Parallel(tp=2, dp=4, ep=True)).cost(step)
    assert fast.comm_s < slow.comm_s


def test_replicas_share_the_requests_and_the_report_covers_all_of_them(mixtral):
    """dp=2: requests dealt in turn to two replicas, each with its own KV cache; every request has its timing."""
    requests = synthetic(9, 256, 8)
    sim = simulate_device(
        load_profile("h100-sxm"), mixtral, ServingConfig(tensor_parallel_size=2, data_parallel_size=2), requests
    )
    assert sim.replicas == 2 and len(sim.timings) == 9
    assert all(t.num_output_tokens == 8 for t in sim.timings)
    alone = simulate_device(load_profile("h100-sxm"), mixtral, ServingConfig(tensor_parallel_size=2), requests[::2])
    assert sum(sim.steps.num_tokens) == sum(alone.steps.num_tokens)  # the first replica served requests 0, 2, ...


def test_plan_tries_replicas_and_expert_parallelism_for_a_moe_model(mixtral):
    """Of 2 chips: tp=2 and dp=2 each with and without EP; pp=2 leaves each stage's experts one chip, so no EP."""
    assert layouts(2, moe=True) == [
        Parallel(2, 1),
        Parallel(2, 1, ep=True),
        Parallel(1, 2),
        Parallel(1, 1, 2),
        Parallel(1, 1, 2, ep=True),
    ]
    assert label(2, 1, 4, ep=True) == "tp2 pp1 dp4 ep"
    rows = plan([load_profile("h100-sxm")], mixtral, 4, ServingConfig(max_model_len=4096), synthetic(8, 256, 8))
    assert {(r.tp, r.pp, r.dp, r.ep) for r in rows} == {(x.tp, x.pp, x.dp, x.ep) for x in layouts(4, moe=True)}
    assert any(r.fits and r.dp == 4 and r.ep for r in rows)
    assert all(r.reason for r in rows if not r.fits)


def test_simulate_takes_vllms_flags(capsys):
    code = main(
        [
            "simulate",
            "--model",
            "mixtral-8x7b",
            "--device",
            "h100-sxm",
            "-tp",
            "2",
            "-dp",
            "4",
            "-ep",
            "--all2all-backend",
            "deepep_low_latency",
            "--num-prompts",
            "8",
            "--input-len",
            "128",
            "--output-len",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "tp=2, pp=1, dp=4 (deepep_low_latency), expert parallel" in out
    with pytest.raises(SystemExit):
        main(["simulate", "--model", "mixtral-8x7b", "--device", "h100-sxm", "--all2all-backend", "pplx"])
    assert "invalid choice: 'pplx'" in capsys.readouterr().err

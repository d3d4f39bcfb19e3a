"""Pipeline parallelism: each stage's share of a step by hand, and vLLM's batch queue in the simulator."""

from types import SimpleNamespace

import pytest

from maia_serving.emulator import load_model_shape, load_profile
from maia_serving.emulator.cost.layout import Parallel, stage_layers
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.sim.report import summarize
from maia_serving.emulator.sim.scheduler import SchedulerConfig
from maia_serving.emulator.sim.simulate import simulate, through_stages
from maia_serving.emulator.sim.workload import Request


class StagedCosts:
    """A stand-in two-stage cost model: every batch takes ``stages`` seconds on each stage and ``hop`` between."""

    parallel = Parallel(pp=2)

    def __init__(self, stages: tuple[float, float], hop: float):
        self.stages, self.hop = stages, hop

    def cost_of(self, new_tokens, context_lens):
        return SimpleNamespace(
            total_s=sum(self.stages) + self.hop, comm_s=self.hop, stages=self.stages, hops=(self.hop,)
        )


def _two_requests_one_prefill_a_batch():
    """A and B, 4 prompt tokens each, 3 output tokens; a budget of 4 tokens puts each prefill in its own batch,
    so the two requests alternate between the two batches in flight."""
    config = SchedulerConfig(num_blocks=100, block_size=4, max_num_batched_tokens=4, enable_prefix_caching=False)
    return [Request(0.0, 4, 3), Request(0.0, 4, 3)], config


def test_stages_split_the_layers_as_vllm_does():
    """get_pp_indices: 80 / 3 = 26 each, the remainder 2 to the stages before the last."""
    assert stage_layers(80, 4) == (20, 20, 20, 20)
    assert stage_layers(80, 3) == (27, 27, 26)
    assert stage_layers(32, 1) == (32,)
    with pytest.raises(ValueError, match="a model of 32 layers takes 1 to 32 stages"):
        stage_layers(32, 33)


def test_a_decode_step_on_two_stages_by_hand(llama8b, maia100, golden):
    """The golden two-sequence decode on Maia 100, split in 2 stages of 16 layers.

    All memory-bound. The last stage also runs the final norm and LM head: the final norm's weight
    (4096 * 2 B), the LM head's weight, and per sequence the norm's read and write and the LM head's input
    and logits; the first stage the embedding gather, 4096 * 2 B per token. The layers take what is left of
    the golden step's bytes, half on each stage. Kernels: 9 a layer, so 9 * 16 + 1 = 145 on the first stage
    and 9 * 16 + 2 = 146 on the last, 5 us each. The hidden states and the residual of 2 tokens, 2 * 2 * 4096 *
    2 B, go over the pair's links of the mesh: 5 us + 32,768 B / 150 GB/s.
    """
    step = golden["decode"]
    cost = CostModel(maia100, llama8b, Parallel(pp=2)).cost_of(step.new_tokens, step.context_lens)
    bytes_per_s = 1.8e12 * 0.75
    per_seq = 2 * 4096 * 2 + (4096 + 128256) * 2  # the final norm's read and write, the LM head's input and logits
    first = 2 * 4096 * 2 / bytes_per_s
    last = (4096 * 2 + 4096 * 128256 * 2 + 2 * per_seq) / bytes_per_s
    layers = step.memory_s - first - last
    hop = 5e-6 + 32_768 / 150e9
    assert cost.stages == pytest.approx((layers / 2 + first + 145 * 5e-6, layers / 2 + last + 146 * 5e-6), rel=1e-12)
    assert cost.hops == pytest.approx((hop,), rel=1e-12)
    assert cost.comm_s == pytest.approx(hop, rel=1e-12)
    assert cost.total_s == pytest.approx(step.total_s + hop, rel=1e-12)  # one batch: every layer, and the send


def test_stages_between_nodes_send_over_the_scale_out_tier():
    """Llama-3-70B on 8 Maia 100 as tp=4, pp=2: each stage is a node, so 100 tokens' hidden states and residual
    (2 * 100 * 8192 * 2 B) cross at 10 us + 3,276,800 B / 150 GB/s; as tp=2, pp=4 only the middle send crosses."""
    model, m100 = load_model_shape("llama-3-70b"), load_profile("maia100")
    across, within = 10e-6 + 3_276_800 / 150e9, 5e-6 + 3_276_800 / 150e9
    assert CostModel(m100, model, Parallel(tp=4, pp=2)).hops_s(100) == pytest.approx((across,), rel=1e-12)
    assert CostModel(m100, model, Parallel(tp=2, pp=4)).hops_s(100) == pytest.approx(
        (within, across, within), rel=1e-12
    )


def test_a_batch_waits_for_a_stage_still_busy():
    """Stage 0 free at 1, stage 1 at 3: a batch submitted at 0 runs 1 -> 2, hops 1/2, waits until 3, runs to 4."""
    cost = SimpleNamespace(total_s=2.5, stages=(1.0, 1.0), hops=(0.5,))
    assert through_stages(0.0, cost, (1.0, 3.0)) == (1.0, 4.0, (2.0, 4.0))


def test_two_batches_in_flight_by_hand_the_hops_bound_the_cycle():
    """Stages of 1/4 s, a 1/16 s send: a batch takes 9/16 s. A's prefill runs 0 -> 1/4 -> (5/16) -> 9/16; B's,
    scheduled at once while A is in flight, 1/4 -> 1/2 -> 9/16 -> 13/16. Each request's next batch can only be
    scheduled when its last one is back, so each pair of batches cycles in one batch's latency, 9/16 s, not in
    two slowest stages (1/2 s): the pipeline bubble that the sends leave with two batches in flight. A's tokens
    at 9/16, 18/16, 27/16; B's at 13/16, 22/16, 31/16."""
    requests, config = _two_requests_one_prefill_a_batch()
    sim = simulate(requests, StagedCosts((0.25, 0.25), 0.0625), config)
    a, b = sim.timings
    assert (a.first_token_s, a.last_token_s) == (9 / 16, 27 / 16)
    assert (b.first_token_s, b.last_token_s) == (13 / 16, 31 / 16)
    assert a.tpot_s == b.tpot_s == 9 / 16
    assert sim.steps.start_s == (0.0, 0.25, 9 / 16, 13 / 16, 18 / 16, 22 / 16)
    assert summarize(sim).output_throughput_tok_s == 6 / (31 / 16)


def test_two_batches_in_flight_by_hand_the_slowest_stage_bounds_the_throughput():
    """Stages of 3/8 and 1/8 s, no send, 2 output tokens each: A's prefill leaves at 1/2, B's (stage 0 busy
    until 3/8) at 7/8; A's decode waits for stage 0 until 3/4 and leaves at 5/4, B's at 13/8. Batches leave
    every 3/8 s, the slowest stage, not every 1/4 s (half a batch's latency)."""
    _, config = _two_requests_one_prefill_a_batch()
    requests = [Request(0.0, 4, 2), Request(0.0, 4, 2)]
    sim = simulate(requests, StagedCosts((0.375, 0.125), 0.0), config)
    a, b = sim.timings
    assert (a.first_token_s, a.last_token_s, b.first_token_s, b.last_token_s) == (0.5, 1.25, 0.875, 1.625)
    ends = sorted(start + dur for start, dur in zip(sim.steps.start_s, sim.steps.step_s))
    assert [y - x for x, y in zip(ends, ends[1:])] == [0.375] * 3


def test_one_batch_of_every_request_leaves_the_other_stage_idle():
    """With the whole batch in one step nothing is left to schedule while it is in flight: each step runs
    alone through both stages, the bubble of a pipeline with one batch (tokens at 9/16, 18/16, 27/16)."""
    config = SchedulerConfig(num_blocks=100, block_size=4, enable_prefix_caching=False)
    sim = simulate([Request(0.0, 4, 3), Request(0.0, 4, 3)], StagedCosts((0.25, 0.25), 0.0625), config)
    assert sim.steps.start_s == (0.0, 9 / 16, 18 / 16)
    assert [t.last_token_s for t in sim.timings] == [27 / 16, 27 / 16]


def test_a_tensor_parallel_group_larger_than_a_node_is_priced_over_the_scale_out_tier():
    """Llama-3-70B with tp=8 on Maia 100 (nodes of 4): 100 tokens' hidden states, n = 100 * 8192 * 2 = 1,638,400 B.
    In each node a direct reduce-scatter and all-gather, 2 (5 us + n / 4 / 150 GB/s) = 2 (5 + 2.7307) us; across
    the two nodes each chip's quarter in a ring of 2, 2 (10 us + n / 8 / 150 GB/s) = 2 (10 + 1.3653) us: 38.19 us.
    (A tree across: 2 * 10 us + 2 * n / 4 / 150 GB/s = 25.46 us; a flat ring: 14 (10 + 1.3653) us = 159.1 us.)"""
    cost = CostModel(load_profile("maia100"), load_model_shape("llama-3-70b"), Parallel(tp=8))
    assert cost.all_reduce_s(100) == pytest.approx((2 * (5 + 2.73067) + 2 * (10 + 1.36533)) * 1e-6, rel=1e-5)

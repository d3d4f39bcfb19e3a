"""The shape-aware efficiency model of cost.py, worked by hand: GEMM tiles and waves, the attention floor,
launches hidden behind the device's work (or by a CUDA graph), and the host's time per step.

H100 SXM (profiles/h100-sxm.yaml): BF16 989 TFLOP/s at 70%, 3.35 TB/s at 80%; 64 x 128 GEMM tiles over
132 SMs; a 512-token KV split; 3 us of device time per kernel, 5 us of host time per eager launch, one
10 us graph launch for a decode step of at most 512 sequences; 1 ms of host time per step.
"""

from __future__ import annotations

import dataclasses

import pytest

from maia_serving.emulator import load_model_shape, load_profile
from maia_serving.emulator.cost.efficiency import attention_floor_s, exposed_host_s, gemm_utilization
from maia_serving.emulator.cost.model import CostModel

H100_BF16 = 989e12 * 0.7
H100_BYTES = 3.35e12 * 0.8
KERNELS = 9 * 32 + 3  # Llama-3-8B: nine kernels per layer (residual adds fused into the norms), three outside


@pytest.fixture(scope="module")
def h100():
    return load_profile("h100-sxm")


@pytest.fixture(scope="module")
def llama8b():
    return load_model_shape("llama-3-8b")


def _op(costs: CostModel, name: str, new_tokens: tuple, context_lens: tuple):
    return next(o for o in costs.cost_of(new_tokens, context_lens, detail=True).ops if o.name == name)


@pytest.mark.parametrize(
    "rows, cols, groups, expected",
    [
        # 8 decode rows on 64-row tiles: 48 tiles (one partial wave, filled by split-K), 8 / 64 of the work useful.
        (8, 6144, 1, 8 / 64),
        # A 2048-token prompt: 32 x 48 = 1536 whole tiles in ceil(1536 / 132) = 12 waves: 1536 / 1584.
        (2048, 6144, 1, 1536 / 1584),
        # 200 rows: 4 row tiles (256 rows) x 32 = 128 tiles, one wave: 200 / 256.
        (200, 4096, 1, 200 / 256),
        # MoE: 16 routed rows over 4 experts, 4 rows each on a 64-row tile, 112 column tiles each: 448 tiles in
        # 4 waves of 132. Useful: (16 x 14336) / (448 x 64 x 128) = 1/16, times 448 / 528.
        (16, 14336, 4, 1 / 16 * 448 / 528),
        # Exactly one full wave: 132 tiles of 64 x 128.
        (64 * 132, 128, 1, 1.0),
        (0, 4096, 1, 1.0),
    ],
)
def test_gemm_utilization_by_hand(rows, cols, groups, expected):
    assert gemm_utilization(rows, cols, groups, 64, 128, 132) == pytest.approx(expected, rel=1e-12)


def test_gemm_utilization_never_exceeds_one_and_never_falls_with_full_tiles():
    for rows in range(1, 700, 7):
        u = gemm_utilization(rows, 4096, 1, 64, 128, 132)
        assert 0 < u <= 1
    assert gemm_utilization(64, 4096, 1, 64, 128, 132) == 1.0


def test_attention_floor_and_exposed_host_by_hand():
    # 1 MB streamed by one of 132 units at 1 / 132 of 1 TB/s: 132 us.
    assert attention_floor_s(1e6, 132, 1e12) == pytest.approx(132e-6)
    # The host needs 5 ms to launch what the device runs in 3 ms: the device waits 2 ms; never a negative wait.
    assert exposed_host_s(5e-3, 3e-3) == pytest.approx(2e-3)
    assert exposed_host_s(1e-3, 3e-3) == 0.0


def test_a_decode_gemm_of_eight_rows_is_priced_at_an_eighth_of_the_tile_and_stays_memory_bound(h100, llama8b):
    """qkv of 8 decode tokens: 32 x 2 x 8 x 4096 x 6144 FLOPs at 70% x 8/64 of 989 TFLOP/s = 148.9 us, under the
    32 x 4096 x 6144 x 2 bytes of BF16 weights at 2.68 TB/s = 601 us."""
    qkv = _op(CostModel(h100, llama8b), "qkv_proj", (1,) * 8, (160,) * 8)
    assert qkv.compute_s == pytest.approx(32 * 2 * 8 * 4096 * 6144 / (H100_BF16 * 8 / 64), rel=1e-12)
    assert qkv.compute_s == pytest.approx(148.9e-6, rel=1e-3)
    assert qkv.bound == "memory"


def test_a_small_decode_batch_streams_its_kv_at_the_floor(h100, llama8b):
    """8 sequences at 160 tokens: 8 x 8 KV heads = 64 work items for 132 SMs. The longest item streams one KV head
    of 160 tokens in 32 layers: 160 x (2 x 128 x 2 B) x 32 = 2,621,440 B; at 1/132 of 2.68 TB/s, 129.1 us, twice
    the attention's bytes / bandwidth: 32 x (8 x 160 x 4096 + 8 x (4096 + 32 x 256 x 2)) = 173,015,040 B, 64.6 us."""
    attention = _op(CostModel(h100, llama8b), "attention", (1,) * 8, (160,) * 8)
    assert attention.bytes == 32 * (8 * 160 * 4096 + 8 * (4096 + 32 * 256 * 2))
    assert attention.memory_s == pytest.approx(160 * 512 * 32 * 132 / H100_BYTES, rel=1e-12)
    assert attention.memory_s == pytest.approx(129.1e-6, rel=1e-3)
    assert attention.memory_s > 1.9 * attention.bytes / H100_BYTES


def test_long_contexts_are_split_and_stream_at_full_bandwidth(h100, llama8b):
    """64 sequences at 4096 tokens: items of 512 tokens (8 per sequence and head, 4096 items); the floor
    512 x 512 x 32 x 132 / 2.68 TB/s = 0.41 ms is far under the 34 GB of KV at 2.68 TB/s."""
    attention = _op(CostModel(h100, llama8b), "attention", (1,) * 64, (4096,) * 64)
    assert attention.memory_s == pytest.approx(attention.bytes / H100_BYTES, rel=1e-12)


def test_a_decode_step_under_a_graph_charges_kernels_and_the_step_overhead(h100, llama8b):
    """A decode step of 8 is replayed as a graph: its 10 us launch hides behind milliseconds of device work, so
    launch time is the device's 3 us per kernel plus the host's 1 ms per step: 291 x 3 us + 1 ms = 1.873 ms."""
    cost = CostModel(h100, llama8b).cost_of((1,) * 8, (160,) * 8)
    assert cost.launch_s == pytest.approx(KERNELS * 3e-6 + 1e-3, rel=1e-12)
    assert cost.total_s == pytest.approx(cost.compute_s + cost.memory_s + cost.launch_s, rel=1e-12)


def test_eager_launches_show_only_when_the_host_is_slower(h100, llama8b):
    """A host that needs 100 us per launch takes 29.1 ms to launch a prefill step's 291 kernels; the device
    waits for what its own work does not cover: 29.1 ms - (compute + memory + 291 x 3 us)."""
    slow_host = dataclasses.replace(h100, host_launch_s=100e-6)
    cost = CostModel(slow_host, llama8b).cost_of((16,), (16,))
    device_s = cost.compute_s + cost.memory_s + KERNELS * 3e-6
    assert device_s < KERNELS * 100e-6
    assert cost.launch_s == pytest.approx(KERNELS * 3e-6 + 1e-3 + KERNELS * 100e-6 - device_s, rel=1e-12)
    # The same host launching a decode step of 8 as one 10 us graph: nothing exposed.
    decode = CostModel(slow_host, llama8b).cost_of((1,) * 8, (160,) * 8)
    assert decode.launch_s == pytest.approx(KERNELS * 3e-6 + 1e-3, rel=1e-12)
    # A decode batch above the graphs' 512 sequences runs eagerly: 29.1 ms of launches against its device time.
    big = CostModel(slow_host, llama8b).cost_of((1,) * 513, (16,) * 513)
    big_device_s = big.compute_s + big.memory_s + KERNELS * 3e-6
    assert big.launch_s == pytest.approx(KERNELS * 3e-6 + 1e-3 + max(0.0, KERNELS * 100e-6 - big_device_s), rel=1e-12)
    assert big.launch_s > decode.launch_s


def test_a_profile_without_the_figures_keeps_the_flat_model(llama8b):
    """Maia 100 has no tiling, attention, host or graph figures: a GEMM at 60% of 0.8 PFLOP/s whatever its shape,
    and launch time is 5 us per kernel."""
    maia100 = load_profile("maia100")
    assert maia100.gemm is None and maia100.graph is None and maia100.step_overhead_s == 0.0
    costs = CostModel(maia100, llama8b)
    qkv = _op(costs, "qkv_proj", (1,) * 8, (160,) * 8)
    assert qkv.compute_s == pytest.approx(32 * 2 * 8 * 4096 * 6144 / (0.8e15 * 0.6), rel=1e-12)
    assert costs.cost_of((1,) * 8, (160,) * 8).launch_s == pytest.approx(KERNELS * 5e-6, rel=1e-12)


def test_prefill_attention_runs_at_the_attention_efficiency(h100, llama8b):
    """A 2048-token prompt: 32 x 4 x 32 x 128 FLOPs per causal pair, 2048 x 2049 / 2 pairs, at 60% of 989 TFLOP/s."""
    attention = _op(CostModel(h100, llama8b), "attention", (2048,), (2048,))
    assert attention.flops == 32 * 4 * 32 * 128 * (2048 * 2049 // 2)
    assert attention.compute_s == pytest.approx(attention.flops / (989e12 * 0.6), rel=1e-12)
    assert attention.bound == "compute"


def test_the_shape_aware_figures_are_read_with_their_sources_and_estimates(h100):
    """Each new figure carries its source, and those that are ours say so (a published SM count does not)."""
    assert h100.gemm.tile_m == 64 and h100.gemm.tile_n == 128 and h100.gemm.units == 132
    assert h100.graph.max_batch == 512 and h100.graph.launch_s == pytest.approx(10e-6)
    assert h100.host_launch_s == pytest.approx(5e-6) and h100.step_overhead_s == pytest.approx(1e-3)
    assert h100.attention_split_tokens == 512 and h100.attention_compute_efficiency == 0.6
    for key in ("gemm.tile_m", "gemm.units", "attention_split", "host_launch", "cuda_graphs.launch", "step_overhead"):
        assert h100.sources[key]
    assert {"gemm.tile_n", "host_launch", "cuda_graphs.launch", "step_overhead", "attention_compute_efficiency"} <= set(
        h100.estimates
    )
    assert "gemm.units" not in h100.estimates and "gemm.tile_m" not in h100.estimates

"""Roofline step cost: golden values by hand, and invariants."""

import dataclasses

import pytest

from maia_serving.emulator import Parallel, StepShape, load_model_shape, load_profile, step_cost
from maia_serving.emulator.cost import roofline


@pytest.fixture(scope="module")
def llama8b():
    return load_model_shape("llama-3-8b")


@pytest.fixture(scope="module")
def maia100():
    return load_profile("maia100")


def test_golden_qkv_gemm_one_token_on_maia100(llama8b, maia100):
    """Decode of one token through Llama-3-8B's qkv projection on a Maia 100.

    flops = 2 * 1 * 4096 * 6144; bytes = 4096 * 6144 * 2 (weights) + (4096 + 6144) * 2;
    memory time = bytes / (1.8 TB/s * 0.75) = 37.30 us, compute = flops / (0.8 PF * 0.6).
    """
    op = next(o for o in step_cost(maia100, llama8b, StepShape.of([(1, 1)])).ops if o.name == "qkv_proj")
    assert op.flops == 32 * 2 * 4096 * 6144
    assert op.bytes == 32 * (4096 * 6144 * 2 + (4096 + 6144) * 2)
    assert op.memory_s / 32 == pytest.approx(50_352_128 / (1.8e12 * 0.75))
    assert op.memory_s / 32 == pytest.approx(37.298e-6, rel=1e-4)
    assert op.compute_s / 32 == pytest.approx(2 * 4096 * 6144 / (0.8e15 * 0.6))
    assert op.bound == "memory"


def test_golden_large_prefill_is_compute_bound(llama8b, maia100):
    cost = step_cost(maia100, llama8b, StepShape.of([(4096, 4096)]))
    assert cost.bound == "compute"
    gemm_flops = 2 * 4096 * (32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336))
    gemms = [o for o in cost.ops if o.name in {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}]
    assert sum(o.flops for o in gemms) == gemm_flops


def test_total_is_sum_of_parts(llama8b):
    for name in ("maia100", "maia200", "h100-sxm"):
        cost = step_cost(load_profile(name), llama8b, StepShape.of([(1, 900)] * 16 + [(300, 700)]),
                         Parallel(tp=4))
        assert cost.total_s == pytest.approx(cost.compute_s + cost.memory_s + cost.comm_s + cost.launch_s)
        assert cost.compute_s + cost.memory_s == pytest.approx(sum(o.time_s for o in cost.ops))
        assert cost.comm_s > 0
        # Per layer: two norms, two residual adds and seven other kernels; three outside the layers.
        assert cost.launch_s == pytest.approx((11 * 32 + 3) * load_profile(name).kernel_launch_s)


def test_more_bandwidth_is_never_slower(llama8b, maia100):
    faster = dataclasses.replace(maia100, hbm_bandwidth_bytes_per_s=maia100.hbm_bandwidth_bytes_per_s * 2)
    for shape in ([(1, 100)] * 4, [(2048, 2048)], [(1, 8000)] * 64):
        step = StepShape.of(shape)
        assert step_cost(faster, llama8b, step).total_s <= step_cost(maia100, llama8b, step).total_s


def test_fp8_kv_reads_half_the_attention_bytes(llama8b, maia100):
    step = StepShape.of([(1, 4096)] * 8)
    attn = {dt: next(o for o in step_cost(maia100, llama8b, step, kv_cache_dtype=dt).ops
                     if o.name == "attention") for dt in ("auto", "fp8")}
    kv_bytes = lambda elem: (8 * 4096 + 8) * 2 * 8 * 128 * elem * 32  # noqa: E731
    q_and_out = 2 * 8 * 32 * 128 * 2 * 32
    assert attn["auto"].bytes == kv_bytes(2) + q_and_out
    assert attn["fp8"].bytes == kv_bytes(1) + q_and_out
    assert attn["fp8"].bytes - q_and_out == (attn["auto"].bytes - q_and_out) / 2


def test_causal_pairs_cover_chunked_prefill():
    assert StepShape.of([(1, 10)]).attended_pairs() == 10
    assert StepShape.of([(4, 4)]).attended_pairs() == 4 + 3 + 2 + 1
    assert StepShape.of([(2, 6)]).attended_pairs() == 5 + 6


def test_bad_step_shapes_are_refused():
    with pytest.raises(ValueError, match="context length"):
        StepShape.of([(5, 4)])


def test_roofline_picks_the_slower_side(maia100):
    op = roofline(maia100, "x", flops=0.8e15 * 0.6, nbytes=1.0)
    assert op.compute_s == pytest.approx(1.0) and op.bound == "compute"

"""Roofline step cost: golden values by hand through the engines' path, and invariants on random steps."""

import dataclasses
import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maia_serving.emulator import Parallel, ServingConfig, StepShape, load_model_shape, load_profile, step_cost
from maia_serving.emulator.cost import CostModel, roofline
from maia_serving.emulator.session import EmulatedDevice

PROFILES = ("maia100", "maia200", "h100-sxm", "h200")
MODELS = ("llama-3-8b", "llama-3-70b", "qwen2.5-7b")


@pytest.mark.parametrize("name", ["prefill", "chunk", "decode"])
def test_golden_steps_as_the_engines_charge_them(llama8b, maia100, golden, name):
    """The hand-priced steps of conftest.py, through EmulatedDevice.charge -> CostModel.cost_of."""
    step = golden[name]
    device = EmulatedDevice.fit(maia100, llama8b, ServingConfig())
    record = device.charge(step.new_tokens, step.context_lens, {}, [], kv_blocks_used=0)
    assert record.compute_s == pytest.approx(step.compute_s, rel=1e-12)
    assert record.memory_s == pytest.approx(step.memory_s, rel=1e-12)
    assert record.launch_s == pytest.approx((11 * 32 + 3) * 5e-6, rel=1e-12)
    assert record.comm_s == 0.0
    assert record.step_s == pytest.approx(step.total_s, rel=1e-12)
    assert record.bound == ("memory" if name == "decode" else "compute")


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


def test_launch_cost_counts_every_kernel(llama8b):
    for name in ("maia100", "maia200", "h100-sxm"):
        cost = step_cost(load_profile(name), llama8b, StepShape.of([(1, 900)] * 16 + [(300, 700)]), Parallel(tp=4))
        assert cost.comm_s > 0
        # Per layer: two norms, two residual adds and seven other kernels; three outside the layers.
        assert cost.launch_s == pytest.approx((11 * 32 + 3) * load_profile(name).kernel_launch_s)


def test_fp8_kv_reads_half_the_attention_bytes(llama8b, maia100):
    step = StepShape.of([(1, 4096)] * 8)
    attn = {dt: next(o for o in step_cost(maia100, llama8b, step, kv_cache_dtype=dt).ops
                     if o.name == "attention") for dt in ("auto", "fp8")}
    kv_bytes = lambda elem: (8 * 4096 + 8) * 2 * 8 * 128 * elem * 32  # noqa: E731
    q_and_out = 2 * 8 * 32 * 128 * 2 * 32
    assert attn["auto"].bytes == kv_bytes(2) + q_and_out
    assert attn["fp8"].bytes == kv_bytes(1) + q_and_out
    assert attn["fp8"].bytes - q_and_out == (attn["auto"].bytes - q_and_out) / 2


def test_bad_step_shapes_are_refused():
    with pytest.raises(ValueError, match="context length"):
        StepShape.of([(5, 4)])
    with pytest.raises(ValueError, match="one entry per sequence"):
        StepShape((1, 1), (4,))


def test_roofline_picks_the_slower_side(maia100):
    op = roofline(maia100, "x", flops=0.8e15 * 0.6, nbytes=1.0)
    assert op.compute_s == pytest.approx(1.0) and op.bound == "compute"


@functools.cache
def _cost_model(profile: str, model: str, tp: int, pp: int, kv_cache_dtype: str) -> CostModel:
    return CostModel(load_profile(profile), load_model_shape(model), Parallel(tp, pp), kv_cache_dtype)


def _sequences(max_len: int) -> st.SearchStrategy[tuple[int, int]]:
    """(new tokens, context length) with 1 <= new <= context."""
    return st.integers(1, max_len).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n)))


# A continuous-batching step: decodes (one new token each) and a few prefills or prefill chunks.
DECODES = st.integers(1, 8192).map(lambda n: (1, n))
PREFILLS = _sequences(8192)
SEQUENCES = st.one_of(DECODES, PREFILLS)
BATCHES = st.tuples(st.lists(DECODES, max_size=16), st.lists(PREFILLS, max_size=2)).map(
    lambda parts: parts[0] + parts[1]).filter(bool)
STEPS = BATCHES.map(StepShape.of)
# (profile, model, tp, pp, KV cache dtype)
SETUPS = st.tuples(st.sampled_from(PROFILES), st.sampled_from(MODELS), st.sampled_from((1, 2, 4)),
                   st.sampled_from((1, 2)), st.sampled_from(("auto", "fp8")))
# Regrouping the compute- and memory-bound operators' sums when one changes side can move a total by an ulp.
ROUNDING = 1e-12


@given(SETUPS, STEPS)
def test_cost_of_is_cost(setup, step):
    """What the engines call prices a step exactly as the checked API and the reports do."""
    model = _cost_model(*setup)
    assert model.cost_of(step.new_tokens, step.context_lens) == model.cost(step)
    assert model.cost_of(step.new_tokens, step.context_lens, detail=True) == model.cost(step, detail=True)


@given(SETUPS, STEPS)
def test_total_is_the_sum_of_its_parts(setup, step):
    cost = _cost_model(*setup).cost(step, detail=True)
    assert cost.total_s == cost.compute_s + cost.memory_s + cost.comm_s + cost.launch_s
    assert cost.compute_s == pytest.approx(sum(o.compute_s for o in cost.ops if o.bound == "compute"), rel=ROUNDING)
    assert cost.memory_s == pytest.approx(sum(o.memory_s for o in cost.ops if o.bound == "memory"), rel=ROUNDING)
    assert cost.flops == pytest.approx(sum(o.flops for o in cost.ops), rel=ROUNDING)
    assert cost.bytes == pytest.approx(sum(o.bytes for o in cost.ops), rel=ROUNDING)
    assert (cost.comm_s > 0) == (setup[2:4] != (1, 1))


@given(SETUPS, STEPS, st.floats(1.0, 16.0))
def test_more_bandwidth_is_never_slower(setup, step, factor):
    name, model, tp, pp, kv_cache_dtype = setup
    profile = load_profile(name)
    faster = dataclasses.replace(
        profile, hbm_bandwidth_bytes_per_s=profile.hbm_bandwidth_bytes_per_s * factor,
        scale_up=dataclasses.replace(profile.scale_up,
                                     bandwidth_bytes_per_s=profile.scale_up.bandwidth_bytes_per_s * factor))
    fast = CostModel(faster, load_model_shape(model), Parallel(tp, pp), kv_cache_dtype).cost(step)
    assert fast.total_s <= _cost_model(*setup).cost(step).total_s * (1 + ROUNDING)


@st.composite
def _step_and_a_bigger_one(draw: st.DrawFn) -> tuple[StepShape, StepShape]:
    """A step, and the same step with one more sequence, or with one sequence adding more tokens, or
    attending to a longer context."""
    pairs = draw(BATCHES)
    grow = draw(st.sampled_from(("sequence", "new tokens", "context")))
    if grow == "sequence":
        return StepShape.of(pairs), StepShape.of([*pairs, draw(SEQUENCES)])
    i = draw(st.integers(0, len(pairs) - 1))
    q, n = pairs[i]
    more = draw(st.integers(1, 1024))
    bigger = (q + more, n + more) if grow == "new tokens" else (q, n + more)
    return StepShape.of(pairs), StepShape.of([*pairs[:i], bigger, *pairs[i + 1:]])


@given(SETUPS, _step_and_a_bigger_one())
def test_more_tokens_are_never_cheaper(setup, steps):
    small, big = steps
    model = _cost_model(*setup)
    assert model.cost(big).total_s >= model.cost(small).total_s * (1 - ROUNDING)


def _causal_pairs_by_brute_force(step: StepShape) -> int:
    """Count (query, key) positions with key <= query, the new tokens being the last of each context."""
    return sum(1 for q, n in zip(step.new_tokens, step.context_lens)
               for query in range(n - q, n) for key in range(n) if key <= query)


@given(st.lists(_sequences(40), min_size=1, max_size=6).map(StepShape.of))
def test_attention_prices_every_causal_pair(step):
    """Attention FLOPs are 4 per head dimension per query-key pair: QK^T and PV, a multiply-add each."""
    model = _cost_model("maia100", "llama-3-8b", 1, 1, "auto")
    attention = next(o for o in model.cost_of(step.new_tokens, step.context_lens, detail=True).ops
                     if o.name == "attention")
    assert attention.flops == 32 * 4 * 32 * 128 * _causal_pairs_by_brute_force(step)


def test_causal_pairs_of_known_steps():
    assert _causal_pairs_by_brute_force(StepShape.of([(1, 10)])) == 10
    assert _causal_pairs_by_brute_force(StepShape.of([(4, 4)])) == 4 + 3 + 2 + 1
    assert _causal_pairs_by_brute_force(StepShape.of([(2, 6), (1, 3)])) == 5 + 6 + 3

"""The engine's own time per step: charged by the cost model, fitted by `calibrate-host --engine-model`."""

import dataclasses

import pytest

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.hardware import profile_from_dict
from maia_serving.tools.calibrate_host import (
    EngineTime,
    ShapeTiming,
    fit_engine_time,
    round_spread,
    shape_timings,
    with_engine_time,
)


def test_the_engine_time_is_charged_per_step_sequence_and_token(maia100, llama8b):
    """1 ms + 20 us x 8 sequences + 2 us x 8 tokens = 1.176 ms more launch time for a decode step of 8; a prefill
    of 2 x 100 tokens: 1 ms + 40 us + 400 us. Nothing else about the step changes."""
    engine = dataclasses.replace(
        maia100, step_overhead_s=1e-3, step_overhead_per_seq_s=20e-6, step_overhead_per_token_s=2e-6
    )
    for new, ctx, extra in (((1,) * 8, (160,) * 8, 1.176e-3), ((100, 100), (100, 100), 1.44e-3)):
        base, charged = CostModel(maia100, llama8b).cost_of(new, ctx), CostModel(engine, llama8b).cost_of(new, ctx)
        assert charged.launch_s - base.launch_s == pytest.approx(extra, rel=1e-9)
        assert (charged.compute_s, charged.memory_s, charged.comm_s) == (base.compute_s, base.memory_s, base.comm_s)


def test_under_pipeline_parallelism_the_first_stage_waits_on_the_host(maia100, llama8b):
    engine = dataclasses.replace(maia100, step_overhead_per_seq_s=50e-6)
    base = CostModel(maia100, llama8b, Parallel(pp=2)).cost_of((1,) * 4, (64,) * 4)
    charged = CostModel(engine, llama8b, Parallel(pp=2)).cost_of((1,) * 4, (64,) * 4)
    assert charged.stages[0] - base.stages[0] == pytest.approx(200e-6, rel=1e-9)
    assert charged.stages[1] == base.stages[1]


def _shape(seqs: int, tokens: int, device_s: float, engine: EngineTime) -> ShapeTiming:
    measured = device_s + engine.of(seqs, tokens)
    return ShapeTiming(
        "decode" if seqs == tokens else "prefill", seqs, tokens, 5, measured, device_s, measured, measured
    )


def test_the_fit_recovers_an_engine_time_it_was_made_from():
    truth = EngineTime(1.3e-3, 26e-6, 4e-6)
    shapes = [_shape(s, t, 1e-4 * t, truth) for s, t in ((2, 2), (16, 16), (48, 48), (2, 192), (16, 1536))]
    fit = fit_engine_time(shapes)
    assert (fit.fixed_s, fit.per_seq_s, fit.per_token_s) == pytest.approx((1.3e-3, 26e-6, 4e-6), rel=1e-6)


def test_the_fit_has_no_negative_term():
    """Measured times that fall with more sequences would need a negative per-sequence time: the fit drops the
    term rather than promise a step that gets cheaper as it grows."""
    shapes = [
        ShapeTiming("decode", s, s, 5, measured, 0.0, measured, measured)
        for s, measured in ((1, 2e-3), (8, 1.9e-3), (32, 1.8e-3))
    ]
    fit = fit_engine_time(shapes)
    assert fit.per_seq_s == 0.0 and fit.per_token_s == 0.0
    assert fit.fixed_s == pytest.approx(1.9e-3, rel=0.01)
    with pytest.raises(ValueError, match="no step shapes"):
        fit_engine_time([])


def test_steps_are_grouped_by_shape_and_rare_shapes_dropped():
    steps = [{"seqs": 2, "tokens": 2, "round": 0, "measured_s": m, "predicted_s": 1e-4} for m in (1e-3, 3e-3, 2e-3)]
    steps += [{"seqs": 2, "tokens": 192, "round": 0, "measured_s": 5e-3, "predicted_s": 2e-3}] * 3
    steps += [{"seqs": 1, "tokens": 1, "round": 0, "measured_s": 9.0, "predicted_s": 0.0}]  # a tail step, seen once
    assert shape_timings(steps) == [
        ShapeTiming("decode", 2, 2, 3, 2e-3, 1e-4, 2e-3, 2e-3),
        ShapeTiming("prefill", 2, 192, 3, 5e-3, 2e-3, 5e-3, 5e-3),
    ]


def test_a_shape_is_timed_at_its_fastest_round():
    """A neighbour that slows one round by half does not move the figure: the round's median is set aside, and
    the slowest round says how far the host moved. Every round's median stays beside it."""
    steps = [
        {"seqs": 4, "tokens": 4, "round": r, "measured_s": m, "predicted_s": 1e-4}
        for r, times in enumerate(((2.0e-3, 2.1e-3, 1.9e-3), (3.0e-3, 3.1e-3, 2.9e-3), (2.2e-3, 2.4e-3, 2.3e-3)))
        for m in times
    ]
    (shape,) = shape_timings(steps)
    assert (shape.steps, shape.measured_s, shape.slowest_round_s) == (9, 2.0e-3, 3.0e-3)
    assert shape.all_steps_s == 2.3e-3
    assert round_spread([shape]) == pytest.approx(0.5)


def test_the_fitted_figures_load_into_the_host_profile(host_raw):
    """with_engine_time writes the three figures with units and a source, and the profile loader reads them."""
    raw = host_raw
    profile = profile_from_dict(with_engine_time(raw, EngineTime(1.3e-3, 26e-6, 4e-6), "fitted"))
    assert profile.step_overhead_s == pytest.approx(1.3e-3)
    assert profile.step_overhead_per_seq_s == pytest.approx(26e-6)
    assert profile.step_overhead_per_token_s == pytest.approx(4e-6)
    assert profile.sources["step_overhead_per_token"] == "fitted, per scheduled token"
    assert profile_from_dict(raw).step_overhead_per_seq_s == 0.0

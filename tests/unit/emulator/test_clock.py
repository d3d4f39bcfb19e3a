"""Emulated clock and the engine-facing EmulatedDevice."""

import pytest

from maia_serving.emulator import EmulatedClock, Parallel, ServingConfig, load_model_shape, load_profile, plan_memory
from maia_serving.emulator.session import EmulatedDevice


def test_ttft_tpot_e2e():
    clock = EmulatedClock()
    clock.advance(1.0, {})
    clock.arrive("a")
    clock.advance(0.5, {"a": 1})  # prefill step
    clock.advance(0.1, {"a": 1})
    clock.advance(0.1, {"a": 1})
    t = clock.finish("a")
    assert t.ttft_s == pytest.approx(0.5)
    assert t.tpot_s == pytest.approx(0.1)
    assert t.e2e_s == pytest.approx(0.7)
    assert t.num_output_tokens == 3


def test_chunked_prefill_step_emits_nothing_yet():
    clock = EmulatedClock()
    clock.arrive("a")
    clock.advance(0.3, {"a": 0})
    clock.advance(0.3, {"a": 1})
    assert clock.requests["a"].ttft_s == pytest.approx(0.6)


def test_negative_step_is_refused():
    with pytest.raises(ValueError):
        EmulatedClock().advance(-1.0, {})


def test_device_charges_steps_and_reports_finished_requests():
    model = load_model_shape("llama-3-8b")
    profile = load_profile("maia200")
    plan = plan_memory(model, profile, ServingConfig())
    dev = EmulatedDevice(profile, model, plan, Parallel(), "auto")
    dev.arrive("r1")
    first = dev.charge((100,), (100,), {"r1": 1}, [], kv_blocks_used=7, wall_s=0.02)
    assert first.first_token_ttfts_s == [pytest.approx(first.step_s)]
    second = dev.charge((1,), (101,), {"r1": 1}, ["r1"], kv_blocks_used=7)
    assert second.finished[0].tpot_s == pytest.approx(second.step_s)
    assert dev.clock.requests == {}
    assert dev.hbm_used_bytes(7) == pytest.approx(
        plan.runtime_reserve_bytes + plan.weight_bytes + plan.workspace_bytes + 7 * 16 * plan.kv_bytes_per_token)

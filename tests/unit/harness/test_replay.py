"""tests.utils.replay's pure parts: the prompts it sends, the figures it reads off two scrapes and
off a simulation, and the ratios it compares."""

import pytest

from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.sim.simulate import Simulation, StepLog
from tests.utils.replay import Figures, emulated_figures, simulated_figures, token_prompts


def test_prompts_have_the_length_and_share_no_first_block():
    prompts = token_prompts(8, 128)
    assert [len(p) for p in prompts] == [128] * 8
    assert len({p[0] for p in prompts}) == 8


def _scrape(busy, ttft_sum, ttft_count, tpot_sum, tpot_count, steps):
    return {
        "maia:emulated_busy_seconds_total": busy,
        "maia:emulated_step_seconds_count": steps,
        "maia:emulated_time_to_first_token_seconds_sum": ttft_sum,
        "maia:emulated_time_to_first_token_seconds_count": ttft_count,
        "maia:emulated_time_per_output_token_seconds_sum": tpot_sum,
        "maia:emulated_time_per_output_token_seconds_count": tpot_count,
    }


def test_emulated_figures_are_the_rise_between_two_scrapes():
    before = _scrape(1.0, 0.5, 2, 0.25, 2, 10)
    after = _scrape(1.75, 1.5, 6, 0.75, 6, 30)
    assert emulated_figures(before, after) == Figures(
        busy_s=0.75, ttft_s=0.25, tpot_s=0.125, num_steps=20, num_requests=4
    )


def test_no_finished_request_is_an_error_not_a_division_by_zero():
    same = _scrape(1.0, 0.5, 2, 0.25, 2, 10)
    with pytest.raises(ValueError, match="no request finished"):
        emulated_figures(same, same)


def test_simulated_figures_count_as_metrics_do():
    """Requests of one token have no TPOT, as /metrics leaves them out of its TPOT histogram."""
    timings = (RequestTiming(0.0, 0.5, 1.5, 3), RequestTiming(0.0, 1.0, 1.0, 1))
    steps = StepLog(
        (0.0, 0.5, 1.0), (0.5, 0.5, 0.5), (2, 2, 1), (2, 2, 1), (0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0)
    )
    sim = Simulation("maia200", (), timings, steps, 10, 0, 0, 0)
    assert simulated_figures(sim) == Figures(busy_s=1.5, ttft_s=0.75, tpot_s=0.5, num_steps=3, num_requests=2)


def test_ratios_are_live_over_simulated():
    live = Figures(busy_s=1.0, ttft_s=0.5, tpot_s=0.25, num_steps=3, num_requests=2)
    sim = Figures(busy_s=2.0, ttft_s=0.5, tpot_s=0.125, num_steps=3, num_requests=2)
    assert live.ratio_to(sim) == {"busy_s": 0.5, "ttft_s": 1.0, "tpot_s": 2.0}

"""StepCharger, the charging path both adapters share: what it logs when the emulation fails (in
full once, then quietly), that it never raises, and what a charged step carries to the sink."""

import logging
from types import SimpleNamespace

import pytest

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.serving import stepping
from maia_serving.serving.stepping import EngineStep, StepCharger

LOGGER = "test.serving.stepping"


@pytest.fixture
def device():
    return EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )


def charger_of(device, log_interval_s=1e9, on_error=lambda: None, sink=lambda record: None):
    return StepCharger(device, logging.getLogger(LOGGER), log_interval_s, sink=sink, on_error=on_error)


def _fail(exc):
    def fail(*args):
        raise exc

    return fail


def test_an_error_is_logged_in_full_once_then_at_debug_and_every_one_is_counted(device, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    counted = []
    charger = charger_of(device, on_error=lambda: counted.append(1))
    boom = RuntimeError("boom")
    assert charger.guard("reading a step", _fail(boom), 1) is None
    assert charger.guard("reading a step", _fail(boom), 2) is None
    first, second = caplog.records
    assert (first.levelno, first.getMessage()) == (
        logging.ERROR,
        "maia-serving: reading a step failed; the step is not charged to the emulated device "
        "(counted in maia:emulation_errors_total) and the engine serves on. Please report this.",
    )
    assert (second.levelno, second.getMessage()) == (
        logging.DEBUG,
        "maia-serving: reading a step failed again (2 errors)",
    )
    assert first.exc_info[1] is boom and second.exc_info[1] is boom
    assert charger.errors == 2 and counted == [1, 1]


def test_an_error_counter_that_fails_is_logged_at_debug_and_swallowed(device, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    gone = ValueError("metrics gone")
    charger = charger_of(device, on_error=_fail(gone))
    charger.guard("reading a step", _fail(RuntimeError("boom")))
    last = caplog.records[-1]
    assert (last.levelno, last.getMessage()) == (logging.DEBUG, "maia-serving: counting an emulation error failed")
    assert last.exc_info[1] is gone


@pytest.mark.parametrize(
    "call,what",
    [
        (lambda charger: charger.arrive("r"), "a request's arrival"),
        (lambda charger: charger.abort("r"), "a request's abort"),
        (lambda charger: charger.charge(EngineStep((1,), (8,), {}, [], 0, 0), 0.0, 0.0), "charging a step"),
    ],
)
def test_each_entry_point_names_itself_when_the_device_fails(device, monkeypatch, caplog, call, what):
    for name in ("arrive", "abort", "charge"):
        monkeypatch.setattr(device, name, _fail(RuntimeError("boom")))
    assert call(charger_of(device)) is None
    assert caplog.records[0].getMessage().startswith(f"maia-serving: {what} failed; ")


def test_a_charged_step_carries_wall_time_and_cached_blocks_to_the_sink(device, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    sent = []
    charger = charger_of(device, sink=sent.append)
    record = charger.charge(EngineStep((16,), (16,), {"a": 1}, [], 1, 3), wall_s=0.25, read_s=0.0)
    assert sent == [record]
    assert (record.wall_s, record.kv_blocks_used, record.kv_blocks_cached) == (0.25, 1, 3)
    assert caplog.records == []  # the interval is not over: no log line, not even an empty one


def test_the_periodic_line_is_logged_when_the_interval_is_over(device, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    charger_of(device, log_interval_s=0.0).charge(EngineStep((16,), (16,), {}, [], 1, 0), 0.0, 0.0)
    (line,) = caplog.records
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith("Maia emulation [maia100]: llama-3-8b, 1 steps, ")


class FakeThreadClock:
    """This thread's CPU clock, reading the given instants in turn."""

    def __init__(self, *instants):
        self.instants = iter(instants)

    def __call__(self):
        return next(self.instants)


def test_overhead_is_reading_plus_charging_plus_handing_on_the_previous_record(device, monkeypatch):
    # Per charge the clock is read at: start, after charging, before the sink, after the sink.
    clock = FakeThreadClock(10.0, 10.5, 10.5, 11.0, 20.0, 20.25, 20.25, 20.5)
    monkeypatch.setattr(stepping, "time", SimpleNamespace(thread_time=clock, monotonic=lambda: 0.0))
    charger = charger_of(device)
    step = EngineStep((1,), (8,), {}, [], 0, 0)
    assert charger.charge(step, 0.0, read_s=0.125).overhead_s == 0.125 + 0.5
    assert charger.charge(step, 0.0, read_s=0.125).overhead_s == 0.125 + 0.25 + 0.5  # the first sink took 0.5


def test_with_pacing_the_charger_waits_what_the_clock_says_and_without_never(device):
    """MAIA_SERVING_PACE=1: after a charged step the engine waits until the host's clock has caught up with the
    emulated one; the record is the same either way."""
    step = EngineStep((1,), (100,), {"r": 1}, [], 1, 0)
    waits = []
    paced = StepCharger(
        device,
        logging.getLogger(LOGGER),
        1e9,
        sink=lambda r: None,
        on_error=lambda: None,
        pace=True,
        sleep=waits.append,
    )
    device.arrive("r")
    record = paced.charge(step, wall_s=0.0, read_s=0.0)
    assert len(waits) == 1 and 0 < waits[0] <= record.step_s
    unpaced_device = EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )
    unpaced = StepCharger(
        unpaced_device, logging.getLogger(LOGGER), 1e9, sink=lambda r: None, on_error=lambda: None, sleep=waits.append
    )
    unpaced_device.arrive("r")
    assert unpaced.charge(step, wall_s=0.0, read_s=0.0).step_s == record.step_s
    assert len(waits) == 1

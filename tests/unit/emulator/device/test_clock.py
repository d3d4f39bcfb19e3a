"""Emulated clock: per-request figures of hand-built runs, checked exactly (the step times are dyadic,
so every sum and difference is exact in binary floating point)."""

import pytest

from maia_serving.emulator import EmulatedClock


class HostClock:
    """A host clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def frozen() -> EmulatedClock:
    """A clock whose host time never moves: no idle time, only steps."""
    return EmulatedClock(host_time=lambda: 0.0)


def test_ttft_tpot_e2e_of_two_overlapping_requests():
    clock = frozen()
    clock.advance(1.0, {})  # before either request: no part of their latency
    clock.arrive("a")  # at 1.0
    clock.advance(0.5, {"a": 1})  # a's prefill: first token at 1.5
    clock.arrive("b")  # at 1.5
    clock.advance(0.25, {"a": 1, "b": 0})  # a decodes; b's first prefill chunk emits nothing (1.75)
    clock.advance(0.125, {"a": 2, "b": 1})  # a emits two tokens (a speculative step), b its first (1.875)
    a = clock.finish("a")
    clock.advance(0.0625, {"b": 1})  # 1.9375
    b = clock.finish("b")

    assert (a.arrival_s, a.first_token_s, a.last_token_s, a.num_output_tokens) == (1.0, 1.5, 1.875, 4)
    assert a.ttft_s == 0.5
    assert a.tpot_s == (1.875 - 1.5) / 3 == 0.125
    assert a.e2e_s == 0.875
    assert (b.arrival_s, b.first_token_s, b.last_token_s, b.num_output_tokens) == (1.5, 1.875, 1.9375, 2)
    assert b.ttft_s == 0.375
    assert b.tpot_s == 0.0625
    assert b.e2e_s == 0.4375
    assert (clock.now_s, clock.num_steps, clock.requests) == (1.9375, 5, {})


def test_a_request_seen_first_with_its_token_arrives_at_the_step_start():
    """An engine may report a request's first step before arrive(); it arrived when that step began."""
    clock = frozen()
    clock.advance(0.5, {})
    (first,) = clock.advance(0.25, {"a": 1})
    assert (first.arrival_s, first.ttft_s) == (0.5, 0.25)


def test_one_token_has_no_tpot_and_no_token_no_latency():
    clock = frozen()
    clock.arrive("one")
    clock.arrive("none")
    clock.advance(0.5, {"one": 1, "none": 0})
    one, none = clock.finish("one"), clock.finish("none")
    assert (one.ttft_s, one.e2e_s, one.tpot_s) == (0.5, 0.5, None)
    assert (none.ttft_s, none.e2e_s, none.tpot_s) == (None, None, None)
    assert clock.finish("never seen") is None


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="negative time"):
        frozen().advance(-1.0, {})


def test_arriving_again_keeps_the_first_arrival():
    """SGLang's hooks and vLLM's retries can announce a request twice; its latency starts at the first."""
    clock = frozen()
    first = clock.arrive("a")
    clock.advance(0.5, {})
    assert clock.arrive("a") is first and first.arrival_s == 0.0


def test_a_request_without_tokens_does_not_stop_the_others_getting_theirs():
    clock = frozen()
    (b,) = clock.advance(0.5, {"a": 0, "b": 1})
    assert (b.first_token_s, b.num_output_tokens) == (0.5, 1)


def test_idle_time_follows_the_host_between_requests():
    """A request that comes 2 host seconds after the device went idle comes 2 emulated seconds after
    the last step; before the first request, the device is idle from the clock's start."""
    host = HostClock()
    clock = EmulatedClock(host_time=host)
    host.now_s += 1.0
    a = clock.arrive("a")  # 1 s after start
    host.now_s += 0.5  # host time while busy is not emulated time
    clock.advance(0.25, {"a": 1})
    clock.finish("a")  # idle from 1.25 (emulated), 101.5 (host)
    host.now_s += 2.0
    b = clock.arrive("b")
    assert (a.arrival_s, a.ttft_s) == (1.0, 0.25)
    assert b.arrival_s == 1.25 + 2.0 == clock.now_s
    assert clock.busy_s == 0.25


def test_arrivals_while_busy_are_stamped_at_the_step_end_whatever_the_host_time():
    """While a request is open, host time does not move the clock: b, seen after a's step, arrives
    when that step ended on the emulated device, and waits for no host time."""
    host = HostClock()
    clock = EmulatedClock(host_time=host)
    clock.arrive("a")
    host.now_s += 3.0  # a slow host step
    clock.advance(0.5, {"a": 1})
    b = clock.arrive("b")
    host.now_s += 3.0
    clock.advance(0.25, {"a": 1, "b": 1})
    assert (b.arrival_s, b.ttft_s) == (0.5, 0.25)
    clock.finish("a")  # b is still open: not idle
    host.now_s += 5.0
    c = clock.arrive("c")
    assert c.arrival_s == 0.75 == clock.now_s == clock.busy_s


def test_a_step_that_ran_after_every_request_was_aborted_starts_the_idle_time_again():
    """vLLM can abort the last request while its step runs; the step is charged in full, and the idle
    time counts from its end, not from the abort."""
    host = HostClock()
    clock = EmulatedClock(host_time=host)
    clock.arrive("a")
    clock.finish("a")  # aborted mid-step
    host.now_s += 1.0  # the step still runs on the host
    clock.advance(0.5, {})
    host.now_s += 2.0
    assert clock.arrive("b").arrival_s == 0.5 + 2.0


def test_finishing_an_unknown_request_or_an_empty_step_keeps_the_idle_time():
    host = HostClock()
    clock = EmulatedClock(host_time=host)
    host.now_s += 1.0
    clock.finish("never seen")
    clock.advance(0.0, {})
    host.now_s += 1.0
    assert clock.arrive("a").arrival_s == 2.0


def test_pacing_waits_until_the_host_has_gone_as_far_as_the_device():
    """Busy from host time 100: after steps of 0.25 and 0.125 emulated seconds the host should stand at 100.375;
    a host that took 0.0625 waits the rest. A step the host took longer than the device waits nothing and lines
    the clocks up anew; an idle gap restarts them together at the next arrival."""
    host = HostClock()
    clock = EmulatedClock(host_time=host)
    assert clock.pace_s() == 0.0  # nothing has run
    clock.arrive("a")
    clock.advance(0.25, {"a": 1})
    clock.advance(0.125, {"a": 1})
    host.now_s = 100.0625
    assert clock.pace_s() == 0.3125
    host.now_s = 100.375  # the wait done
    clock.advance(0.125, {"a": 1})
    host.now_s = 101.0  # the host took 0.625 for a step of 0.125: nothing to wait, and lined up at 101.0
    assert clock.pace_s() == 0.0
    clock.advance(0.25, {"a": 1})
    host.now_s = 101.125
    assert clock.pace_s() == 0.125
    clock.finish("a")
    host.now_s = 110.0
    clock.arrive("b")  # after an idle gap: the emulated clock followed the host, and pacing starts from here
    clock.advance(0.5, {"b": 1})
    host.now_s = 110.25
    assert clock.pace_s() == 0.25


def test_paced_a_request_arriving_while_the_engine_waits_arrived_that_long_before_the_steps_end():
    """Paced, a step of 0.5 from host time 100 ends at emulated 0.5 / host 100.5; a request that reached the server
    at host 100.375 (the engine waiting; it sees the request at 100.5, 0.125 s later) arrived at emulated 0.375, as
    simulate times an arrival during a step. Unpaced it arrives at the step's end; one older than the step at the
    step's start. Where the host finished a step after the device (at 100.75), a request that came later arrives
    at the step's end, one that came while the host still ran it inside it, as on the host's timeline."""
    for paced, age, arrival in ((True, 0.125, 0.375), (False, 0.125, 0.5), (True, 2.0, 0.0)):
        host = HostClock()
        clock = EmulatedClock(host_time=host)
        clock.paced = paced
        clock.arrive("a")
        clock.advance(0.5, {"a": 1})
        host.now_s = 100.5
        assert clock.arrive("b", age_s=age).arrival_s == arrival
    clock.advance(0.25, {"a": 1})  # the host takes 0.5 for it: behind the device, lined up anew at 101.0
    host.now_s = 101.0
    assert clock.pace_s() == 0.0
    assert clock.arrive("c").arrival_s == 0.75
    assert clock.arrive("d", age_s=0.125).arrival_s == 0.625

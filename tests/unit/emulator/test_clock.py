"""Emulated clock: per-request figures of hand-built runs, checked exactly (the step times are dyadic,
so every sum and difference is exact in binary floating point)."""

import pytest

from maia_serving.emulator import EmulatedClock


def test_ttft_tpot_e2e_of_two_overlapping_requests():
    clock = EmulatedClock()
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
    clock = EmulatedClock()
    clock.advance(0.5, {})
    (first,) = clock.advance(0.25, {"a": 1})
    assert (first.arrival_s, first.ttft_s) == (0.5, 0.25)


def test_one_token_has_no_tpot_and_no_token_no_latency():
    clock = EmulatedClock()
    clock.arrive("one")
    clock.arrive("none")
    clock.advance(0.5, {"one": 1, "none": 0})
    one, none = clock.finish("one"), clock.finish("none")
    assert (one.ttft_s, one.e2e_s, one.tpot_s) == (0.5, 0.5, None)
    assert (none.ttft_s, none.e2e_s, none.tpot_s) == (None, None, None)
    assert clock.finish("never seen") is None


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="negative time"):
        EmulatedClock().advance(-1.0, {})


def test_arriving_again_keeps_the_first_arrival():
    """SGLang's hooks and vLLM's retries can announce a request twice; its latency starts at the first."""
    clock = EmulatedClock()
    first = clock.arrive("a")
    clock.advance(0.5, {})
    assert clock.arrive("a") is first and first.arrival_s == 0.0


def test_a_request_without_tokens_does_not_stop_the_others_getting_theirs():
    clock = EmulatedClock()
    (b,) = clock.advance(0.5, {"a": 0, "b": 1})
    assert (b.first_token_s, b.num_output_tokens) == (0.5, 1)

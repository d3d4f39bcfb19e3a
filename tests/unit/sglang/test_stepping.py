"""Charging SGLang steps: what the hooks read off a batch, and what the emulated clock makes of it."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import ServingConfig
from maia_serving.emulator.model_shape import load_model_shape
from maia_serving.emulator.session import EmulatedDevice
from maia_serving.sglang.stepping import MaiaStepper, step_shape


def req(rid: str, outputs: int = 0, done: bool = False):
    return SimpleNamespace(rid=rid, output_ids=[0] * outputs, finished=lambda: done)


def extend_batch(reqs, prefix, extend):
    return SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs, prefix_lens=prefix, extend_lens=extend)


def decode_batch(reqs, seq_lens):
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=reqs, seq_lens_cpu=torch.tensor(seq_lens))


def test_step_shape_of_extend_and_decode():
    # A cold prefill of 7 and a prefix hit: 3 new tokens after 5 cached.
    assert step_shape(extend_batch([req("a"), req("b")], [0, 5], [7, 3])) == ((7, 3), (7, 8))
    # Decode: one token each; seq_lens already count it.
    assert step_shape(decode_batch([req("a"), req("b")], [8, 9])) == ((1, 1), (8, 9))
    assert step_shape(SimpleNamespace(forward_mode=ForwardMode.IDLE)) is None


@pytest.fixture
def stepper(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    device = EmulatedDevice.fit(load_profile("maia100"), load_model_shape("llama-3-8b"),
                                ServingConfig(max_model_len=4096))
    return MaiaStepper(device, engine_kv_tokens=160)


def test_a_request_is_timed_from_arrival_to_its_last_token(stepper):
    stepper.arrive("a")
    a = req("a")
    prefill = extend_batch([a], [0], [512])
    stepper.before_run(prefill)
    a.output_ids.append(1)  # the prefill samples the first token
    stepper.after_result(prefill, free_tokens=160 - 33)
    prefill_s = stepper.device.clock.now_s
    assert prefill_s > 0
    timing = stepper.device.clock.requests["a"]
    assert timing.first_token_s == prefill_s and timing.ttft_s == prefill_s

    for n in range(2):
        step = decode_batch([a], [513 + n])
        stepper.before_run(step)
        a.output_ids.append(1)
        if n == 1:
            a.finished = lambda: True
        stepper.after_result(step, free_tokens=160 - 34 - n)
    assert "a" not in stepper.device.clock.requests  # finished requests leave the clock
    decode_s = stepper.device.clock.now_s - prefill_s
    assert timing.num_output_tokens == 3
    assert timing.tpot_s == pytest.approx(decode_s / 2) and timing.e2e_s == stepper.device.clock.now_s


def test_used_kv_is_counted_in_emulated_blocks(stepper):
    stepper.arrive("a")
    batch = extend_batch([req("a")], [0], [20])
    stepper.before_run(batch)
    batch.reqs[0].output_ids.append(1)
    record_before = stepper.device.clock.num_steps
    stepper.after_result(batch, free_tokens=160 - 20)
    assert stepper.device.clock.num_steps == record_before + 1
    assert stepper.device.hbm_used_bytes(2) > stepper.device.hbm_used_bytes(0)


def test_an_idle_batch_charges_nothing(stepper):
    stepper.before_run(SimpleNamespace(forward_mode=ForwardMode.IDLE, reqs=[]))
    stepper.after_result(SimpleNamespace(reqs=[]), free_tokens=160)
    assert stepper.device.clock.num_steps == 0

"""The vLLM stats channel: plain JSON over a private Unix socket; nothing a peer sends can run
code or stop the API server, and nothing the engine does is lost when it goes idle."""

import json
import logging
import os
import pickle
import time
from dataclasses import asdict

import prometheus_client
import pytest
import zmq
from prometheus_client import CollectorRegistry

from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.device.session import StepRecord
from maia_serving.serving.metrics import DeviceInfo
from maia_serving.vllm.channel import MAX_MESSAGE_BYTES, Message, StatsPublisher, StatsReceiver, decode, encode

INFO = DeviceInfo(
    profile="maia100",
    model="demo",
    kv_cache_dtype="auto",
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    hbm_total_bytes=64e9,
    hbm_static_bytes=2e9,
    kv_block_bytes=1e6,
    emulated_kv_blocks=1000,
    engine_kv_blocks=100,
    block_size=16,
)


def _record(kv_used=3, first=(), finished=()) -> StepRecord:
    return StepRecord(
        step_s=0.002,
        compute_s=0.001,
        memory_s=0.0005,
        comm_s=0.0,
        launch_s=0.0005,
        bound="compute",
        num_tokens=7,
        num_seqs=2,
        now_s=1.5,
        wall_s=0.01,
        kv_blocks_used=kv_used,
        kv_blocks_cached=1,
        overhead_s=1e-5,
        first_token_ttfts_s=list(first),
        finished=list(finished),
    )


def test_a_message_survives_the_round_trip():
    timing = RequestTiming(arrival_s=0.5, first_token_s=0.7, last_token_s=1.5, num_output_tokens=5)
    msg = Message(INFO, [_record(first=[0.2], finished=[timing])], errors=2, kv=(0, 4))
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04not json",
        b"{}",
        b"[1, 2]",
        b'{"v": 2, "info": null, "steps": [], "errors": 0, "kv": null}',
        b'{"v": 1, "info": null, "steps": {}, "errors": 0, "kv": null}',
        b'{"v": 1, "info": null, "steps": [{"step_s": 1}], "errors": 0, "kv": null}',
        b'{"v": 1, "info": null, "steps": [], "errors": "many", "kv": null}',
        b'{"v": 1, "info": null, "steps": [], "errors": NaN, "kv": null}',
        b'{"v": 1, "info": null, "steps": [], "errors": 0, "kv": [1]}',
        b'{"v": 1, "info": {"profile": 3}, "steps": [], "errors": 0, "kv": null}',
    ],
)
def test_malformed_messages_are_refused(data):
    with pytest.raises((ValueError, TypeError, KeyError)):
        decode(data)


def test_a_record_with_a_non_finite_time_is_refused():
    bad = encode(Message(steps=[_record()])).replace(b'"step_s": 0.002', b'"step_s": Infinity')
    with pytest.raises(ValueError, match="finite"):
        decode(bad)


@pytest.fixture
def addr(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    return f"ipc://{folder}/stats.sock"


@pytest.fixture
def receiver(addr):
    rx = StatsReceiver(addr, registry=CollectorRegistry())
    yield rx
    rx.close()


def _value(rx, name, **labels):
    return rx.metrics.registry.get_sample_value(name, labels or None)


def _drain_until(rx, predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        rx.drain()
        if time.monotonic() > deadline:
            raise AssertionError("the channel did not deliver in time")
        time.sleep(0.01)


def test_device_facts_reach_metrics_before_any_step(addr, receiver):
    pub = StatsPublisher(addr)
    pub.announce(INFO)
    _drain_until(receiver, lambda: _value(receiver, "maia:hbm_total_bytes") == 64e9)
    assert (
        _value(
            receiver,
            "maia:device_info",
            profile="maia100",
            model="demo",
            kv_cache_dtype="auto",
            tensor_parallel_size="1",
        )
        == 1
    )
    assert _value(receiver, "maia:kv_cache_tokens", holder="emulated") == 16000
    assert _value(receiver, "maia:hbm_used_bytes") == 2e9


def test_steps_left_waiting_are_sent_when_the_engine_goes_idle(addr, receiver):
    pub = StatsPublisher(addr, max_batch=64, max_delay_s=3600)
    pub.announce(INFO)
    pub.send(_record(kv_used=3), now=0.0)  # not urgent: it waits for company
    time.sleep(0.05)
    receiver.drain()
    assert _value(receiver, "maia:emulated_step_seconds_count") == 0
    pub.flush(kv=(0, 2))  # the engine went idle after an abort freed everything
    _drain_until(receiver, lambda: _value(receiver, "maia:emulated_step_seconds_count") == 1)
    assert _value(receiver, "maia:kv_cache_blocks_used") == 0
    assert _value(receiver, "maia:kv_cache_blocks_cached") == 2
    assert _value(receiver, "maia:hbm_used_bytes") == 2e9


def test_errors_in_the_engine_are_counted_on_metrics(addr, receiver):
    pub = StatsPublisher(addr)
    pub.count_error()
    pub.count_error()
    _drain_until(receiver, lambda: _value(receiver, "maia:emulation_errors_total", stage="charge") == 2)


def test_a_crafted_pickle_cannot_run_code_and_is_counted(addr, receiver, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(addr)
    for data in (pickle.dumps([Exploit()]), b"\x00\xff garbage", b'{"v": 1}'):
        push.send(data)
    pub = StatsPublisher(addr)
    pub.announce(INFO)
    _drain_until(receiver, lambda: _value(receiver, "maia:hbm_total_bytes") == 64e9)
    assert not marker.exists()
    assert _value(receiver, "maia:emulation_errors_total", stage="channel") == 3
    assert receiver.dropped == 3
    push.close()


def test_an_oversized_message_is_refused_and_the_channel_serves_on(addr, receiver):
    flood = zmq.Context.instance().socket(zmq.PUSH)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(addr)
    flood.send(b"x" * (MAX_MESSAGE_BYTES + 1))
    pub = StatsPublisher(addr)
    pub.announce(INFO)
    _drain_until(receiver, lambda: _value(receiver, "maia:hbm_total_bytes") == 64e9)
    flood.close()


def test_a_publisher_without_a_reader_never_blocks(addr):
    """Past the high-water mark sends are dropped, not waited on (a blocking send would hang)."""
    pub = StatsPublisher(addr, max_batch=1)
    for i in range(20000):
        pub.send(_record(), now=float(i))
    assert pub._msg.steps == []


def _step_json(**changes) -> bytes:
    step = {**asdict(_record()), **changes}
    return json.dumps({"v": 1, "info": None, "steps": [step], "errors": 0, "kv": None}).encode()


@pytest.mark.parametrize(
    "data,message",
    [
        (b'{"v": 1, "info": null, "steps": {}, "errors": 0, "kv": null}', "steps must be a list"),
        (b'{"v": 1, "info": null, "steps": [], "errors": 0, "kv": [1]}', "kv must be [used, cached]"),
        (b'{"v": 1, "info": null, "steps": [], "errors": 1.5, "kv": null}', "errors must be a number"),
        (b'{"v": 1, "info": null, "steps": [], "errors": "many", "kv": null}', "errors must be a number"),
        (b'{"v": 1, "info": null, "steps": [3], "errors": 0, "kv": null}', "a step must be an object"),
        (_step_json(bound=1), "bound must be a string"),
        (_step_json(first_token_ttfts_s={}), "first_token_ttfts_s and finished must be lists"),
        (_step_json(finished={}), "first_token_ttfts_s and finished must be lists"),
        (_step_json(finished=[[0.5]]), "a request timing must be an object"),
    ],
)
def test_a_malformed_message_is_refused_saying_what_is_wrong(data, message):
    with pytest.raises(TypeError) as err:
        decode(data)
    assert str(err.value) == message


def test_a_request_without_tokens_survives_the_round_trip():
    """An aborted request may finish before its first token: no first or last token time."""
    msg = Message(steps=[_record(finished=[RequestTiming(arrival_s=0.5)])])
    assert decode(encode(msg)) == msg


class FakeSocket:
    """The publisher's socket: records what it sends, or refuses as a full queue does (zmq.Again)."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.sent: list[Message] = []

    def send(self, data, flags):
        if self.refuse:
            raise zmq.Again()
        self.sent.append(decode(data))


def _publisher(refuse=False, **batching) -> tuple[StatsPublisher, FakeSocket]:
    pub = StatsPublisher("inproc://maia-test-unused", **batching)
    pub._socket.close(0)
    pub._socket = FakeSocket(refuse)
    return pub, pub._socket


def test_a_batch_leaves_with_a_first_token_a_finish_a_full_batch_or_an_old_record():
    timing = RequestTiming(arrival_s=0.0, first_token_s=0.5, last_token_s=0.5, num_output_tokens=1)
    for urgent in (_record(first=[0.5]), _record(finished=[timing])):
        pub, socket = _publisher(max_batch=64, max_delay_s=3600.0)
        pub.send(urgent, now=100.0)
        assert [len(m.steps) for m in socket.sent] == [1]
    pub, socket = _publisher(max_batch=2, max_delay_s=3600.0)
    pub.send(_record(), now=100.0)
    assert socket.sent == []
    pub.send(_record(), now=100.0)
    assert [len(m.steps) for m in socket.sent] == [2]
    pub, socket = _publisher(max_batch=64, max_delay_s=1.0)
    pub.send(_record(), now=100.0)  # the oldest record's age counts from its own send
    pub.send(_record(), now=100.5)
    assert socket.sent == []
    pub.send(_record(), now=101.0)
    assert [len(m.steps) for m in socket.sent] == [3]


def test_by_default_a_batch_leaves_at_64_records_or_50_ms():
    pub, socket = _publisher()
    for _ in range(63):
        pub.send(_record(), now=0.0)
    assert socket.sent == []
    pub.send(_record(), now=0.0)
    assert [len(m.steps) for m in socket.sent] == [64]
    pub.send(_record(), now=1.0)
    pub.send(_record(), now=1.04)
    assert len(socket.sent) == 1
    pub.send(_record(), now=1.05)
    assert [len(m.steps) for m in socket.sent] == [64, 3]


def test_what_an_unread_channel_refuses_is_kept_device_facts_and_error_count():
    pub, socket = _publisher(refuse=True)
    pub.announce(INFO)
    pub.count_error()
    pub.count_error()
    socket.refuse = False
    pub.flush()
    assert [(m.info, m.errors) for m in socket.sent] == [(INFO, 2)]


def test_only_the_first_malformed_message_is_logged(addr, receiver, caplog):
    caplog.set_level(logging.WARNING, logger="vllm.maia_serving")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(addr)
    push.send(b"[1, 2]")
    push.send(b'{"v": 1}')  # malformed another way: only the first one's reason is logged
    _drain_until(receiver, lambda: receiver.dropped == 2)
    push.close()
    (warning,) = [r for r in caplog.records if r.name == "vllm.maia_serving"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        "maia-serving: dropped a malformed message on the metrics channel (not a "
        "maia-serving stats message); counted in "
        'maia:emulation_errors_total{stage="channel"}'
    )


def test_drain_applies_every_waiting_message_and_counts_their_records():
    """In-process transport: a message is waiting as soon as send() returns."""
    rx = StatsReceiver("inproc://maia-test-drain", registry=CollectorRegistry())
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect("inproc://maia-test-drain")
    push.send(encode(Message(steps=[_record()], errors=3)))
    push.send(b"garbage")  # dropped; the messages after it are still applied
    push.send(encode(Message(steps=[_record(), _record()])))
    try:
        assert rx.drain() == 3
        assert rx.drain() == 0
        assert _value(rx, "maia:emulated_step_seconds_count") == 3
        assert _value(rx, "maia:emulation_errors_total", stage="charge") == 3
        assert _value(rx, "maia:emulation_errors_total", stage="channel") == 1
    finally:
        push.close()
        rx.close()


def test_the_receiver_fills_the_registry_vllm_serves_by_default(monkeypatch):
    served = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", served)
    rx = StatsReceiver("inproc://maia-test-default-registry")
    try:
        assert rx.metrics.registry is served
    finally:
        rx.close()

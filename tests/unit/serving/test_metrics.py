"""The maia:* metrics and the periodic log line: what /metrics and the log say after the device
facts and a step are applied, checked figure by figure (the README documents these names), and
the device facts' type checks (they arrive from another process)."""

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.device.session import EmulatedDevice, StepRecord
from maia_serving.formats.units import format_bytes
from maia_serving.serving.metrics import DeviceInfo, EmulatedMetricSet, PeriodicLog

INFO = DeviceInfo(
    profile="maia100",
    model="demo",
    kv_cache_dtype="fp8",
    tensor_parallel_size=2,
    pipeline_parallel_size=1,
    hbm_total_bytes=64e9,
    hbm_static_bytes=2e9,
    kv_block_bytes=1e6,
    emulated_kv_blocks=1000,
    engine_kv_blocks=100,
    block_size=16,
)

# name: (type, help, labels besides "le")
FAMILIES = {
    "maia:emulated_step_seconds": ("histogram", "Emulated time of one engine step", set()),
    "maia:host_step_seconds": ("counter", "Measured host time of the charged steps", set()),
    "maia:emulator_overhead_seconds": ("counter", "Host time spent charging steps to the emulator", set()),
    "maia:emulated_busy_seconds": ("counter", "Emulated device time, summed over steps", set()),
    "maia:emulated_clock_seconds": (
        "gauge",
        "Emulated time at the end of the last step, idle time included (the clock follows the host while "
        "no request is open)",
        set(),
    ),
    "maia:emulated_time_by_part_seconds": (
        "counter",
        "Emulated step time by part (compute, memory, communication, launch)",
        {"part"},
    ),
    "maia:emulated_tokens": ("counter", "Tokens the emulated device processed", set()),
    "maia:emulated_collectives": (
        "counter",
        "Collectives the engine performed and the emulated interconnect was charged for",
        set(),
    ),
    "maia:emulated_collective_bytes": ("counter", "Bytes of the charged collectives", set()),
    "maia:emulation_errors": (
        "counter",
        "Steps left uncharged or records dropped because of an error in the emulation (the engine kept "
        "serving); see the server log",
        {"stage"},
    ),
    "maia:emulated_time_to_first_token_seconds": ("histogram", "Emulated TTFT", set()),
    "maia:emulated_time_per_output_token_seconds": ("histogram", "Emulated TPOT", set()),
    "maia:emulated_e2e_request_latency_seconds": ("histogram", "Emulated end-to-end request latency", set()),
    "maia:hbm_used_bytes": ("gauge", "Emulated HBM in use on one chip", set()),
    "maia:hbm_total_bytes": ("gauge", "Emulated HBM capacity of one chip", set()),
    "maia:kv_cache_blocks_used": ("gauge", "KV cache blocks held by running requests", set()),
    "maia:kv_cache_blocks_cached": (
        "gauge",
        "KV cache blocks held only by the prefix cache (reusable, evictable)",
        set(),
    ),
    "maia:kv_cache_blocks": ("gauge", "KV cache blocks", {"holder"}),
    "maia:kv_cache_tokens": ("gauge", "KV cache capacity in tokens (blocks x block size)", {"holder"}),
    "maia:device_info": (
        "gauge",
        "The emulated device",
        {"profile", "model", "kv_cache_dtype", "tensor_parallel_size"},
    ),
}
STEP_BUCKETS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
LATENCY_BUCKETS = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


def _timing(first_s, last_s, tokens):
    return RequestTiming(arrival_s=0.0, first_token_s=first_s, last_token_s=last_s, num_output_tokens=tokens)


def _record(**changes) -> StepRecord:
    fields = dict(
        step_s=0.25,
        compute_s=0.125,
        memory_s=0.0625,
        comm_s=0.03125,
        launch_s=0.03125,
        bound="compute",
        num_tokens=7,
        num_seqs=2,
        now_s=1.5,
        wall_s=0.5,
        kv_blocks_used=3,
        kv_blocks_cached=1,
        overhead_s=0.0078125,
        num_collectives=5,
        comm_bytes=4096,
    )
    return StepRecord(**{**fields, **changes})


@pytest.fixture
def metrics():
    return EmulatedMetricSet(CollectorRegistry())


def _value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None)


def test_every_family_has_its_documented_name_type_help_and_labels(metrics):
    metrics.apply(INFO)
    metrics.apply(_record(first_token_ttfts_s=[0.5], finished=[_timing(0.5, 1.5, 3)]))
    got = {}
    for family in metrics.registry.collect():
        labels = {k for sample in family.samples for k in sample.labels} - {"le"}
        got[family.name] = (family.type, family.documentation, labels)
    assert got == FAMILIES
    gauges = [
        metrics.clock,
        metrics.hbm_used,
        metrics.hbm_total,
        metrics.kv_used,
        metrics.kv_cached,
        metrics.kv_total,
        metrics.kv_tokens,
        metrics.device,
    ]
    # SGLang's /metrics merges the files of several processes: a gauge is the latest value set.
    assert {g._multiprocess_mode for g in gauges} == {"mostrecent"}


def test_the_default_registry_is_the_one_the_engines_serve(monkeypatch):
    served = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", served)
    assert EmulatedMetricSet().registry is served
    assert served.get_sample_value("maia:emulation_errors_total", {"stage": "charge"}) == 0


def _buckets(metrics, name):
    return [
        float(s.labels["le"])
        for f in metrics.registry.collect()
        if f.name == name
        for s in f.samples
        if s.name.endswith("_bucket")
    ][:-1]  # without +Inf


def test_histograms_have_step_and_latency_buckets(metrics):
    assert _buckets(metrics, "maia:emulated_step_seconds") == STEP_BUCKETS
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert _buckets(metrics, f"maia:emulated_{name}_seconds") == LATENCY_BUCKETS


def test_device_facts_set_capacity_and_zero_use(metrics):
    metrics.set_kv(5, 6)  # before the facts: no HBM figure to derive yet
    assert _value(metrics, "maia:hbm_used_bytes") == 0
    metrics.apply(INFO)
    assert metrics.info is INFO
    assert _value(metrics, "maia:hbm_total_bytes") == 64e9
    assert _value(metrics, "maia:hbm_used_bytes") == 2e9
    assert (_value(metrics, "maia:kv_cache_blocks_used"), _value(metrics, "maia:kv_cache_blocks_cached")) == (0, 0)
    assert _value(metrics, "maia:kv_cache_blocks", holder="emulated") == 1000
    assert _value(metrics, "maia:kv_cache_blocks", holder="engine") == 100
    assert _value(metrics, "maia:kv_cache_tokens", holder="emulated") == 16000
    assert _value(metrics, "maia:kv_cache_tokens", holder="engine") == 1600
    assert (
        _value(
            metrics, "maia:device_info", profile="maia100", model="demo", kv_cache_dtype="fp8", tensor_parallel_size="2"
        )
        == 1
    )


def test_a_step_moves_every_figure(metrics):
    metrics.apply(INFO)
    finished = [_timing(0.5, 1.5, 3), _timing(0.5, 0.5, 1), RequestTiming(arrival_s=0.0)]
    metrics.apply(_record(first_token_ttfts_s=[0.5, 0.25], finished=finished))
    assert _value(metrics, "maia:emulated_step_seconds_sum") == 0.25
    assert _value(metrics, "maia:emulated_step_seconds_count") == 1
    assert _value(metrics, "maia:host_step_seconds_total") == 0.5
    assert _value(metrics, "maia:emulator_overhead_seconds_total") == 0.0078125
    assert _value(metrics, "maia:emulated_busy_seconds_total") == 0.25
    assert _value(metrics, "maia:emulated_clock_seconds") == 1.5
    parts = {
        p: _value(metrics, "maia:emulated_time_by_part_seconds_total", part=p)
        for p in ("compute", "memory", "communication", "launch")
    }
    assert parts == {"compute": 0.125, "memory": 0.0625, "communication": 0.03125, "launch": 0.03125}
    assert _value(metrics, "maia:emulated_tokens_total") == 7
    assert (
        _value(metrics, "maia:emulated_collectives_total"),
        _value(metrics, "maia:emulated_collective_bytes_total"),
    ) == (5, 4096)
    assert _value(metrics, "maia:emulated_time_to_first_token_seconds_sum") == 0.75
    # Only a request with two tokens or more has a TPOT; one that never got a token has no latency.
    assert (
        _value(metrics, "maia:emulated_time_per_output_token_seconds_count"),
        _value(metrics, "maia:emulated_time_per_output_token_seconds_sum"),
    ) == (1, 0.5)
    assert (
        _value(metrics, "maia:emulated_e2e_request_latency_seconds_count"),
        _value(metrics, "maia:emulated_e2e_request_latency_seconds_sum"),
    ) == (2, 2.0)
    assert (_value(metrics, "maia:kv_cache_blocks_used"), _value(metrics, "maia:kv_cache_blocks_cached")) == (3, 1)
    assert _value(metrics, "maia:hbm_used_bytes") == 2e9 + 3 * 1e6


def test_errors_are_counted_by_stage_and_both_stages_start_at_zero(metrics):
    assert _value(metrics, "maia:emulation_errors_total", stage="charge") == 0
    assert _value(metrics, "maia:emulation_errors_total", stage="channel") == 0
    metrics.count_errors("charge")
    metrics.count_errors("channel", 3)
    assert _value(metrics, "maia:emulation_errors_total", stage="charge") == 1
    assert _value(metrics, "maia:emulation_errors_total", stage="channel") == 3


def test_device_facts_survive_the_round_trip_and_wrong_types_are_named():
    assert DeviceInfo.from_dict(INFO.to_dict()) == INFO
    assert DeviceInfo.from_dict({**INFO.to_dict(), "hbm_total_bytes": 64}).hbm_total_bytes == 64  # an int is a float
    for name, value, message in [
        ("profile", 3, "profile must be str, got int"),
        ("tensor_parallel_size", True, "tensor_parallel_size must be int, got bool"),
        ("block_size", 16.0, "block_size must be int, got float"),
        ("kv_block_bytes", "1e6", "kv_block_bytes must be float, got str"),
    ]:
        with pytest.raises(TypeError) as err:
            DeviceInfo.from_dict({**INFO.to_dict(), name: value})
        assert str(err.value) == message


@pytest.fixture(scope="module")
def device():
    return EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )


def _line(device, steps, emulated, host, record, ttft, tpot):
    return (
        f"Maia emulation [maia100]: llama-3-8b, {steps} steps, emulated {emulated} vs host {host} "
        "(last step 250 ms: compute 125 ms, memory 62.5 ms, communication 31.2 ms (5 collectives), launch 31.2 ms; "
        "compute-bound), "
        f"emulated TTFT mean {ttft}, TPOT mean {tpot}, "
        f"HBM {format_bytes(device.hbm_used_bytes(record.kv_blocks_used))}/64.00 GiB, "
        f"KV blocks {record.kv_blocks_used}/{device.plan.num_blocks} used, {record.kv_blocks_cached} cached"
    )


def test_the_log_line_sums_each_interval_and_means_the_latencies(device):
    log = PeriodicLog(device, interval_s=10.0)
    assert log.observe(_record(), wall_now=100.0) is None
    assert log.observe(_record(), wall_now=105.0) is None
    last = _record(kv_blocks_used=5, kv_blocks_cached=2)
    assert log.observe(last, wall_now=110.0) == _line(device, 3, "750 ms", "1.5 s", last, "n/a", "n/a")
    # The next interval starts from zero; the latency means cover the last 1000 requests.
    assert log.observe(_record(first_token_ttfts_s=[0.5], finished=[_timing(0.5, 1.5, 3)]), 115.0) is None
    last = _record(first_token_ttfts_s=[0.25], finished=[_timing(0.5, 0.5, 1), _timing(1.0, 2.5, 4)])
    assert log.observe(last, wall_now=120.0) == _line(device, 2, "500 ms", "1 s", last, "375 ms", "500 ms")


def test_the_latency_means_cover_the_last_1000_requests(device):
    log = PeriodicLog(device, interval_s=0.0)
    log.observe(_record(first_token_ttfts_s=[8.0], finished=[_timing(0.0, 8.0, 2)]), 0.0)
    line = log.observe(_record(first_token_ttfts_s=[0.5] * 1000, finished=[_timing(0.0, 0.5, 2)] * 1000), 0.0)
    assert "emulated TTFT mean 500 ms, TPOT mean 500 ms, " in line


def test_the_log_line_comes_every_ten_seconds_by_default(device):
    log = PeriodicLog(device)
    assert log.observe(_record(), 0.0) is None
    assert log.observe(_record(), 9.5) is None
    assert log.observe(_record(), 10.0) is not None


def test_an_mxfp4_device_shows_its_capacity_and_block_bytes(metrics):
    """Llama-3-8B on a Maia 100 with an MXFP4 KV cache: 34,816 bytes a token (68-byte head rows), 78,645 blocks
    of 16 (memory tests by hand), and each used block adds its 557,056 bytes to the HBM in use."""
    device = EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(kv_cache_dtype="mxfp4")
    )
    metrics.apply(DeviceInfo.of(device, engine_kv_blocks=100))
    assert _value(metrics, "maia:kv_cache_blocks", holder="emulated") == 78_645
    assert _value(metrics, "maia:kv_cache_tokens", holder="emulated") == 78_645 * 16 == 1_258_320
    assert (
        _value(
            metrics,
            "maia:device_info",
            profile="maia100",
            model="llama-3-8b",
            kv_cache_dtype="mxfp4",
            tensor_parallel_size="1",
        )
        == 1
    )
    static = _value(metrics, "maia:hbm_used_bytes")
    metrics.set_kv(10, 0)
    assert _value(metrics, "maia:hbm_used_bytes") - static == 10 * 16 * 34_816

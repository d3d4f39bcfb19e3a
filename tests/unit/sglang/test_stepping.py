"""Charging SGLang steps: what the hooks read off a batch and the scheduler, what the emulated
clock makes of it, and that nothing the engine does to a request can make charging raise."""

import logging
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import ServingConfig
from maia_serving.emulator.model_shape import load_model_shape
from maia_serving.serving import stepping as serving_stepping
from maia_serving.serving.metrics import EmulatedMetricSet
from maia_serving.sglang import stepping
from maia_serving.sglang.stepping import MaiaStepper, step_shape

POOL_TOKENS = 160  # the engine's KV pool; emulated blocks of 16 tokens


def req(rid: str, outputs: int = 0, done: bool = False):
    r = SimpleNamespace(rid=rid, output_ids=[0] * outputs, done=done)
    r.finished = lambda: r.done
    return r


def extend_batch(reqs, prefix, extend):
    return SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs, prefix_lens=prefix, extend_lens=extend)


def decode_batch(reqs, seq_lens):
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=reqs, seq_lens_cpu=torch.tensor(seq_lens))


class FakeScheduler:
    """The scheduler state the stepper reads: free slots, slots only the radix cache holds,
    what runs."""

    def __init__(self):
        self.free, self.evictable = POOL_TOKENS, 0
        self.token_to_kv_pool_allocator = SimpleNamespace(available_size=lambda: self.free)
        self.tree_cache = SimpleNamespace(evictable_size=lambda: self.evictable)
        self.running_batch = SimpleNamespace(reqs=[])
        self.chunked_req = None

    def hold(self, used: int, cached: int = 0) -> None:
        self.free, self.evictable = POOL_TOKENS - used - cached, cached


def test_step_shape_of_extend_and_decode():
    # A cold prefill of 7 and a prefix hit: 3 new tokens after 5 cached.
    assert step_shape(extend_batch([req("a"), req("b")], [0, 5], [7, 3])) == ((7, 3), (7, 8))
    # Decode: one token each; seq_lens already count it.
    assert step_shape(decode_batch([req("a"), req("b")], [8, 9])) == ((1, 1), (8, 9))
    assert step_shape(SimpleNamespace(forward_mode=ForwardMode.IDLE)) is None


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def stepper(monkeypatch, registry, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(stepping, "EmulatedMetricSet", lambda: EmulatedMetricSet(registry))
    device = EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )
    return MaiaStepper(device, engine_kv_tokens=POOL_TOKENS)


def _run(stepper, sched, batch, emit=(), finish=()):
    """One step: run_batch, then the engine appends tokens and finishes requests, then the result."""
    stepper.before_run(batch)
    for r in batch.reqs:
        if r.rid in emit:
            r.output_ids.append(1)
        if r.rid in finish:
            r.done = True
    stepper.after_result(batch, sched)


def _value(registry, name, **labels):
    return registry.get_sample_value(name, labels or None)


def test_a_request_is_timed_from_arrival_to_its_last_token(stepper):
    sched = FakeScheduler()
    cost = CostModel(stepper.device.profile, load_model_shape("llama-3-8b"))
    stepper.arrive("a")
    a = req("a")
    sched.hold(used=512 // 16)
    _run(stepper, sched, extend_batch([a], [0], [512]), emit={"a"})
    prefill_s = cost.cost_of((512,), (512,)).total_s
    timing = stepper.device.clock.requests["a"]
    assert timing.ttft_s == pytest.approx(prefill_s, rel=1e-12)
    decode_s = [cost.cost_of((1,), (513 + n,)).total_s for n in range(2)]
    _run(stepper, sched, decode_batch([a], [513]), emit={"a"})
    _run(stepper, sched, decode_batch([a], [514]), emit={"a"}, finish={"a"})
    assert "a" not in stepper.device.clock.requests  # finished requests leave the clock
    assert timing.num_output_tokens == 3
    assert timing.tpot_s == pytest.approx(sum(decode_s) / 2, rel=1e-12)
    assert timing.e2e_s == pytest.approx(prefill_s + sum(decode_s), rel=1e-12)


def test_used_and_cached_kv_come_from_the_scheduler_in_emulated_blocks(stepper, registry):
    sched = FakeScheduler()
    stepper.arrive("a")
    sched.hold(used=20, cached=40)  # 20 slots for the request, 40 only in the radix cache
    _run(stepper, sched, extend_batch([req("a")], [0], [20]), emit={"a"})
    assert _value(registry, "maia:kv_cache_blocks_used") == 2  # ceil(20 / 16)
    assert _value(registry, "maia:kv_cache_blocks_cached") == 2  # 40 // 16
    info = stepper.metrics.info
    assert _value(registry, "maia:hbm_used_bytes") == info.hbm_static_bytes + 2 * info.kv_block_bytes


def test_idle_server_with_a_warm_prefix_cache_reports_nothing_used(stepper, registry):
    sched = FakeScheduler()
    stepper.arrive("a")
    sched.hold(used=0, cached=64)  # the request finished; its prefix stays cached
    _run(stepper, sched, extend_batch([req("a")], [0], [8]), emit={"a"}, finish={"a"})
    assert _value(registry, "maia:kv_cache_blocks_used") == 0
    assert _value(registry, "maia:kv_cache_blocks_cached") == 4
    assert _value(registry, "maia:hbm_used_bytes") == stepper.metrics.info.hbm_static_bytes


def test_an_idle_batch_charges_nothing(stepper):
    stepper.before_run(SimpleNamespace(forward_mode=ForwardMode.IDLE, reqs=[]))
    stepper.after_result(SimpleNamespace(reqs=[]), FakeScheduler())
    assert stepper.device.clock.num_steps == 0
    assert stepper.charger.errors == 0


def test_abort_forgets_waiting_requests_and_keeps_running_ones(stepper, registry):
    sched = FakeScheduler()
    for rid in ("a-1", "a-2", "b"):
        stepper.arrive(rid)
    sched.running_batch.reqs = [req("a-2")]
    stepper.abort(SimpleNamespace(rid="a", abort_all=False), sched)  # SGLang matches by prefix
    assert set(stepper.device.clock.requests) == {"a-2", "b"}
    stepper.abort(SimpleNamespace(rid="", abort_all=True), sched)
    assert set(stepper.device.clock.requests) == {"a-2"}


def test_abort_reports_the_kv_it_freed(stepper, registry):
    sched = FakeScheduler()
    stepper.arrive("a")
    sched.hold(used=48)
    _run(stepper, sched, extend_batch([req("a")], [0], [48]), emit={"a"})
    assert _value(registry, "maia:kv_cache_blocks_used") == 3
    sched.hold(used=0)  # the abort released it; no step follows
    stepper.abort(SimpleNamespace(rid="a", abort_all=False), sched)
    assert _value(registry, "maia:kv_cache_blocks_used") == 0


def test_a_request_finished_early_or_aborted_mid_batch_is_charged_and_leaves(stepper):
    sched = FakeScheduler()
    a, b = req("a"), req("b")
    for r in (a, b):
        stepper.arrive(r.rid)
    _run(stepper, sched, extend_batch([a, b], [0, 0], [4, 4]), emit={"a", "b"})
    # b was aborted by its client: SGLang finishes it in the next batch without a token.
    _run(stepper, sched, decode_batch([a, b], [5, 5]), emit={"a"}, finish={"b"})
    assert set(stepper.device.clock.requests) == {"a"}
    assert stepper.device.clock.num_steps == 2


def test_a_request_unknown_to_the_clock_is_charged_without_error(stepper, registry):
    """Preempted and retried, or arrived before the stepper existed: no KeyError, no error count."""
    _run(stepper, FakeScheduler(), decode_batch([req("ghost")], [10]), emit={"ghost"}, finish={"ghost"})
    assert stepper.device.clock.num_steps == 1
    assert _value(registry, "maia:emulation_errors_total", stage="charge") == 0


def test_an_error_in_charging_is_logged_counted_and_never_raised(stepper, registry, caplog):
    caplog.set_level(logging.ERROR)
    broken = SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=[req("a")], seq_lens_cpu=None)
    stepper.before_run(broken)  # .tolist() of None raises inside the stepper
    sched = FakeScheduler()
    sched.token_to_kv_pool_allocator = None  # and so does reading the pool
    _run(stepper, sched, extend_batch([req("b")], [0], [4]), emit={"b"})
    assert _value(registry, "maia:emulation_errors_total", stage="charge") == 2
    assert caplog.text.count("Traceback") == 1  # in full once, then quietly
    assert caplog.records[0].getMessage().startswith("maia-serving: reading a step's shape failed; ")
    assert stepper.device.clock.num_steps == 0


def test_a_result_without_a_read_step_charges_nothing(stepper):
    """process_batch_result for a batch run_batch never saw (the hooks registered mid-flight)."""
    stepper.after_result(extend_batch([req("a")], [0], [4]), FakeScheduler())
    assert (stepper.device.clock.num_steps, stepper.charger.errors) == (0, 0)


def test_without_a_multiprocess_folder_there_are_no_metrics_and_charging_still_works(monkeypatch, registry):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(stepping, "EmulatedMetricSet", lambda: EmulatedMetricSet(registry))
    device = EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )
    quiet = MaiaStepper(device, engine_kv_tokens=POOL_TOKENS)
    assert quiet.metrics is None
    quiet.arrive("a")
    _run(quiet, FakeScheduler(), extend_batch([req("a")], [0], [4]), emit={"a"})
    assert (quiet.device.clock.num_steps, quiet.charger.errors) == (1, 0)


def test_the_engine_pool_counts_whole_blocks(monkeypatch, registry, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(stepping, "EmulatedMetricSet", lambda: EmulatedMetricSet(registry))
    device = EmulatedDevice.fit(
        load_profile("maia100"), load_model_shape("llama-3-8b"), ServingConfig(max_model_len=4096)
    )
    MaiaStepper(device, engine_kv_tokens=POOL_TOKENS + 10)
    assert _value(registry, "maia:kv_cache_blocks", holder="engine") == POOL_TOKENS // 16


def test_host_time_is_the_wall_time_from_run_to_result_and_overhead_the_cpu_time(stepper, registry, monkeypatch):
    """Both read off fake clocks: 0.5 s between run_batch and the result, no CPU time spent."""
    wall = iter([100.0, 100.5])
    fake = SimpleNamespace(perf_counter=lambda: next(wall), thread_time=lambda: 1000.0, monotonic=lambda: 0.0)
    monkeypatch.setattr(stepping, "time", fake)
    monkeypatch.setattr(serving_stepping, "time", fake)
    stepper.arrive("a")
    _run(stepper, FakeScheduler(), extend_batch([req("a")], [0], [4]), emit={"a"})
    assert _value(registry, "maia:host_step_seconds_total") == 0.5
    assert _value(registry, "maia:emulator_overhead_seconds_total") == 0.0


def test_a_request_in_a_chunked_prefill_runs_on_through_an_abort(stepper):
    sched = FakeScheduler()
    stepper.arrive("a-1")
    sched.chunked_req = req("a-1")  # between its chunks it is in no batch, yet it runs
    stepper.abort(SimpleNamespace(rid="a", abort_all=False), sched)
    assert set(stepper.device.clock.requests) == {"a-1"}


@pytest.mark.parametrize(
    "hook,what",
    [
        (lambda stepper, sched: stepper.abort(SimpleNamespace(rid="a", abort_all=False), sched), "a request's abort"),
        (lambda stepper, sched: _run(stepper, sched, extend_batch([req("b")], [0], [4])), "charging a step"),
    ],
    ids=["abort", "result"],
)
def test_each_hook_names_itself_when_it_fails(stepper, caplog, hook, what):
    caplog.set_level(logging.ERROR)
    broken = FakeScheduler()
    broken.token_to_kv_pool_allocator = broken.running_batch = None
    hook(stepper, broken)
    assert caplog.records[0].getMessage().startswith(f"maia-serving: {what} failed; ")


@pytest.mark.parametrize("engine_collectives", [True, False], ids=["counted", "cost-model"])
def test_the_collectives_a_step_made_are_what_it_is_charged(monkeypatch, registry, tmp_path, engine_collectives):
    """The patch's tally (maia_serving.sglang.patch.collectives) of what ran inside run_batch goes with the
    step's result and is the step's communication; calls before run_batch belong to no step. Without engine
    collectives (a proxy shape) the cost model counts."""
    from maia_serving.sglang.patch import collectives

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(stepping, "EmulatedMetricSet", lambda: EmulatedMetricSet(registry))
    device = EmulatedDevice.fit(
        load_profile("maia100"),
        load_model_shape("llama-3-8b"),
        ServingConfig(max_model_len=4096, tensor_parallel_size=2),
    )
    stepper = MaiaStepper(device, engine_kv_tokens=POOL_TOKENS, engine_collectives=engine_collectives)
    group = SimpleNamespace(world_size=2)
    hidden = torch.zeros(8, 4096, dtype=torch.bfloat16)
    collectives.after_all_reduce(None, group, hidden)  # a scheduler-side call before the step
    stepper.arrive("a")
    a, batch, sched = req("a"), extend_batch([req("a")], [0], [8]), FakeScheduler()
    collectives.before_run_batch(sched, batch)
    stepper.before_run(batch)
    for _ in range(3):
        collectives.after_all_reduce(None, group, hidden)
    collectives.after_all_gather(None, group, torch.zeros(1, 64_128, dtype=torch.bfloat16))
    result = SimpleNamespace()
    collectives.after_run_batch(result, sched, batch)
    collectives.after_all_reduce(None, group, hidden)  # processing the result: no step's
    a.output_ids.append(1)
    stepper.after_result(batch, sched, result)
    formula = device.cost_model.cost_of((8,), (8,))
    rows = [(0, 2, 8 * 4096 * 2, 3, 0), (1, 2, 2 * 64_128 * 2, 1, 0)]
    assert sorted(getattr(result, collectives.RELAY)) == rows
    comm = device.cost_model.collectives_s(rows) if engine_collectives else formula.comm_s
    assert device.clock.busy_s == pytest.approx(formula.total_s - formula.comm_s + comm, rel=1e-12)
    assert _value(registry, "maia:emulated_collectives_total") == (4 if engine_collectives else 0)
    collectives.TALLY.clear()


def _stage_run(collectives, sched, batch, calls, proxy=None):
    """One pipeline stage's run_batch: what it received, its own calls (``calls`` all-reduces of 64 bytes)."""
    collectives.before_run_batch(sched, batch, proxy)
    for _ in range(calls):
        collectives.after_all_reduce(None, SimpleNamespace(world_size=2), torch.zeros(32, dtype=torch.bfloat16))
    result = SimpleNamespace(
        pp_hidden_states_proxy_tensors=SimpleNamespace(
            tensors={
                "hidden_states": torch.zeros(8, 16, dtype=torch.bfloat16),
                "residual": torch.zeros(8, 16, dtype=torch.bfloat16),
            }
        )
    )
    collectives.after_run_batch(result, sched, batch)
    return result


def test_pipeline_stages_relay_the_steps_tally_to_the_first(monkeypatch, registry, tmp_path):
    """Three stages (each two tensor-parallel ranks): each relays its tally with its activations, adding its send
    (the hidden states and the residual, 2 x 256 bytes, from that stage); the last returns the whole step's
    with the sampled tokens, and the first stage's result of that micro-batch is charged with it."""
    from maia_serving.sglang.patch import collectives

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(stepping, "EmulatedMetricSet", lambda: EmulatedMetricSet(registry))
    device = EmulatedDevice.fit(
        load_profile("maia100"),
        load_model_shape("llama-3-8b"),
        ServingConfig(max_model_len=4096, tensor_parallel_size=2, pipeline_parallel_size=2),
    )
    stepper = MaiaStepper(device, engine_kv_tokens=POOL_TOKENS, engine_collectives=True)
    stages = [FakeScheduler() for _ in range(3)]
    for rank, sched in enumerate(stages):
        sched.pp_group = SimpleNamespace(rank_in_group=rank)
    stepper.arrive("a")
    a = req("a")
    batch = extend_batch([a], [0], [8])
    stepper.before_run(batch)
    proxy = None
    for rank, calls in enumerate((3, 2, 4)):
        result = _stage_run(collectives, stages[rank], batch, calls, proxy)
        if rank < 2:
            collectives.before_send_proxy(stages[rank], result)
            proxy = SimpleNamespace(tensors=dict(result.pp_hidden_states_proxy_tensors.tensors))
    outputs = collectives.after_prepare_outputs({"next_token_ids": torch.zeros(1)}, stages[2], result, batch)
    first_result = SimpleNamespace()
    collectives.after_prep_batch_result(first_result, stages[0], batch, None, SimpleNamespace(tensors=outputs))
    assert collectives.RELAY not in outputs  # taken out before the first stage forwards the outputs on
    rows = sorted(getattr(first_result, collectives.RELAY))
    assert rows == [(0, 2, 64, 9, 0), (4, 2, 512, 1, 0), (4, 2, 512, 1, 1)]
    a.output_ids.append(1)
    stepper.after_result(batch, stages[0], first_result)
    assert _value(registry, "maia:emulated_collectives_total") == 11
    assert _value(registry, "maia:emulated_collective_bytes_total") == 9 * 64 + 2 * 512
    collectives.TALLY.clear()


def test_micro_batches_in_flight_are_each_charged_with_their_own_shape(stepper, registry):
    """With pipeline parallelism the first stage launches a micro-batch before it processes the result of an
    earlier one: run A, run B, A's result, B's result. Each result is charged with what its own run read."""
    sched = FakeScheduler()
    for rid in "ab":
        stepper.arrive(rid)
    a, b = req("a"), req("b")
    batch_a, batch_b = extend_batch([a], [0], [7]), extend_batch([b], [0], [3])
    stepper.before_run(batch_a)
    stepper.before_run(batch_b)
    a.output_ids.append(1)
    stepper.after_result(batch_a, sched)
    b.output_ids.append(1)
    stepper.after_result(batch_b, sched)
    assert _value(registry, "maia:emulated_tokens_total") == 10
    # Each request's first token came with its own step: two TTFTs, the second after both steps.
    cost = stepper.device.cost_model
    first, second = cost.cost_of((7,), (7,)).total_s, cost.cost_of((3,), (3,)).total_s
    assert _value(registry, "maia:emulated_time_to_first_token_seconds_count") == 2
    assert _value(registry, "maia:emulated_time_to_first_token_seconds_sum") == pytest.approx(
        first + (first + second), rel=1e-9
    )


def test_a_one_rank_group_counts_nothing_and_a_reduce_scatter_counts_its_inputs():
    from maia_serving.sglang.patch import collectives

    collectives.TALLY.clear()
    x = torch.zeros(4, 8, dtype=torch.float32)
    collectives.after_all_reduce(None, SimpleNamespace(world_size=1), x)
    collectives.after_gather(None, SimpleNamespace(world_size=1), x)
    assert collectives.TALLY.rows() == []
    collectives.after_reduce_scatter(None, SimpleNamespace(world_size=2), x[:2], [x[:2], x[2:]])
    collectives.after_gather(None, SimpleNamespace(world_size=2), x)
    assert sorted(collectives.TALLY.take()) == [(2, 2, 256, 1, 0), (3, 2, 128, 1, 0)]


def test_a_paced_arrival_during_the_wait_is_stamped_with_its_age(stepper):
    """Paced, after a step: a request the API server created 3 ms ago (it came in while the engine waited out the
    step) arrives 3 ms before the step's end on the emulated clock, as on vLLM (patch/request_age.py)."""
    clock = stepper.device.clock
    stepper.charger.pace = clock.paced = True  # as MAIA_SERVING_PACE=1 sets them: the step is waited out
    sched = FakeScheduler()
    stepper.arrive("a")
    _run(stepper, sched, extend_batch([req("a")], [0], [512]), emit={"a"})
    end_s = clock.now_s
    assert clock._last_step_s > 3e-3  # a 512-token prefill of Llama-3-8B on Maia 100 takes longer than that
    stepper.arrive("b", age_s=3e-3)
    assert clock.requests["b"].arrival_s == pytest.approx(end_s - 3e-3, abs=1e-3)


def test_a_relay_hook_that_fails_leaves_sglangs_call_alone(caplog):
    """A result without the activations SGLang sends (an SGLang change, say): the hook logs once and returns
    None, which keeps SGLang's own arguments and result, and the engine serves on."""
    from maia_serving.sglang.patch import collectives

    caplog.set_level(logging.ERROR)
    sched = SimpleNamespace(pp_group=SimpleNamespace(rank_in_group=0))
    assert collectives.before_send_proxy(sched, SimpleNamespace()) is None
    assert collectives.before_send_proxy(sched, SimpleNamespace()) is None
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["maia-serving: before_send_proxy failed"]

"""MaiaScheduler, a real vLLM v1 Scheduler driven by hand as EngineCore drives it: every step is
charged to the emulated device with the shape it had when it was scheduled, whatever the clients
do meanwhile (disconnect, finish early, get preempted), and /metrics sees the engine's own KV state."""

import json
import logging
import shutil
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.model_shape import shape_from_config
from maia_serving.serving import stepping
from maia_serving.vllm import stepping as scheduler_module
from maia_serving.vllm.channel import StatsReceiver
from maia_serving.vllm.stepping import MaiaScheduler

PROFILE = "maia100"
BLOCK = 16
EOS = 6
TOKEN = 9  # what the fake model runner samples when not told to stop


@pytest.fixture
def stats_addr(monkeypatch):
    """A private socket folder (mkdtemp is 0700), short enough for an ipc:// path."""
    folder = tempfile.mkdtemp(prefix="maia-sched-")
    addr = f"ipc://{folder}/stats.sock"
    monkeypatch.setenv("MAIA_SERVING_STATS_ADDR", addr)
    yield addr
    shutil.rmtree(folder)


@pytest.fixture
def receiver(stats_addr):
    rx = StatsReceiver(stats_addr, registry=CollectorRegistry())
    yield rx
    rx.close()


@pytest.fixture(scope="module")
def cost(demo_model):
    """A step's emulated seconds, priced by a CostModel built here from the model's config.json."""
    model = CostModel(load_profile(PROFILE), shape_from_config(json.loads((demo_model / "config.json").read_text())))
    return lambda new_tokens, contexts: model.cost_of(new_tokens, contexts).total_s


class Engine:
    """A MaiaScheduler with requests added and model outputs made up by hand, as EngineCore would."""

    def __init__(self, scheduler: MaiaScheduler):
        self.scheduler = scheduler
        self.clock = scheduler.maia.device.clock
        sha256 = get_hash_fn_by_name("sha256")  # prefix-cache hashes, as EngineCore sets them up
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens)
        params.update_from_generation_config({}, eos_token_id=EOS)
        self.scheduler.add_request(Request(request_id, prompt, params, None, block_hasher=self._hasher))

    def run(self, out, eos: tuple[str, ...] = ()) -> ModelRunnerOutput:
        """The model runner's answer: a token for each request whose known tokens are all computed
        (EOS for those in ``eos``), none for a prefill chunk."""
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            request = self.scheduler.requests[rid]
            done = request.num_computed_tokens >= request.num_tokens
            sampled.append([EOS if rid in eos else TOKEN] if done else [])
        return ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)}, sampled_token_ids=sampled
        )

    def step(self, eos: tuple[str, ...] = ()):
        """One engine step; the scheduler's output and the finished requests' finish reasons."""
        out = self.scheduler.schedule()
        outputs = self.scheduler.update_from_output(out, self.run(out, eos))
        return out, finish_reasons(outputs)

    def used_blocks(self) -> int:
        """Blocks requests hold, read off vLLM's block pool (its null block is never free)."""
        pool = self.scheduler.kv_cache_manager.block_pool
        return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()


def finish_reasons(outputs) -> dict[str, FinishReason | None]:
    return {o.request_id: o.finish_reason for eco in outputs.values() for o in eco.outputs}


@pytest.fixture
def engine(demo_model, receiver):
    """Builds an Engine on ``num_blocks`` engine KV blocks (one of them vLLM's null block)."""
    built = []

    def make(num_blocks: int = 16, prefix_caching: bool = False, proxy: str | None = None) -> Engine:
        vllm_config = VllmConfig(
            model_config=ModelConfig(
                model=str(demo_model), dtype="bfloat16", max_model_len=256, skip_tokenizer_init=True
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
            scheduler_config=SchedulerConfig(
                max_num_seqs=8,
                max_num_batched_tokens=256,
                max_model_len=256,
                is_encoder_decoder=False,
                enable_chunked_prefill=True,
                async_scheduling=False,
            ),
            additional_config={"maia_profile": PROFILE, **({"maia_model": proxy} if proxy else {})},
        )
        vllm_config.cache_config.num_gpu_blocks = num_blocks
        kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[
                KVCacheGroupSpec(
                    ["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
                )
            ],
        )
        scheduler = MaiaScheduler(
            vllm_config=vllm_config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config),
            block_size=BLOCK,
        )
        # Every record leaves at once, so each step's figures can be read before the next
        # (the batching is test_channel's business).
        scheduler._publisher.max_delay_s = 0.0
        built.append(scheduler)
        return Engine(scheduler)

    yield make
    for scheduler in built:
        scheduler.shutdown()


def expect(rx: StatsReceiver, name: str, expected: float, **labels) -> None:
    """The metric reads ``expected`` (to float rounding) within 2 s: delivery is asynchronous."""
    deadline = time.monotonic() + 2.0
    while True:
        rx.drain()
        value = rx.metrics.registry.get_sample_value(name, labels or None)
        if value == pytest.approx(expected, rel=1e-12) or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    assert value == pytest.approx(expected, rel=1e-12), (name, labels)


def test_device_facts_reach_metrics_before_any_step(engine, receiver):
    """/metrics says which device is emulated as soon as the engine is up, not at the first request."""
    device = engine(num_blocks=12).scheduler.maia.device
    expect(receiver, "maia:hbm_total_bytes", load_profile(PROFILE).hbm_capacity_bytes)
    labels = {"profile": PROFILE, "model": device.plan.model, "kv_cache_dtype": "auto", "tensor_parallel_size": "1"}
    expect(receiver, "maia:device_info", 1.0, **labels)
    expect(receiver, "maia:kv_cache_blocks", 12.0, holder="engine")
    expect(receiver, "maia:hbm_used_bytes", device.hbm_used_bytes(0))
    assert receiver.metrics.registry.get_sample_value("maia:emulated_step_seconds_count") == 0


def test_a_request_aborted_mid_step_is_charged_in_full_and_leaves_the_clock(engine, receiver, cost):
    """A client that disconnects while the model runs its request: vLLM aborts it between schedule()
    and update_from_output(); the work was done, so the step costs what it was scheduled to."""
    e = engine()
    e.add("a", [1] * 20, max_tokens=8)
    e.add("b", [2] * 12, max_tokens=8)
    e.step()
    out = e.scheduler.schedule()
    ran = e.run(out)
    assert e.scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert finish_reasons(e.scheduler.update_from_output(out, ran)) == {"b": None}

    busy = cost((20, 12), (20, 12)) + cost((1, 1), (21, 13))
    assert e.clock.busy_s == pytest.approx(busy, rel=1e-12)
    assert set(e.clock.requests) == {"b"}
    assert e.scheduler.maia.errors == 0
    expect(receiver, "maia:emulated_busy_seconds_total", busy)
    assert receiver.metrics.registry.get_sample_value("maia:emulated_tokens_total") == 34


def test_requests_finished_early_leave_the_clock_with_their_timings(engine, receiver, cost):
    """EOS and max_tokens end requests mid-batch; their latencies are sums of the steps they lived through."""
    e = engine()
    e.add("a", [1] * 10, max_tokens=3)
    e.add("b", [2] * 6, max_tokens=8)
    c1, c2, c3 = cost((10, 6), (10, 6)), cost((1, 1), (11, 7)), cost((1,), (12,))
    assert e.step()[1] == {"a": None, "b": None}
    assert e.step(eos=("b",))[1] == {"a": None, "b": FinishReason.STOP}
    assert set(e.clock.requests) == {"a"}
    assert e.step()[1] == {"a": FinishReason.LENGTH}
    assert e.clock.requests == {}
    assert e.clock.busy_s == pytest.approx(c1 + c2 + c3, rel=1e-12)
    expect(receiver, "maia:emulated_e2e_request_latency_seconds_count", 2)
    expect(receiver, "maia:emulated_time_to_first_token_seconds_sum", 2 * c1)
    expect(receiver, "maia:emulated_e2e_request_latency_seconds_sum", (c1 + c2) + (c1 + c2 + c3))
    expect(receiver, "maia:emulated_time_per_output_token_seconds_sum", c2 + (c2 + c3) / 2)


def test_preemption_keeps_charging(engine, cost):
    """KV blocks run out: vLLM preempts the newest request and recomputes it later; each step is
    still charged as scheduled, and the preempted request keeps its place on the clock."""
    e = engine(num_blocks=5)  # 4 usable blocks: two 30-token prompts fill them at the third token
    e.add("a", [1] * 30, max_tokens=4)
    e.add("b", [2] * 30, max_tokens=5)
    for _ in range(3):
        e.step()
    first_b = e.clock.requests["b"].first_token_s
    out, done = e.step()
    assert out.preempted_req_ids == {"b"}
    assert done == {"a": FinishReason.LENGTH}
    assert e.clock.requests["b"].first_token_s == first_b
    out, _ = e.step()
    assert out.num_scheduled_tokens == {"b": 33}  # its prompt and three tokens, recomputed
    assert e.step()[1] == {"b": FinishReason.LENGTH}

    busy = (
        cost((30, 30), (30, 30))
        + cost((1, 1), (31, 31))
        + cost((1, 1), (32, 32))
        + cost((1,), (33,))
        + cost((33,), (33,))
        + cost((1,), (34,))
    )
    assert e.clock.busy_s == pytest.approx(busy, rel=1e-12)
    assert e.clock.requests == {}
    assert e.scheduler.maia.errors == 0


def test_prefix_cache_hits_charge_only_the_new_tokens(engine, receiver, cost):
    """A request that finds 48 of its 53 tokens cached computes 5, attending to all 53; blocks only
    the prefix cache holds are cached, not used, and cached blocks a request holds are used."""
    e = engine(prefix_caching=True)
    shared = [5] * 48
    e.add("a", shared + [7] * 4, max_tokens=1)
    e.step()
    expect(receiver, "maia:kv_cache_blocks_cached", 3)
    assert receiver.metrics.registry.get_sample_value("maia:kv_cache_blocks_used") == 0
    e.add("b", shared + [8] * 5, max_tokens=2)
    out, _ = e.step()
    assert out.num_scheduled_tokens == {"b": 5}
    expect(receiver, "maia:kv_cache_blocks_used", 4)
    assert receiver.metrics.registry.get_sample_value("maia:kv_cache_blocks_cached") == 0
    e.step()
    expect(receiver, "maia:kv_cache_blocks_used", 0)
    assert receiver.metrics.registry.get_sample_value("maia:kv_cache_blocks_cached") == 3

    busy = cost((52,), (52,)) + cost((5,), (53,)) + cost((1,), (54,))
    assert e.clock.busy_s == pytest.approx(busy, rel=1e-12)
    expect(receiver, "maia:emulated_tokens_total", 58)


@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
def test_used_blocks_follow_the_block_pool_and_return_to_zero(engine, receiver, mid_step):
    """The used KV blocks on /metrics are vLLM's own after every step, and drop to 0 when the last
    request is aborted, even with no step after the abort to report it."""
    e = engine()
    e.add("a", [1] * 20, max_tokens=2)
    e.add("b", [2] * 40, max_tokens=8)
    for expected in (2 + 3, 3):  # a's two blocks and b's three, then a finishes
        e.step()
        assert e.used_blocks() == expected
        expect(receiver, "maia:kv_cache_blocks_used", expected)
    if mid_step:
        out = e.scheduler.schedule()
        ran = e.run(out)
        e.scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
        e.scheduler.update_from_output(out, ran)
    else:
        e.scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert e.used_blocks() == 0
    expect(receiver, "maia:kv_cache_blocks_used", 0)
    static = e.scheduler.maia.device.hbm_used_bytes(0)
    expect(receiver, "maia:hbm_used_bytes", static)
    assert e.clock.requests == {}


def test_an_emulation_error_is_logged_once_counted_and_the_engine_serves_on(engine, receiver, monkeypatch, caplog):
    """A bug in the emulator must cost a figure, not a server: vLLM still gets the step's outputs."""
    e = engine()
    monkeypatch.setattr(e.scheduler.maia.device, "charge", _raise)
    e.add("a", [1] * 10, max_tokens=2)
    assert e.step()[1] == {"a": None}
    assert e.step()[1] == {"a": FinishReason.LENGTH}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "charging a step failed" in errors[0].getMessage()
    expect(receiver, "maia:emulation_errors_total", 2, stage="charge")
    assert e.clock.busy_s == 0.0


def _raise(*args, **kwargs):
    raise RuntimeError("planted emulator bug")


def _first_error(caplog) -> str:
    return next(r for r in caplog.records if r.levelno >= logging.ERROR).getMessage()


@pytest.mark.parametrize("broken,what", [("_read_shape", "reading a step's shape"), ("_kv_blocks", "charging a step")])
def test_a_failing_stage_names_itself_and_the_engine_serves_on(engine, monkeypatch, caplog, broken, what):
    e = engine()
    monkeypatch.setattr(e.scheduler, broken, _raise)
    e.add("a", [1] * 10, max_tokens=2)
    assert e.step()[1] == {"a": None}
    assert _first_error(caplog).startswith(f"maia-serving: {what} failed; ")


def test_an_abort_that_cannot_report_the_kv_cache_says_so(engine, monkeypatch, caplog):
    e = engine()
    e.add("a", [1] * 10, max_tokens=2)
    monkeypatch.setattr(e.scheduler, "_kv_blocks", _raise)
    assert e.scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert _first_error(caplog).startswith("maia-serving: reporting the KV cache failed; ")


def test_schedule_hands_its_arguments_to_vllm(engine, monkeypatch):
    """EngineCore may pass throttle_prefills; the override must not drop it."""
    seen = []
    original = Scheduler.schedule

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "schedule", spy)
    e = engine()
    e.scheduler.schedule(True)
    e.scheduler.schedule(throttle_prefills=True)
    assert seen == [((True,), {}), ((), {"throttle_prefills": True})]


def test_a_step_with_nothing_scheduled_charges_nothing(engine):
    e = engine()
    out = e.scheduler.schedule()
    e.scheduler.update_from_output(out, e.run(out))
    assert e.clock.num_steps == 0 and e.scheduler.maia.errors == 0


def test_host_time_is_the_wall_time_from_schedule_to_result_and_overhead_the_cpu_time(engine, receiver, monkeypatch):
    """Both read off fake clocks: 0.5 s between schedule() and the result, no CPU time spent."""
    e = engine()
    wall = iter([100.0, 100.5])
    fake = SimpleNamespace(
        perf_counter=lambda: next(wall), thread_time=lambda: 1000.0, monotonic=time.monotonic, time=time.time
    )
    monkeypatch.setattr(scheduler_module, "time", fake)
    monkeypatch.setattr(stepping, "time", fake)
    e.add("a", [1] * 10, max_tokens=2)
    e.step()
    expect(receiver, "maia:host_step_seconds_total", 0.5)
    assert receiver.metrics.registry.get_sample_value("maia:emulator_overhead_seconds_total") == 0.0


def test_constructor_arguments_reach_vllm_positional_or_by_name(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(Scheduler, "__init__", spy)
    with pytest.raises(Stop):
        MaiaScheduler("vllm_config", "kv_cache_config", block_size=BLOCK)
    assert seen == [(("vllm_config", "kv_cache_config"), {"block_size": BLOCK})]


def test_an_engine_pool_not_sized_yet_is_announced_as_zero_blocks(engine, receiver, monkeypatch):
    original = Scheduler.__init__

    def unsized(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.cache_config.num_gpu_blocks = None

    monkeypatch.setattr(Scheduler, "__init__", unsized)
    engine()
    expect(receiver, "maia:kv_cache_blocks", 0.0, holder="engine")


@pytest.mark.parametrize("proxy", [None, "llama-3-8b"], ids=["served-model", "proxy-shape"])
def test_the_collectives_a_step_shipped_are_what_it_is_charged(engine, receiver, proxy):
    """The worker hands each step's collectives over on its ModelRunnerOutput (maia_collectives): they
    are the step's communication, counted on /metrics. A proxy shape's steps move other tensors than
    the host's, so there the cost model's count stands."""
    e = engine(proxy=proxy)
    device = e.scheduler.maia.device
    rows = [(0, 2, 20 * 128 * 2, 5, 0), (1, 2, 2048 * 2, 1, 0)]
    e.add("a", [1] * 20, max_tokens=1)
    out = e.scheduler.schedule()
    ran = e.run(out)
    ran.maia_collectives = rows
    e.scheduler.update_from_output(out, ran)
    formula = device.cost_model.cost_of((20,), (20,))
    charged = device.cost_model.collectives_s(rows) if proxy is None else formula.comm_s
    assert e.clock.busy_s == pytest.approx(formula.total_s - formula.comm_s + charged, rel=1e-12)
    expect(receiver, "maia:emulated_time_by_part_seconds_total", charged, part="communication")
    expect(receiver, "maia:emulated_collectives_total", 6 if proxy is None else 0)
    expect(receiver, "maia:emulated_collective_bytes_total", 5 * 5120 + 4096 if proxy is None else 0)

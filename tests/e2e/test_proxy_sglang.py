"""Proxy shapes on SGLang: the demo model priced as Llama-3-8B on a Maia 200 through MAIA_SERVING_MODEL
says so in its log and /metrics, and a static batch that fits one step's budget gives the emulated
figures `simulate` gives (SGLang prefills it in one step, as vLLM's policy does)."""

import pytest

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.hardware import NO_FRONT_END
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic
from tests.utils.launch import metric
from tests.utils.replay import replay_at_once, simulated_figures

NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 8, 128, 64
PRICED = 'maia:device_info{kv_cache_dtype="auto",model="llama-3-8b",profile="maia200",tensor_parallel_size="1"}'


def test_the_priced_shape_is_named(sglang_proxy_server):
    first = sglang_proxy_server.metrics_at_start
    assert first[PRICED] == 1
    assert (
        0
        < metric(first, "maia:kv_cache_tokens", holder="engine")
        <= metric(first, "maia:kv_cache_tokens", holder="emulated")
    )
    log = sglang_proxy_server.log_text()
    assert (
        "Maia proxy shape: every step is priced, and the emulated KV cache sized, as llama-3-8b on maia200; "
        "the host runs demo." in log
    )
    assert "tokens of llama-3-8b" in log


def test_a_static_batch_matches_simulate(sglang_proxy_server):
    live = replay_at_once(sglang_proxy_server.url, "demo", NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN, pause=False)
    config = ServingConfig(
        max_model_len=512, max_num_batched_tokens=2048, max_num_seqs=64, gpu_memory_utilization=0.92
    )  # conftest.SGLANG_LIMITS; the emulated blocks of 16
    sim = simulated_figures(
        simulate_device(
            load_profile("maia200"),
            load_model_shape("llama-3-8b"),
            config,
            synthetic(NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN),
            front_end=NO_FRONT_END,  # the batch reaches the scheduler in one message, past the front end
        )
    )
    assert (live.num_requests, live.num_steps) == (NUM_REQUESTS, sim.num_steps), "not the simulator's steps"
    for name, ratio in live.ratio_to(sim).items():
        assert ratio == pytest.approx(1.0, abs=0.05), f"{name}: live {getattr(live, name)} vs {getattr(sim, name)}"

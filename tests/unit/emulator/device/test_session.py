"""EmulatedDevice, as the engine adapters drive it: steps priced by hand (the golden steps of conftest.py),
requests timed from those prices, and HBM from the memory plan worked out in test_memory.py."""

import pytest

from maia_serving.emulator import NotEnoughMemory, ServingConfig, load_model_shape
from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.memory import SGLANG_FLAGS

BLOCK_BYTES = 16 * 2 * 32 * 8 * 128 * 2  # 16 tokens x K and V x 32 layers x 8 KV heads x 128 x bf16: 2 MiB


@pytest.fixture
def device(llama8b, maia100) -> EmulatedDevice:
    return EmulatedDevice.fit(maia100, llama8b, ServingConfig())


def test_two_requests_are_timed_by_the_golden_steps(device, golden):
    """a's 2048-token prompt; then b, a 512-token chunk after a prefix-cache hit; then both decode once."""
    prefill, chunk, decode = golden["prefill"], golden["chunk"], golden["decode"]
    device.arrive("a")
    first = device.charge(prefill.new_tokens, prefill.context_lens, {"a": 1}, [], kv_blocks_used=128, wall_s=0.25)
    device.arrive("b")
    second = device.charge(chunk.new_tokens, chunk.context_lens, {"b": 1}, [], kv_blocks_used=128 + 256)
    third = device.charge(
        decode.new_tokens, decode.context_lens, {"a": 1, "b": 1}, ["a", "b"], kv_blocks_used=129 + 257
    )

    assert (first.num_tokens, first.num_seqs, first.kv_blocks_used, first.wall_s) == (2048, 1, 128, 0.25)
    assert (third.num_tokens, third.num_seqs, third.kv_blocks_used, third.wall_s) == (2, 2, 386, 0.0)
    assert first.step_s == pytest.approx(prefill.total_s, rel=1e-12)
    assert first.first_token_ttfts_s == [pytest.approx(prefill.total_s, rel=1e-12)]
    assert second.first_token_ttfts_s == [pytest.approx(chunk.total_s, rel=1e-12)]  # b arrived after a's prefill
    assert third.first_token_ttfts_s == []
    assert device.clock.busy_s == pytest.approx(prefill.total_s + chunk.total_s + decode.total_s, rel=1e-12)

    a, b = third.finished
    assert a.ttft_s == pytest.approx(prefill.total_s, rel=1e-12)
    assert a.tpot_s == pytest.approx(chunk.total_s + decode.total_s, rel=1e-12)  # a waited out b's chunk
    assert a.e2e_s == pytest.approx(prefill.total_s + chunk.total_s + decode.total_s, rel=1e-12)
    assert b.ttft_s == pytest.approx(chunk.total_s, rel=1e-12)
    assert b.tpot_s == pytest.approx(decode.total_s, rel=1e-12)
    assert b.e2e_s == pytest.approx(chunk.total_s + decode.total_s, rel=1e-12)
    assert device.clock.requests == {}


def test_an_aborted_request_leaves_the_clock(device, golden):
    prefill, chunk = golden["prefill"], golden["chunk"]
    device.arrive("a")
    device.arrive("b")
    device.charge(prefill.new_tokens, prefill.context_lens, {"a": 1}, [], kv_blocks_used=128)
    device.abort("a")
    device.abort("never seen")
    assert list(device.clock.requests) == ["b"]
    record = device.charge(chunk.new_tokens, chunk.context_lens, {"b": 1}, ["a", "b"], kv_blocks_used=256)
    (b,) = record.finished
    assert b.ttft_s == pytest.approx(prefill.total_s + chunk.total_s, rel=1e-12)  # b queued behind a's prefill
    assert device.clock.requests == {}


def test_an_idle_step_costs_nothing(device):
    record = device.charge((), (), {}, [], kv_blocks_used=3)
    assert (record.step_s, record.now_s, record.num_tokens, record.kv_blocks_used) == (0.0, 0.0, 0, 3)
    assert device.clock.num_steps == 1


def test_hbm_used_is_the_plan_plus_the_live_kv_blocks(device):
    """Runtime reserve, weights and workspace of Llama-3-8B on a Maia 100 (test_memory.py), then 2 MiB a block."""
    assert device.kv_block_bytes == BLOCK_BYTES == 2**21
    assert device.hbm_used_bytes(0) == 2**30 + 16_060_522_496 + 903_086_080 == 18_037_350_400
    for blocks in (1, 7, 20_890):
        assert device.hbm_used_bytes(blocks) - device.hbm_used_bytes(0) == blocks * BLOCK_BYTES
    # With every block of the plan in use, less than one block of the 0.9 x 64 GB share is left.
    assert 0 <= 64 * 2**30 * 0.9 - device.hbm_used_bytes(20_890) < BLOCK_BYTES


@pytest.mark.parametrize(
    "config",
    [
        ServingConfig(kv_cache_dtype="fp8"),
        ServingConfig(tensor_parallel_size=2),
        ServingConfig(tensor_parallel_size=2, pipeline_parallel_size=2),
    ],
    ids=["fp8", "tp2", "tp2-pp2"],
)
def test_steps_are_priced_with_the_configured_kv_dtype_and_parallelism(llama8b, maia100, config):
    device = EmulatedDevice.fit(maia100, llama8b, config)
    parallel = Parallel(tp=config.tensor_parallel_size, pp=config.pipeline_parallel_size)
    priced = CostModel(maia100, llama8b, parallel, config.kv_cache_dtype).cost_of((1, 1), (2049, 4097)).total_s
    assert device.charge((1, 1), (2049, 4097), {}, [], kv_blocks_used=0).step_s == priced
    assert priced != CostModel(maia100, llama8b).cost_of((1, 1), (2049, 4097)).total_s
    assert device.profile is maia100


def test_a_device_that_does_not_fit_suggests_in_the_engines_spelling(llama8b, maia100):
    llama70b = load_model_shape("llama-3-70b")
    with pytest.raises(NotEnoughMemory, match="Try: --tp-size 4 "):
        EmulatedDevice.fit(maia100, llama70b, ServingConfig(), SGLANG_FLAGS)


def test_the_engines_collectives_replace_the_formulas_count(llama8b, maia100):
    """A step charged with the calls the engine made: its communication is theirs, priced call by call, and
    the rest of the step is the cost model's; the record counts the calls and their bytes."""
    device = EmulatedDevice.fit(maia100, llama8b, ServingConfig(tensor_parallel_size=2))
    model = device.cost_model
    formula = model.cost_of((100,), (100,))
    rows = [(0, 2, 100 * 4096 * 2, 3, 0), (1, 2, 128_256 * 2, 1, 0)]  # 3 all-reduces, the logits' all-gather
    record = device.charge((100,), (100,), {}, [], kv_blocks_used=0, collectives=rows)
    assert record.comm_s == pytest.approx(model.collectives_s(rows), rel=1e-12)
    assert record.comm_s < formula.comm_s  # 3 all-reduces, not 65
    assert record.step_s == pytest.approx(formula.total_s - formula.comm_s + record.comm_s, rel=1e-12)
    assert (record.compute_s, record.memory_s, record.launch_s) == (
        formula.compute_s,
        formula.memory_s,
        formula.launch_s,
    )
    assert (record.num_collectives, record.comm_bytes) == (4, 3 * 819_200 + 256_512)
    assert device.clock.busy_s == record.step_s
    plain = device.charge((100,), (100,), {}, [], kv_blocks_used=0)
    assert (plain.comm_s, plain.num_collectives, plain.comm_bytes) == (formula.comm_s, 0, 0)

"""Capacity model: golden values worked out by hand, and the not-fit message."""

import dataclasses

import pytest

from maia_serving.emulator import (
    NotEnoughMemory,
    ServingConfig,
    load_model_shape,
    plan_memory,
    require_fit,
)
from maia_serving.emulator.memory import (
    SGLANG_FLAGS,
    kv_bits_per_value,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    suggest,
    weight_bytes_per_chip,
    workspace_bytes_per_chip,
)
from maia_serving.formats.units import format_bytes

MAIA100_HBM = 64 * 2**30  # "64 GB" of HBM2E: binary gigabytes


@pytest.fixture(scope="module")
def llama70b():
    return load_model_shape("llama-3-70b")


def test_llama3_70b_parameter_count_by_hand(llama70b):
    h, inter, layers, vocab = 8192, 28672, 80, 128256
    q, kv = 64 * 128, 8 * 128
    layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    assert layer == 855_654_400
    assert llama70b.num_params() == layers * layer + 2 * vocab * h + h == 70_553_706_496


def test_llama3_70b_tp4_on_maia100_by_hand(llama70b, maia100):
    plan = require_fit(llama70b, maia100, ServingConfig(tensor_parallel_size=4))
    usable = MAIA100_HBM * 0.9 - 2**30
    weights = 70_553_706_496 / 4 * 2
    # 8192 tokens x (residual + normed input + q,k,v,o shards + gate/up shards) in bf16,
    # plus fp32 logits for 256 sequences over a quarter of the vocabulary.
    workspace = 8192 * (2 * 8192 + (2 * 8192 + 2 * 1024) / 4 + 2 * 28672 / 4) * 2 + 256 * 128256 / 4 * 4
    per_token = 2 * 80 * (8 // 4) * 128 * 2
    assert plan.usable_bytes == pytest.approx(usable)
    assert plan.weight_bytes == pytest.approx(weights)
    assert plan.workspace_bytes == pytest.approx(workspace)
    assert plan.kv_bytes_per_token == per_token == 81_920
    assert plan.kv_budget_bytes == pytest.approx(usable - weights - workspace)
    blocks = int((usable - weights - workspace) // (per_token * 16))
    # (56.6 GiB - 35,276,853,248 - 611,647,488) // 1,310,720 = 24,885,286,502.4 // 1,310,720
    assert plan.num_blocks == blocks == 18_985
    assert plan.kv_tokens == 16 * blocks
    assert plan.max_concurrent_seqs == blocks // (8192 // 16) == 37
    assert plan.fits and plan.shortfall_bytes == 0


def test_llama3_8b_on_one_maia100_by_hand(llama8b, maia100):
    """The plan the device and cost tests run on, exact: every figure but the usable share an integer number
    of bytes, and that one a multiple of 0.1 GiB."""
    plan = require_fit(llama8b, maia100, ServingConfig())
    # 64 GiB x 0.9 - 1 GiB runtime reserve = 56.6 GiB.
    assert plan.usable_bytes == MAIA100_HBM * 0.9 - 2**30 == 60_773_787_238.4
    # 32 layers x 218_112_000 + 2 x 128256 x 4096 (untied embedding and LM head) + 4096 = 8_030_261_248 params.
    assert plan.weight_bytes == 8_030_261_248 * 2 == 16_060_522_496
    # 8192 tokens x (residual + normed input 2 x 4096, q and o 2 x 4096, k and v 2 x 1024, gate and up
    # 2 x 14336) in bf16, and fp32 logits of 256 sequences over 128256 tokens.
    assert plan.workspace_bytes == 8192 * (4 * 4096 + 2 * 1024 + 2 * 14336) * 2 + 256 * 128256 * 4 == 903_086_080
    # K and V x 32 layers x 8 heads x 128 x 2 bytes; a block of 16 tokens is 2 MiB.
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert plan.kv_budget_bytes == 60_773_787_238.4 - 16_060_522_496 - 903_086_080 == 43_810_178_662.4
    assert plan.num_blocks == 43_810_178_662.4 // 2**21 == 20_890
    assert plan.kv_tokens == 20_890 * 16 == 334_240
    assert plan.max_concurrent_seqs == 20_890 // (8192 // 16) == 40


def test_llama3_70b_does_not_fit_one_maia100_and_says_by_how_much(llama70b, maia100):
    with pytest.raises(NotEnoughMemory) as err:
        require_fit(llama70b, maia100, ServingConfig())
    plan = err.value.plan
    one_seq = 8192 * 2 * 80 * 8 * 128 * 2
    expected_short = 70_553_706_496 * 2 + plan.workspace_bytes + one_seq - (MAIA100_HBM * 0.9 - 2**30)
    assert plan.shortfall_bytes == pytest.approx(expected_short)
    msg = str(err.value)
    assert "does not fit on maia100" in msg
    assert f"short by {expected_short / 2**30:.2f} GiB" in msg
    assert "--tensor-parallel-size 4" in msg


def test_fp8_kv_halves_bytes_and_doubles_tokens(llama70b, maia100):
    bf16 = plan_memory(llama70b, maia100, ServingConfig(tensor_parallel_size=4))
    fp8 = plan_memory(llama70b, maia100, ServingConfig(tensor_parallel_size=4, kv_cache_dtype="fp8"))
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    assert fp8.kv_tokens >= 2 * bf16.kv_tokens - 16


def test_more_tp_than_kv_heads_replicates_heads(llama70b):
    assert kv_bytes_per_token(llama70b, ServingConfig(tensor_parallel_size=16)) == 2 * 80 * 1 * 128 * 2


def test_shorter_max_len_is_suggested_when_only_length_is_the_problem(maia100):
    model = load_model_shape("llama-3-8b")
    config = ServingConfig(max_model_len=10_000_000, gpu_memory_utilization=0.3)
    with pytest.raises(NotEnoughMemory, match="--max-model-len"):
        require_fit(model, maia100, config)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServingConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization must be in \(0, 1\], got 0$"):
        ServingConfig(gpu_memory_utilization=0)
    assert ServingConfig(gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0
    for sizes, got in (
        ({"tensor_parallel_size": 0}, "tp=0, pp=1, dp=1"),
        ({"pipeline_parallel_size": 0}, "pp=0"),
        ({"data_parallel_size": 0}, "dp=0"),
    ):
        with pytest.raises(ValueError, match=f"^parallel sizes must be at least 1, got .*{got}"):
            ServingConfig(**sizes)
    with pytest.raises(ValueError, match="unknown all2all backend 'pplx'; the cost model prices: allgather_"):
        ServingConfig(all2all_backend="pplx")
    with pytest.raises(ValueError, match="kv cache dtype"):
        kv_bytes_per_token(load_model_shape("llama-3-8b"), ServingConfig(kv_cache_dtype="int3"))


def test_the_not_fit_message_in_full(llama70b, maia100):
    with pytest.raises(NotEnoughMemory) as err:
        require_fit(llama70b, maia100, ServingConfig())
    plan = err.value.plan
    assert err.value.suggestions == ["--tensor-parallel-size 4 (up to 4 chips per node)"]
    assert str(err.value) == (
        "llama-3-70b does not fit on maia100 (tp=1, pp=1, kv_cache_dtype=auto, max_model_len=8192): per chip it "
        f"needs {format_bytes(70_553_706_496 * 2)} weights + {format_bytes(plan.workspace_bytes)} workspace "
        f"+ {format_bytes(8192 * 2 * 80 * 8 * 128 * 2)} KV for one sequence, but only "
        f"{format_bytes(MAIA100_HBM * 0.9 - 2**30)} of 64.00 GiB HBM is usable; short by "
        f"{format_bytes(plan.shortfall_bytes)}. Try: --tensor-parallel-size 4 (up to 4 chips per node)."
    )
    assert plan.to_dict()["shortfall_bytes"] == plan.shortfall_bytes > 0 and plan.to_dict()["fits"] is False


def test_every_way_to_fit_is_suggested_cheapest_first_in_the_engines_spelling(llama8b, maia100):
    """300k tokens at 60% of HBM: a second chip, an FP8 cache or a shorter context each fit."""
    config = ServingConfig(max_model_len=300_000, gpu_memory_utilization=0.6)
    room = int(MAIA100_HBM * 0.6 - 2**30 - 16_060_522_496 - 903_086_080) // 131_072 // 16 * 16
    assert room == 176_944
    assert suggest(llama8b, maia100, config) == [
        "--tensor-parallel-size 2 (up to 4 chips per node)",
        "--kv-cache-dtype fp8 (half the KV bytes per token)",
        "--max-model-len 176944 (the longest sequence the KV budget holds)",
    ]
    with pytest.raises(NotEnoughMemory) as err:
        require_fit(llama8b, maia100, config, SGLANG_FLAGS)
    assert str(err.value).endswith(
        " Try: --tp-size 2 (up to 4 chips per node); --kv-cache-dtype fp8_e4m3 (half "
        "the KV bytes per token); --context-length 176944 (the longest sequence the KV "
        "budget holds)."
    )


def test_without_room_for_a_token_only_a_bigger_device_is_suggested(llama70b, maia100):
    config = ServingConfig(tensor_parallel_size=4, gpu_memory_utilization=0.3)
    assert plan_memory(llama70b, maia100, config).kv_budget_bytes == 0
    assert suggest(llama70b, maia100, config) == ["a profile with more HBM (see `maia-serving profiles`)"]


def test_a_budget_of_a_single_token_is_still_suggested_as_a_length(llama8b, maia100):
    """With 1-token blocks, room for one and a half tokens (131_072 bytes each) makes max_model_len 1."""
    utilization = (16_060_522_496 + 903_086_080 + 2**30 + 1.5 * 131_072) / MAIA100_HBM
    config = ServingConfig(block_size=1, gpu_memory_utilization=utilization)
    assert "--max-model-len 1 (the longest sequence the KV budget holds)" in suggest(llama8b, maia100, config)


def test_pipeline_stages_split_the_layers_weights_and_kv(llama8b):
    """Two stages: 16 of the 32 layers per chip, and the embedding, LM head and final norm on each."""
    config = ServingConfig(pipeline_parallel_size=2)
    assert kv_bytes_per_token(llama8b, config) == 2 * 16 * 8 * 128 * 2
    assert weight_bytes_per_chip(llama8b, config) == (16 * 218_112_000 + 2 * 128256 * 4096 + 4096) * 2


def test_the_router_is_whole_on_every_tensor_parallel_rank():
    """Mixtral's router (4096 x 8 per layer, bf16) is not sharded: two ranks hold it twice."""
    mixtral = load_model_shape("mixtral-8x7b")
    one, two = (weight_bytes_per_chip(mixtral, ServingConfig(tensor_parallel_size=tp)) for tp in (1, 2))
    assert 2 * two - one == 32 * 4096 * 8 * 2


def test_with_one_token_blocks_a_sliding_layer_holds_exactly_its_window():
    """Mistral-7B: 32 sliding layers of 4096 tokens, 8 KV heads of 128 in bf16."""
    mistral = load_model_shape("mistral-7b")
    assert kv_bytes_per_sequence(mistral, ServingConfig(block_size=1), 10_000) == 32 * 4096 * 2 * 8 * 128 * 2


def test_an_moe_model_without_dense_layers_never_holds_a_dense_mlp():
    mixtral = load_model_shape("mixtral-8x7b")
    wide = dataclasses.replace(mixtral, intermediate_size=10 * mixtral.intermediate_size)
    assert workspace_bytes_per_chip(wide, ServingConfig()) == workspace_bytes_per_chip(mixtral, ServingConfig())


@pytest.mark.parametrize(
    ("kv", "row", "per_token", "blocks"),
    [
        ("auto", 128 * 2, 131_072, 20_890),
        ("fp8", 128, 65_536, 41_780),
        ("mxfp8", 4 * (32 + 1), 67_584, 40_514),  # 4 blocks of 32 one-byte elements, each with its E8M0 scale
        ("mxfp6", 4 * (24 + 1), 51_200, 53_479),  # 32 six-bit elements are 24 bytes
        ("mxfp6_e2m3", 4 * (24 + 1), 51_200, 53_479),
        ("mxfp4", 4 * (16 + 1), 34_816, 78_645),  # 4.25 bits an element
        ("nvfp4", 8 * (8 + 1), 36_864, 74_276),  # 8 blocks of 16 with an E4M3 scale: 4.5 bits
    ],
)
def test_llama3_8b_kv_bytes_and_capacity_in_each_kv_format_by_hand(llama8b, maia100, kv, row, per_token, blocks):
    """K and V x 32 layers x 8 heads x one 128-wide head row at the format's stored size, in the KV budget of
    test_llama3_8b_on_one_maia100_by_hand (43_810_178_662.4 bytes, which the KV format leaves as it is)."""
    plan = require_fit(llama8b, maia100, ServingConfig(kv_cache_dtype=kv))
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * row == per_token
    assert plan.kv_budget_bytes == 43_810_178_662.4
    assert plan.num_blocks == 43_810_178_662.4 // (per_token * 16) == blocks
    assert plan.kv_tokens == 16 * blocks


def test_mxfp4_holds_3_76x_the_tokens_of_bf16(llama8b, maia100):
    """256 bytes a BF16 head row against 68 in MXFP4: 3.76x, to the whole block; NVFP4's 72: 3.56x."""
    tokens = {
        kv: plan_memory(llama8b, maia100, ServingConfig(kv_cache_dtype=kv)).kv_tokens
        for kv in ("bf16", "mxfp4", "nvfp4")
    }
    assert tokens == {"bf16": 334_240, "mxfp4": 1_258_320, "nvfp4": 1_188_416}
    assert tokens["mxfp4"] / tokens["bf16"] == pytest.approx(256 / 68, abs=1e-4)
    assert round(tokens["mxfp4"] / tokens["bf16"], 2) == 3.76
    assert tokens["nvfp4"] / tokens["bf16"] == pytest.approx(256 / 72, abs=1e-4)


def test_a_head_dim_off_the_block_stores_its_last_block_padded(llama8b):
    """head_dim 80 is 2.5 MXFP4 blocks: 3 stored, 3 x 17 = 51 bytes a row, not 80 x 4.25 / 8 = 42.5."""
    narrow = dataclasses.replace(llama8b, head_dim=80)
    assert kv_bytes_per_token(narrow, ServingConfig(kv_cache_dtype="mxfp4")) == 2 * 32 * 8 * 51 == 26_112
    assert kv_bytes_per_token(narrow, ServingConfig(kv_cache_dtype="nvfp4")) == 2 * 32 * 8 * 5 * 9  # 5 whole blocks


def test_mla_stores_its_latent_in_whole_blocks():
    """DeepSeek-V2-Lite: one 512 + 64 = 576-wide latent per layer, 18 MXFP4 blocks of 17 bytes, 27 layers."""
    model = load_model_shape("deepseek-v2-lite")
    assert kv_bytes_per_token(model, ServingConfig(kv_cache_dtype="mxfp4")) == 27 * 18 * 17 == 8_262


def test_fp8_is_suggested_only_where_it_is_smaller_and_says_by_how_much(llama8b, maia100):
    """At 60% of HBM the KV budget is 23_194_335_641.6 bytes: 343_193 MXFP8 tokens, 353_918 FP8 ones."""
    config = ServingConfig(max_model_len=350_000, gpu_memory_utilization=0.6, kv_cache_dtype="mxfp8")
    assert "--kv-cache-dtype fp8 (0.97x the KV bytes per token)" in suggest(llama8b, maia100, config)
    for kv in ("mxfp4", "fp8"):  # never up from a smaller format, nor to itself
        tips = suggest(llama8b, maia100, dataclasses.replace(config, kv_cache_dtype=kv, max_model_len=2_000_000))
        assert not any("--kv-cache-dtype" in tip for tip in tips)


@pytest.mark.parametrize(
    "kv_cache_dtype,bits",
    [
        ("auto", 16),  # the model's BF16
        ("fp8", 8),
        # OCP MX v1.0: one 8-bit E8M0 scale per 32 values
        ("mxfp8", 8 + 8 / 32),
        ("mxfp6", 6 + 8 / 32),
        ("mxfp4", 4 + 8 / 32),
        ("nvfp4", 4 + 8 / 16),  # NVIDIA's NVFP4: an FP8 E4M3 scale per 16 values
    ],
)
def test_bits_a_stored_kv_value_costs_scales_included(llama70b, kv_cache_dtype, bits):
    """At head_dim 128 the blocks divide the row: no padding."""
    assert kv_bits_per_value(llama70b, ServingConfig(kv_cache_dtype=kv_cache_dtype)) == bits


def test_a_row_that_blocks_do_not_divide_pays_its_padding(llama70b):
    """A head of 80 values holds three MXFP4 blocks (96 values' worth of codes) and three scales."""
    model = dataclasses.replace(llama70b, head_dim=80)
    assert kv_bits_per_value(model, ServingConfig(kv_cache_dtype="mxfp4")) == (96 * 4 + 3 * 8) / 80


def test_mla_stores_its_latent_row():
    """An MLA row is the latent and the rope key, not a head: a 456 + 64 = 520-value row holds 17 MXFP4 blocks
    (544 values' codes, 17 scales), where a head of DeepSeek-V2-Lite's would divide evenly."""
    model = load_model_shape("deepseek-v2-lite")
    model = dataclasses.replace(model, mla=dataclasses.replace(model.mla, kv_lora_rank=456))
    assert model.head_dim % 32 == 0
    assert kv_bits_per_value(model, ServingConfig(kv_cache_dtype="mxfp4")) == (544 * 4 + 17 * 8) / 520

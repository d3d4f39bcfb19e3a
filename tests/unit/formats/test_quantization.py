"""Precision as data: a checkpoint's quantization_config (or --weight-dtype) decides what each weight costs in
HBM and in bytes read, and which peak each GEMM runs at. Figures worked by hand from Llama-3-8B's shape."""

import pytest

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile, plan_memory
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.model_shape import shape_from_config
from maia_serving.formats import precision
from maia_serving.formats.quantization import weight_quant

# Llama-3-8B: the decoder's linear weights, its norms, and the untied embedding + LM head + final norm.
LINEAR = 32 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
NORMS = 32 * 2 * 4096
EMBEDDINGS = 2 * 128256 * 4096 + 4096
assert LINEAR + NORMS + EMBEDDINGS == 8_030_261_248

# llm-compressor's schemes as they appear in config.json (compressed-tensors).
FP8_DYNAMIC = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
}
W8A8_INT8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
        }
    },
}
W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
        }
    },
}
NVFP4 = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
            "input_activations": {"num_bits": 4, "type": "float", "group_size": 16},
        }
    },
}


def _weights(**args) -> dict:
    """A compressed-tensors weight-only scheme with these weight arguments."""
    return {**W4A16, "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}}


# vLLM's Fp8Config with DeepSeek-V3's 128 x 128 blocks (one FP32 scale each).
FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _llama8b(quantization_config: dict | None = None):
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192,
    }
    if quantization_config:
        config["quantization_config"] = quantization_config
    return shape_from_config(config, "llama-3-8b")


@pytest.mark.parametrize(
    ("quant", "weight", "activation", "weight_bits"),
    [
        (FP8_DYNAMIC, "fp8_e4m3", "fp8_e4m3", 8),
        (W8A8_INT8, "int8", "int8", 8),
        (W4A16, "int4", None, 4 + 16 / 128),
        (_weights(num_bits=4, type="int", strategy="group", group_size=32), "int4", None, 4 + 16 / 32),
        (_weights(num_bits=4, type="int", strategy="channel"), "int4", None, 4),  # per-channel scales: not counted
        (NVFP4, "nvfp4", "nvfp4", 4 + 8 / 16),
        (_weights(num_bits=4, type="float", strategy="group", group_size=32), "mxfp4", None, 4 + 8 / 32),
        (FP8_BLOCK, "fp8_e4m3", "fp8_e4m3", 8 + 32 / (128 * 128)),
        (
            _weights(num_bits=8, type="float", strategy="block", block_structure=[128, 128]),
            "fp8_e4m3",
            None,
            8 + 32 / (128 * 128),
        ),
    ],
)
def test_checkpoint_schemes_are_read_and_weights_counted_at_their_stored_size(quant, weight, activation, weight_bits):
    model = _llama8b(quant)
    q = model.quantization
    assert (q.weight.name, q.activation.name if q.activation else None) == (weight, activation)
    assert q.weight.bits_per_element == weight_bits
    # The linear layers at their stored size, scales included; norms, embeddings and LM head in BF16.
    assert model.weight_bytes() == pytest.approx(LINEAR * weight_bits / 8 + (NORMS + EMBEDDINGS) * 2, rel=1e-15)
    assert model.num_params() == 8_030_261_248


def test_a_kv_cache_only_scheme_leaves_the_weights_alone():
    """What calibrate-kv writes: compressed-tensors with a kv_cache_scheme and no config_groups."""
    model = _llama8b(
        {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "config_groups": {},
            "ignore": [],
            "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        }
    )
    assert model.quantization is None and model.weight_bytes() == 8_030_261_248 * 2


def test_gpt_oss_keeps_attention_router_and_lm_head_in_bf16():
    quant = weight_quant(
        {
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            }
        }
    )
    assert quant.weight.name == "mxfp4" and quant.activation is None
    assert quant.unquantized == {"attention", "router", "lm_head"}


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (
            {"quant_method": "gptq", "bits": 4},
            "quant_method 'gptq' is not modelled; known: compressed-tensors, fp8, mxfp4",
        ),
        (
            {"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]},
            "leaves 'model.layers.0.mlp.down_proj' unquantized: one layer's exception is not modelled",
        ),
        (
            {"quant_method": "mxfp4", "modules_to_not_convert": ["vision_tower"]},
            "leaves 'vision_tower' unquantized, which names no layer group",
        ),
        (
            {
                **W4A16,
                "config_groups": {"a": W4A16["config_groups"]["group_0"], "b": FP8_DYNAMIC["config_groups"]["group_0"]},
            },
            "config_groups with different schemes are not modelled",
        ),
        (
            {**W4A16, "config_groups": {"g": {"weights": {"num_bits": 3, "type": "int", "group_size": 128}}}},
            "weights of 3 bits, type 'int', group size 128 is not modelled",
        ),
    ],
)
def test_what_cannot_be_priced_is_an_error_not_a_guess(quant, message):
    with pytest.raises(ValueError, match=message):
        _llama8b(quant)


def test_the_router_and_lm_head_entries_of_an_ignore_list_are_recognised():
    quant = weight_quant({"quantization_config": {**FP8_DYNAMIC, "ignore": ["lm_head", "re:.*mlp.gate$"]}})
    assert quant.unquantized == {"lm_head", "router"}
    # A dense MLP's gate_proj is not a router.
    with pytest.raises(ValueError, match="names no layer group"):
        weight_quant({"quantization_config": {**FP8_DYNAMIC, "ignore": ["re:.*mlp.gate_proj$"]}})


def _op(costs: CostModel, name: str, new_tokens: tuple, context_lens: tuple):
    return next(o for o in costs.cost_of(new_tokens, context_lens, detail=True).ops if o.name == name)


def test_w8a8_fp8_prefill_runs_at_the_fp8_peak_and_the_lm_head_at_bf16():
    """H100: FP8 1979 TFLOP/s, BF16 989, at 70%. A 2048-token prompt through the qkv projection reads FP8 inputs,
    writes BF16 outputs and reads FP8 weights; the LM head stays BF16."""
    h100 = load_profile("h100-sxm")
    costs = CostModel(h100, _llama8b(FP8_DYNAMIC))
    qkv = _op(costs, "qkv_proj", (2048,), (2048,))
    assert qkv.flops == 32 * 2 * 2048 * 4096 * 6144
    # The 2048 x 6144 output is 32 x 48 = 1536 tiles of 64 x 128 (no padding) in ceil(1536 / 132) = 12 waves
    # over the 132 SMs: 1536 / 1584 of the work is useful.
    assert qkv.compute_s == pytest.approx(qkv.flops / (1979e12 * 0.7 * 1536 / 1584), rel=1e-12)
    assert qkv.bytes == 32 * (2048 * (4096 * 1 + 6144 * 2) + 4096 * 6144 * 1)
    head = _op(costs, "lm_head", (2048,), (2048,))
    # One row (the prompt's last token) padded to a 64-row tile: 1/64 useful; 128256 / 128 = 1002 column tiles in
    # ceil(1002 / 132) = 8 waves: 1002 / 1056. Still memory-bound: its 1.05 GB of weights take far longer.
    assert head.compute_s == pytest.approx(2 * 4096 * 128256 / (989e12 * 0.7 / 64 * 1002 / 1056), rel=1e-12)
    assert head.bound == "memory"
    assert head.bytes == 4096 * 2 + 128256 * 2 + 4096 * 128256 * 2


def test_w4a16_decode_reads_four_bit_weights_and_computes_in_bf16():
    """Maia 100, 1.8 TB/s at 75%: one token's qkv projection reads 4.125-bit weights and BF16 activations."""
    maia100 = load_profile("maia100")
    qkv = _op(CostModel(maia100, _llama8b(W4A16)), "qkv_proj", (1,), (100,))
    assert qkv.bytes == 32 * ((4096 + 6144) * 2 + 4096 * 6144 * 4.125 / 8)
    assert qkv.memory_s == pytest.approx(qkv.bytes / (1.8e12 * 0.75), rel=1e-12)
    assert qkv.compute_s == pytest.approx(qkv.flops / (0.8e15 * 0.6), rel=1e-12)


def test_weight_dtype_prices_a_bf16_checkpoint_as_fp8_through_the_engines_path():
    """ServingConfig.weight_dtype (the CLI's --weight-dtype) reaches both the memory plan and the step costs."""
    model, maia200 = load_model_shape("llama-3-8b"), load_profile("maia200")
    device = EmulatedDevice.fit(maia200, model, ServingConfig(weight_dtype="fp8"))
    assert device.plan.weight_bytes == LINEAR * 1 + (NORMS + EMBEDDINGS) * 2
    assert device.plan.weight_bytes < plan_memory(model, maia200, ServingConfig()).weight_bytes
    qkv = _op(device.cost_model, "qkv_proj", (4096,), (4096,))
    assert qkv.compute_s == pytest.approx(32 * 2 * 4096 * 4096 * 6144 / (5e15 * 0.6), rel=1e-12)  # W8A8: FP8 peak
    bf16 = _op(EmulatedDevice.fit(maia200, model, ServingConfig()).cost_model, "qkv_proj", (4096,), (4096,))
    assert bf16.compute_s == pytest.approx(qkv.flops / (0.338e15 * 0.6), rel=1e-12)  # the vector units


@pytest.mark.parametrize(
    ("weight", "activation", "peak"),
    [
        ("int4", None, "bf16"),  # weight-only formats keep BF16 activations
        ("mxfp4", None, "bf16"),
        ("mxfp4", "fp8", "fp8"),
        ("mx6", None, "mx6"),  # MX formats multiply MX operands
        ("fp8_e5m2", None, "fp8"),
    ],
)
def test_a_weight_dtype_brings_its_own_scheme_unless_an_activation_dtype_is_given(weight, activation, peak):
    model = load_model_shape("llama-3-8b").with_weights(weight, activation)
    assert model.precision().gemm_peak("mlp") == peak
    assert model.precision().gemm_peak("lm_head") == "bf16"


def test_weight_and_activation_dtypes_are_checked():
    with pytest.raises(ValueError, match="unknown dtype 'fp5'"):
        ServingConfig(weight_dtype="fp5")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        ServingConfig(activation_dtype="int3")
    with pytest.raises(ValueError, match=r"an activation dtype \(fp8\) needs quantized weights"):
        plan_memory(load_model_shape("llama-3-8b"), load_profile("maia100"), ServingConfig(activation_dtype="fp8"))
    int8_acts = _llama8b(W4A16).with_weights(None, "int8")
    assert int8_acts.quantization.weight.name == "int4" and int8_acts.precision().gemm_peak("mlp") == "int8"


def test_fp8_weights_hold_more_kv_on_the_same_chip():
    model, maia100 = load_model_shape("llama-3-8b"), load_profile("maia100")
    bf16, fp8 = (plan_memory(model, maia100, ServingConfig(weight_dtype=w)) for w in (None, "fp8"))
    assert bf16.weight_bytes - fp8.weight_bytes == LINEAR
    assert fp8.kv_budget_bytes - bf16.kv_budget_bytes == LINEAR
    assert precision.dtype("fp8").bytes_per_element == 1

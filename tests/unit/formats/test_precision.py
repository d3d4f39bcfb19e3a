"""The one dtype vocabulary: spellings, sizes with their block scales, and the peak each GEMM runs at."""

import pytest
import yaml

from maia_serving.emulator import load_profile
from maia_serving.emulator.hardware import profile_from_dict
from maia_serving.formats import precision
from maia_serving.formats.precision import Precision, WeightQuant, gemm_peak


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("bfloat16", "bf16"),
        ("torch.bfloat16", "bf16"),
        ("bf16", "bf16"),
        ("float16", "fp16"),
        ("half", "fp16"),
        ("float32", "fp32"),
        ("float", "fp32"),
        ("fp8", "fp8_e4m3"),
        ("float8_e4m3fn", "fp8_e4m3"),
        ("torch.float8_e5m2", "fp8_e5m2"),
        ("e5m2", "fp8_e5m2"),
        ("mxfp4", "mxfp4"),
        ("mx9", "mx9"),
    ],
)
def test_every_spelling_resolves_to_one_dtype(spelling, canonical):
    assert precision.dtype(spelling).name == canonical


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("fp32", 32),
        ("bf16", 16),
        ("fp8_e4m3", 8),
        ("int8", 8),
        ("int4", 4 + 16 / 128),  # a 16-bit scale per group of 128
        ("mxfp8", 8 + 8 / 32),
        ("mxfp6", 6 + 8 / 32),
        ("mxfp4", 4 + 8 / 32),  # OCP MX: an 8-bit scale per 32
        ("nvfp4", 4 + 8 / 16),  # an E4M3 scale per 16
        ("mx9", 9),
        ("mx6", 6),
        ("mx4", 4),  # Maia's shared-microexponent formats are named by their bits
    ],
)
def test_sizes_include_the_block_scales(name, bits):
    assert precision.dtype(name).bits_per_element == bits
    assert precision.dtype(name).bytes_per_element == bits / 8


def test_an_unknown_dtype_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dtype 'fp5'; known: fp32, float32, .*mxfp4.*mx9"):
        precision.dtype("fp5")


def test_kv_cache_dtypes_are_the_vocabularys_kv_formats():
    spellings = precision.kv_cache_spellings()
    assert spellings[0] == "auto"
    assert {"bf16", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"} <= set(spellings)
    assert {precision.dtype(s).name for s in spellings[1:]} == set(precision.ENGINE_KV_CACHE_FORMATS)
    assert precision.kv_cache_dtype("auto", "bfloat16").name == "bf16"
    assert precision.kv_cache_dtype("fp8", "bfloat16").bytes_per_element == 1
    # The engines' check (the default) refuses what their attention backends do not store yet.
    with pytest.raises(ValueError, match=r"unknown kv cache dtype 'mxfp4'; allowed: auto, fp32, "):
        precision.check_kv_cache_dtype("mxfp4")


def test_the_emulator_prices_the_block_scaled_kv_formats_too():
    priced = precision.kv_cache_spellings(precision.KV_CACHE_FORMATS)
    assert set(priced) == set(precision.kv_cache_spellings()) | set(precision.BLOCK_SCALED_KV_FORMATS)
    assert {precision.dtype(s).name for s in priced[1:]} == set(precision.KV_CACHE_FORMATS)
    assert precision.check_kv_cache_dtype("mxfp4", precision.KV_CACHE_FORMATS) == "mxfp4"
    assert precision.kv_cache_dtype("mxfp4", "bfloat16").name == "mxfp4"
    assert precision.kv_cache_dtype("mxfp6", "bfloat16").element == "e3m2"
    # Shared-microexponent and integer formats are weight formats only: known dtypes, refused for a KV cache.
    with pytest.raises(
        ValueError,
        match=r"unknown kv cache dtype 'mx4'; allowed: auto, fp32, .*mxfp6_e2m3, "
        r"mxfp4, nvfp4$",
    ):
        precision.kv_cache_dtype("mx4", "bf16")
    with pytest.raises(ValueError, match=r"unknown kv cache dtype 'int4'"):
        precision.check_kv_cache_dtype("int4", precision.KV_CACHE_FORMATS)


@pytest.mark.parametrize(
    ("name", "element", "block", "scale"),
    [
        ("mxfp8", "e4m3", 32, "e8m0"),
        ("mxfp6", "e3m2", 32, "e8m0"),  # OCP MX v1.0's FP6 E3M2, issue 10's MXFP6
        ("mxfp6_e2m3", "e2m3", 32, "e8m0"),  # the other OCP FP6 variant
        ("mxfp4", "e2m1", 32, "e8m0"),
        ("nvfp4", "e2m1", 16, "e4m3"),
    ],
)
def test_block_scaled_kv_formats_name_their_element_block_and_scale(name, element, block, scale):
    d = precision.dtype(name)
    assert (d.element, d.block_size, d.scale, d.scale_bits) == (element, block, scale, 8)
    assert d.element_bits == 1 + int(element[1]) + int(element[3])
    assert element.upper() in d.source and name in precision.BLOCK_SCALED_KV_FORMATS
    assert name in precision.KV_CACHE_FORMATS and name not in precision.ENGINE_KV_CACHE_FORMATS


@pytest.mark.parametrize(
    ("name", "length", "nbytes"),
    [
        ("bf16", 128, 256),
        ("fp8", 128, 128),
        ("fp32", 80, 320),
        ("mxfp8", 128, 4 * (32 + 1)),  # 132: 8.25 bits an element
        ("mxfp6", 128, 4 * (24 + 1)),  # 100: 6.25
        ("mxfp6_e2m3", 128, 100),
        ("mxfp4", 128, 4 * (16 + 1)),  # 68: 4.25
        ("nvfp4", 128, 8 * (8 + 1)),  # 72: 4.5
        ("mxfp4", 80, 3 * 17),  # 80 = 2.5 blocks: the third is padded to 32 and stored whole
        ("nvfp4", 80, 5 * 9),  # 80 = 5 blocks of 16 exactly
        ("mxfp8", 576, 18 * 33),  # DeepSeek's MLA latent (512 + 64)
    ],
)
def test_a_row_is_whole_blocks_with_their_scales(name, length, nbytes):
    assert precision.dtype(name).row_bytes(length) == nbytes


@pytest.mark.parametrize(
    ("weight", "activation", "peak"),
    [
        ("bf16", "bf16", "bf16"),
        ("int4", "bf16", "bf16"),  # W4A16: weights widened to the activations'
        ("mxfp4", "bf16", "bf16"),
        ("fp8_e4m3", "fp8_e4m3", "fp8"),  # W8A8
        ("mxfp4", "fp8_e4m3", "fp8"),  # Maia 200's FP8 activations x FP4 weights
        ("int4", "int8", "int8"),
        ("mx6", "mx6", "mx6"),
        ("nvfp4", "nvfp4", "fp4"),
    ],
)
def test_a_gemm_runs_at_its_wider_operands_peak(weight, activation, peak):
    assert gemm_peak(precision.dtype(weight), precision.dtype(activation)) == peak


@pytest.mark.parametrize(
    ("profile", "dtype", "peak_flops"),
    [
        ("maia100", "bf16", 0.8e15),
        ("maia100", "mx9", 1.5e15),
        ("maia100", "mx6", 3e15),
        ("maia100", "mx4", 3e15),  # no MX4 unit: widened to MX6
        ("maia100", "fp8_e4m3", 0.8e15),  # no FP8 figure: the BF16 rate
        ("maia200", "fp8", 5e15),
        ("maia200", "mxfp4", 10e15),
        ("maia200", "fp6", 5e15),  # no FP6 figure: the FP8 rate
        ("maia200", "bfloat16", 0.338e15),  # the vector units (an estimate)
        ("h100-sxm", "fp8", 1979e12),
        ("h100-sxm", "int8", 1979e12),
        ("h100-sxm", "nvfp4", 1979e12),  # Hopper has no FP4: widened to FP8
        ("h200", "float16", 989e12),
    ],
)
def test_each_profile_prices_a_format_at_its_own_peak_or_the_next_wider(profile, dtype, peak_flops):
    assert load_profile(profile).peak_flops(dtype) == pytest.approx(peak_flops)


@pytest.mark.parametrize(
    ("available", "key", "runs_at"),
    [
        ({"bf16", "mx9"}, "mx4", "mx9"),
        ({"bf16", "mx6"}, "mx4", "mx6"),
        ({"bf16", "fp8"}, "fp4", "fp8"),
        ({"bf16", "int8"}, "int4", "int8"),
        ({"bf16", "fp32"}, "fp16", "bf16"),
        ({"bf16"}, "fp32", "bf16"),
    ],
)
def test_the_fallback_ladder_widens_one_step_at_a_time(available, key, runs_at):
    assert precision.resolve_peak(available, key) == runs_at


def test_the_ladder_refuses_unknown_formats_and_profiles_without_bf16():
    with pytest.raises(ValueError, match="unknown peak format 'fp5'"):
        precision.resolve_peak({"bf16"}, "fp5")
    with pytest.raises(ValueError, match="no peak for 'fp8' or any format wider than it among fp4"):
        precision.resolve_peak({"fp4"}, "fp8")


def test_maia200_bf16_is_stated_as_an_assumption_on_the_vector_units():
    m200 = load_profile("maia200")
    assert "peak_compute.bf16" in m200.estimates
    assert "vector" in m200.sources["peak_compute.bf16"] and "assumption" in m200.sources["peak_compute.bf16"]


def test_a_profile_peak_in_an_unknown_format_is_refused():
    raw = yaml.safe_load(open(load_profile.__globals__["_builtin_dir"]() / "maia100.yaml"))
    raw["peak_compute"]["fp5"] = {"value": 1, "unit": "PFLOP/s", "source": "x"}
    with pytest.raises(ValueError, match=r"unknown peak formats \['fp5'\]; known: bf16, fp32"):
        profile_from_dict(raw)


def test_precision_keeps_routers_and_the_lm_head_in_the_model_dtype():
    quant = WeightQuant(precision.dtype("fp8"), precision.dtype("fp8"), unquantized=frozenset({"attention"}))
    bf16 = precision.dtype("bf16")
    prec = Precision(model=bf16, kv_cache=bf16, comm=bf16, quant=quant)
    assert [prec.weight(g).name for g in precision.LINEAR_GROUPS] == ["bf16", "fp8_e4m3", "fp8_e4m3", "bf16", "bf16"]
    assert [prec.gemm_peak(g) for g in precision.LINEAR_GROUPS] == ["bf16", "fp8", "fp8", "bf16", "bf16"]
    with pytest.raises(ValueError, match="unknown linear layer group 'moe'"):
        prec.weight("moe")
    with pytest.raises(ValueError, match=r"unknown linear layer groups \['moe'\]"):
        WeightQuant(bf16, None, unquantized=frozenset({"moe"}))


# --- the collectives' payload: --comm-dtype -------------------------------------------------------


def _tp_cost(comm_dtype: str | None):
    from maia_serving.emulator import ServingConfig, load_model_shape
    from maia_serving.emulator.cost.layout import Parallel
    from maia_serving.emulator.cost.model import CostModel, StepShape
    from maia_serving.emulator.memory import served_model

    model = served_model(load_model_shape("llama-3-8b"), ServingConfig(tensor_parallel_size=4, comm_dtype=comm_dtype))
    cost = CostModel(load_profile("maia100"), model, Parallel(tp=4))
    return cost, cost.cost(StepShape.of([(1, 1024)] * 64))


def test_a_quantized_all_reduce_carries_the_comm_dtypes_bytes():
    """FP8 collectives: each all-reduce moves half BF16's bytes; the GEMMs, attention and weights are
    untouched (only the payload changes)."""
    bf16_model, bf16 = _tp_cost(None)
    fp8_model, fp8 = _tp_cost("fp8")
    assert fp8_model.model.precision().comm.name == "fp8_e4m3"
    assert bf16_model.model.precision().comm.name == "bf16"
    assert fp8.comm_s < bf16.comm_s
    assert fp8_model.all_reduce_s(64) < bf16_model.all_reduce_s(64)
    assert (fp8.compute_s, fp8.memory_s) == (bf16.compute_s, bf16.memory_s)
    assert fp8_model.model.weight_bytes() == bf16_model.model.weight_bytes()


def test_an_unknown_comm_dtype_is_refused_by_name():
    from maia_serving.emulator import ServingConfig

    with pytest.raises(ValueError, match="fp9"):
        ServingConfig(comm_dtype="fp9")

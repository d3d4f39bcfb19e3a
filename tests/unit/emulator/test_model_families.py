"""Model families from config.json: parameter counts and KV bytes against published figures, MoE, sliding
windows and MLA in the memory plan and the step cost, and clear errors for what the emulator does not model.

Sources of the published figures: maia_serving/emulator/shapes/SOURCES.md.
"""

import itertools
import json
from dataclasses import replace
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile, plan_memory
from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.cost.terms import window_sum
from maia_serving.emulator.memory import kv_bytes_per_sequence, kv_bytes_per_token, longest_sequence
from maia_serving.emulator.model_shape import MoE, shape_from_config

BUILTIN = (
    "llama-3-8b",
    "llama-3-70b",
    "qwen2.5-7b",
    "mistral-7b",
    "gemma-2-9b",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "deepseek-v2-lite",
    "deepseek-r1",
    "gpt-oss-20b",
)


def _embedding_table(name: str) -> int:
    model = load_model_shape(name)
    return model.vocab_size * model.hidden_size


@pytest.mark.parametrize(
    ("name", "published", "tolerance"),
    [
        ("llama-3-8b", 8_030_261_248, 0),  # Hugging Face safetensors count
        ("llama-3-70b", 70.6e9, 0.001),
        ("mistral-7b", 7.3e9, 0.01),  # Mistral AI, "Announcing Mistral 7B"
        ("mixtral-8x7b", 46.7e9, 0.001),  # Mistral AI, "Mixtral of experts"
        ("qwen3-30b-a3b", 30.5e9, 0.002),  # Qwen3-30B-A3B model card
        ("deepseek-v2-lite", 15_706_484_224, 0),  # summed over the checkpoint's tensors; 15.7B in the DeepSeek-V2 paper
        ("gpt-oss-20b", 20.91e9, 0.001),  # gpt-oss model card, Table 1
        ("deepseek-r1", 671e9, 0.001),  # DeepSeek-V3 technical report (arXiv:2412.19437): 671B, the MTP module aside
    ],
)
def test_total_parameters_match_the_published_counts(name, published, tolerance):
    assert load_model_shape(name).num_params() == pytest.approx(published, rel=tolerance)


def test_parameter_counts_by_hand():
    """Every weight of the families' layers, from the config.json fields."""
    qwen3_layer = (
        2048 * (32 + 2 * 4) * 128
        + 32 * 128 * 2048  # q, k, v, o
        + 2 * 128  # q_norm and k_norm
        + 2048 * 128
        + 128 * 3 * 2048 * 768  # router and 128 experts
        + 2 * 2048
    )
    assert load_model_shape("qwen3-30b-a3b").num_params() == 48 * qwen3_layer + 2 * 151936 * 2048 + 2048
    gpt_oss_layer = (
        2880 * (64 + 2 * 8) * 64
        + (64 + 2 * 8) * 64
        + 64 * 64 * 2880
        + 2880  # biased q, k, v, o
        + 2880 * 32
        + 32  # biased router
        + 32 * (2880 * 2 * 2880 + 2 * 2880 + 2880 * 2880 + 2880)  # 32 biased experts
        + 2 * 2880
    )  # (its 64 attention sinks a layer are not counted)
    assert load_model_shape("gpt-oss-20b").num_params() == 24 * gpt_oss_layer + 2 * 201088 * 2880 + 2880
    moe_keys = ("num_experts", "moe_intermediate_size")
    dense = {k: v for k, v in shape_config("qwen3-30b-a3b").items() if k not in moe_keys}
    qwen3, llama = (shape_from_config({**dense, "model_type": t}, t) for t in ("qwen3", "llama"))
    assert qwen3.num_params() - llama.num_params() == 48 * 2 * 128  # Qwen3's q_norm and k_norm
    qwen25 = load_model_shape("qwen2.5-7b")
    without_biases = replace(qwen25, qkv_bias=False)
    assert qwen25.qkv_bias and qwen25.num_params() - without_biases.num_params() == 28 * (3584 + 2 * 512)


def test_non_embedding_parameters_match_the_model_cards():
    # Gemma 2 report, Table 2 (its embedding count is for a 256,128-entry vocabulary; the released config has 256,000).
    assert load_model_shape("gemma-2-9b").num_params() - _embedding_table("gemma-2-9b") == 8_324_201_984
    # Qwen3-30B-A3B card: 29.9B non-embedding (input embedding and LM head); Qwen2.5-7B card: 6.53B.
    assert load_model_shape("qwen3-30b-a3b").num_params() - 2 * _embedding_table("qwen3-30b-a3b") == pytest.approx(
        29.9e9, rel=0.002
    )
    assert load_model_shape("qwen2.5-7b").num_params() - 2 * _embedding_table("qwen2.5-7b") == pytest.approx(
        6.53e9, rel=0.001
    )


@pytest.mark.parametrize(
    ("name", "published", "with_embedding", "tolerance"),
    [
        ("mixtral-8x7b", 12.9e9, True, 0.002),  # Mistral AI counts the embedding table
        ("qwen3-30b-a3b", 3.3e9, True, 0.02),  # so does Qwen (3.35B: "3.3B")
        ("gpt-oss-20b", 3.61e9, False, 0.001),  # OpenAI leaves it out
        # DeepSeek leaves it out too (so DeepSeek-V3's 37B); "2.4B" is given to two figures and ours is 2.45B.
        ("deepseek-v2-lite", 2.4e9, False, 0.025),
        ("deepseek-r1", 37e9, False, 0.02),  # DeepSeek-V3 technical report: 37B activated per token (ours 36.6B)
    ],
)
def test_active_parameters_match_the_published_counts(name, published, with_embedding, tolerance):
    active = load_model_shape(name).active_params() - (0 if with_embedding else _embedding_table(name))
    assert active == pytest.approx(published, rel=tolerance)


def test_gpt_oss_checkpoint_is_mxfp4_experts_and_bf16_elsewhere():
    """12.8 GiB (gpt-oss model card): 19.1B expert weights at 4.25 bits, the rest in BF16."""
    model = load_model_shape("gpt-oss-20b")
    assert model.weight_bytes() / 2**30 == pytest.approx(12.8, rel=0.002)
    experts = 24 * 32 * (2880 * 5760 + 2880 * 2880)
    assert model.weight_bytes() == (experts * 4.25 / 8 + (model.num_params() - experts) * 2)


def test_mixtral_weights_count_every_expert():
    """The issue's case: 14.48 GB when its config was read as a dense model."""
    assert load_model_shape("mixtral-8x7b").weight_bytes() == 46_702_792_704 * 2


# Bytes one token stores in BF16 on one chip, from the published architectures: K and V of every KV head in every
# layer, or for MLA one (kv_lora_rank + qk_rope_head_dim) latent per layer (DeepSeek-V2 paper, Table 1).
KV_BYTES_PER_TOKEN = {
    "llama-3-8b": 2 * 32 * 8 * 128 * 2,
    "mistral-7b": 2 * 32 * 8 * 128 * 2,
    "gemma-2-9b": 2 * 42 * 8 * 256 * 2,
    "mixtral-8x7b": 2 * 32 * 8 * 128 * 2,
    "qwen3-30b-a3b": 2 * 48 * 4 * 128 * 2,
    "deepseek-v2-lite": 27 * (512 + 64) * 2,
    "gpt-oss-20b": 2 * 24 * 8 * 64 * 2,
}


@pytest.mark.parametrize("name", list(KV_BYTES_PER_TOKEN))
def test_kv_bytes_per_token(name):
    assert kv_bytes_per_token(load_model_shape(name), ServingConfig()) == KV_BYTES_PER_TOKEN[name]


def test_mla_keeps_the_whole_latent_on_every_tensor_parallel_rank():
    model = load_model_shape("deepseek-v2-lite")
    assert kv_bytes_per_token(model, ServingConfig(tensor_parallel_size=4)) == 27 * 576 * 2
    gqa = load_model_shape("mixtral-8x7b")
    assert kv_bytes_per_token(gqa, ServingConfig(tensor_parallel_size=4)) == 2 * 32 * 2 * 128 * 2  # 2 of 8 KV heads


@pytest.mark.parametrize(
    ("name", "length", "layer_blocks"),
    [
        # Full layers keep every block of 16 tokens; a sliding layer past its window the ceil((window - 1) / 16) + 1
        # blocks that cover it.
        ("mistral-7b", 32768, 32 * 257),
        ("mistral-7b", 4096, 32 * 256),  # within the window: every token
        ("gemma-2-9b", 8192, 21 * 512 + 21 * 257),
        ("gemma-2-9b", 4000, 42 * 250),
        ("gpt-oss-20b", 131072, 12 * 8192 + 12 * 9),
    ],
)
def test_sliding_layers_hold_only_their_window(name, length, layer_blocks):
    model = load_model_shape(name)
    per_token_layer = KV_BYTES_PER_TOKEN[name] // model.num_layers
    assert kv_bytes_per_sequence(model, ServingConfig(), length) == layer_blocks * 16 * per_token_layer


def test_a_window_lets_more_long_sequences_share_the_cache():
    mistral, maia100 = load_model_shape("mistral-7b"), load_profile("maia100")
    plan = plan_memory(mistral, maia100, ServingConfig())
    assert plan.max_model_len == 32768 and plan.kv_bytes_per_sequence == 32 * 257 * 16 * 4096
    assert plan.max_concurrent_seqs == int(plan.kv_budget_bytes // (32 * 257 * 16 * 4096))
    unwindowed = plan_memory(replace(mistral, sliding_window=None, num_sliding_layers=0), maia100, ServingConfig())
    assert unwindowed.max_concurrent_seqs == int(plan.kv_budget_bytes // (32768 * 131072))
    assert plan.max_concurrent_seqs > 7 * unwindowed.max_concurrent_seqs
    assert plan.num_blocks == unwindowed.num_blocks  # the same tokens of short sequences


def test_the_longest_sequence_past_a_window_costs_nothing_more():
    mistral, config = load_model_shape("mistral-7b"), ServingConfig()
    window_bytes = kv_bytes_per_sequence(mistral, config, 10**6)
    assert longest_sequence(mistral, config, window_bytes, 10**6) == 10**6
    assert longest_sequence(mistral, config, window_bytes - 1, 10**6) == 4096


def test_experts_touched_is_the_expectation_over_uniform_routing():
    """Brute force: every way 3 tokens can each pick 2 of 4 experts, counting the distinct experts."""
    choices = list(itertools.combinations(range(4), 2))
    routings = list(itertools.product(choices, repeat=3))
    mean = sum(len(set(itertools.chain(*r))) for r in routings) / len(routings)
    assert MoE(4, 2, 1).experts_touched(3) == pytest.approx(mean, rel=1e-12)
    mixtral = load_model_shape("mixtral-8x7b").moe
    assert mixtral.experts_touched(1) == 2 and mixtral.experts_touched(2) == 8 * (1 - 0.75**2) == 3.5
    assert mixtral.experts_touched(8192) == pytest.approx(8, rel=1e-12)


def _ops(costs: CostModel, new_tokens: tuple, context_lens: tuple) -> dict:
    return {o.name: o for o in costs.cost_of(new_tokens, context_lens, detail=True).ops}


def test_moe_steps_price_the_routed_experts_flops_and_the_touched_experts_weights():
    """Mixtral on a Maia 100: each token runs 2 of 8 experts of [4096 -> 2 x 14336 -> 4096] in each of 32 layers."""
    costs = CostModel(load_profile("maia100"), load_model_shape("mixtral-8x7b"))
    expert_gate_up = 4096 * 2 * 14336
    one = _ops(costs, (1,), (100,))["experts.gate_up_proj"]
    assert one.flops == 32 * 2 * 2 * expert_gate_up
    assert one.bytes == 32 * (2 * (4096 + 2 * 14336) * 2 + 2 * expert_gate_up * 2)  # 2 experts' weights
    two = _ops(costs, (1, 1), (100, 100))["experts.gate_up_proj"]
    assert two.bytes == 32 * (4 * (4096 + 2 * 14336) * 2 + 3.5 * expert_gate_up * 2)  # 3.5 experts expected
    prefill = _ops(costs, (8192,), (8192,))["experts.gate_up_proj"]
    assert prefill.flops == 8192 * one.flops
    assert prefill.bytes == pytest.approx(32 * (8192 * 2 * (4096 + 2 * 14336) * 2 + 8 * expert_gate_up * 2), rel=1e-12)
    assert "router" in _ops(costs, (1,), (1,)) and "gate_up_proj" not in _ops(costs, (1,), (1,))


def test_shared_experts_and_dense_first_layers_run_for_every_token():
    """DeepSeek-V2-Lite: layer 0 has a dense MLP of 10944; layers 1-26 two shared experts of 1408 beside 6 of 64."""
    ops = _ops(CostModel(load_profile("h100-sxm"), load_model_shape("deepseek-v2-lite")), (1,), (10,))
    assert ops["gate_up_proj"].flops == 1 * 2 * 2048 * 2 * 10944
    assert ops["shared_experts.gate_up_proj"].flops == 26 * 2 * 2048 * 2 * 2816
    assert ops["experts.gate_up_proj"].flops == 26 * 6 * 2 * 2048 * 2 * 1408


def test_moe_workspace_holds_the_widest_mlp_a_token_produces():
    """Per token: residual and normed input, q and attention output (32 x 128), K and V (4 x 128), the MLP's two
    intermediates, in BF16; and FP32 logits for 10 sequences."""
    qwen3 = shape_config("qwen3-30b-a3b")
    config = ServingConfig(max_num_batched_tokens=1000, max_num_seqs=10)
    routed = plan_memory(shape_from_config(qwen3, "q"), load_profile("h200"), config)
    logits = 10 * 151936 * 4
    assert routed.workspace_bytes == 1000 * (2 * 2048 + 2 * 4096 + 2 * 512 + 2 * 8 * 768) * 2 + logits
    # A dense first layer wider than the 8 routed experts together sets the width instead.
    wide = shape_from_config({**qwen3, "mlp_only_layers": [0], "intermediate_size": 12288}, "q")
    assert plan_memory(wide, load_profile("h200"), config).workspace_bytes == (
        1000 * (2 * 2048 + 2 * 4096 + 2 * 512 + 2 * 12288) * 2 + logits
    )
    # MLA: 16 query heads of 192, the 576-wide latent, 6 routed experts of 1408 and 2 shared ones.
    mla = plan_memory(load_model_shape("deepseek-v2-lite"), load_profile("h200"), config)
    assert mla.workspace_bytes == (
        1000 * (2 * 2048 + 2 * 16 * 192 + 2 * 576 + 2 * (6 * 1408 + 2 * 1408)) * 2 + 10 * 102400 * 4
    )


def test_sliding_attention_reads_and_pairs_only_within_the_window():
    """Mistral-7B decoding at 10000 tokens attends to the last 4096: 32 heads x 128 x 4 FLOPs per pair, and reads
    4096 tokens' K and V (8 heads x 128 x 2 x 2 bytes) plus its own q, output and new K and V."""
    costs = CostModel(load_profile("maia100"), load_model_shape("mistral-7b"))
    ops = _ops(costs, (1,), (10_000,))
    assert "attention" not in ops
    attention = ops["attention_sliding"]
    assert attention.flops == 32 * 4 * 32 * 128 * 4096
    assert attention.bytes == 32 * (4096 * 4096 + 4096 + 32 * 256 * 2)
    short = _ops(costs, (1,), (100,))["attention_sliding"]
    assert short.bytes == 32 * (100 * 4096 + 4096 + 32 * 256 * 2)


def test_hybrid_models_price_full_and_sliding_layers_apart():
    ops = _ops(CostModel(load_profile("h100-sxm"), load_model_shape("gpt-oss-20b")), (1,), (1000,))
    full, sliding = ops["attention"], ops["attention_sliding"]
    assert full.flops == 12 * 4 * 64 * 64 * 1000 and sliding.flops == 12 * 4 * 64 * 64 * 128


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n), st.integers(1, 70))))
def test_window_pairs_count_each_query_and_the_keys_it_sees(case):
    """A query at position p sees keys p - window + 1 .. p (vLLM's and HF's sliding window)."""
    q, n, window = case
    brute = sum(1 for p in range(n - q, n) for k in range(n) if p - window < k <= p)
    assert window_sum(n - q + 1, n, window) == brute


def test_mla_attends_in_the_latent_space():
    """DeepSeek-V2-Lite, absorbed: scores over 512 + 64 dims, values over 512, for 16 heads in 27 layers."""
    costs = CostModel(load_profile("h100-sxm"), load_model_shape("deepseek-v2-lite"), Parallel(tp=2))
    attention = _ops(costs, (1,), (1000,))["attention"]
    assert attention.flops == 27 * 2 * 8 * (576 + 512) * 1000
    assert attention.bytes == 27 * (1001 * 576 * 2 + 8 * (576 + 512) * 2)


def test_gemma2_soft_caps_scores_and_logits():
    model = load_model_shape("gemma-2-9b")
    assert (model.attn_logit_softcap, model.final_logit_softcap, model.tie_word_embeddings) == (50.0, 30.0, True)
    ops = _ops(CostModel(load_profile("h100-sxm"), model), (1,), (10,))
    assert ops["attention"].flops == 21 * (4 * 16 * 256 + 3 * 16) * 10
    assert ops["logit_softcap"].flops == 3 * 256000
    assert ops["rmsnorm"].flops == 4 * 42 * 5 * 3584  # four norms a layer


def shape_config(name: str) -> dict:
    """A built-in shape's config.json, as parsed."""
    return json.loads((resources.files("maia_serving.emulator") / "shapes" / f"{name}.json").read_text())


def test_an_architecture_the_emulator_does_not_model_is_named():
    with pytest.raises(ValueError, match=r"is a 'phi3', an architecture the emulator does not model; known: llama, "):
        shape_from_config({**shape_config("mixtral-8x7b"), "model_type": "phi3"}, "phi")


def test_missing_keys_are_named_never_guessed():
    config = shape_config("mixtral-8x7b")
    del config["num_local_experts"], config["num_experts_per_tok"]
    with pytest.raises(ValueError, match=r"\(mixtral\) lacks 'num_local_experts', 'num_experts_per_tok'$"):
        shape_from_config(config, "m")
    with pytest.raises(ValueError, match=r"\(gemma2\) lacks 'head_dim'"):
        shape_from_config({**shape_config("gemma-2-9b"), "head_dim": None}, "g")


def test_a_config_without_model_type_is_dense_only_without_the_keys_of_other_families():
    config = shape_config("mixtral-8x7b")
    del config["model_type"]
    with pytest.raises(ValueError, match="has no model_type but keys a dense decoder does not have: num_local_experts"):
        shape_from_config(config, "m")
    dense = {k: v for k, v in config.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    assert shape_from_config(dense, "d").moe is None


@pytest.mark.parametrize(
    ("changes", "window", "sliding"),
    [
        ({}, None, 0),  # use_sliding_window is false in Qwen's configs: sliding_window is then unused
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 28}, 4096, 0),
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}, 4096, 8),
    ],
)
def test_qwen_windows_follow_use_sliding_window_and_max_window_layers(changes, window, sliding):
    model = shape_from_config({**shape_config("qwen2.5-7b"), "sliding_window": 4096, **changes}, "q")
    assert (model.sliding_window, model.num_sliding_layers) == (window, sliding)


def test_layer_types_must_name_a_known_attention_per_layer():
    config = shape_config("gpt-oss-20b")
    with pytest.raises(ValueError, match="got 24 entries for 24 layers, with linear_attention"):
        shape_from_config({**config, "layer_types": ["linear_attention"] * 24}, "g")
    with pytest.raises(ValueError, match="got 2 entries for 24 layers"):
        shape_from_config({**config, "layer_types": ["full_attention"] * 2}, "g")


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_gemma_ties_its_embeddings_unless_told_otherwise(model_type):
    config = {**shape_config("gemma-2-9b"), "model_type": model_type}
    assert shape_from_config(config, "g").tie_word_embeddings
    untied = shape_from_config({**config, "tie_word_embeddings": False}, "g")
    assert untied.num_params() - shape_from_config(config, "g").num_params() == 256000 * 3584


def test_an_mlp_bias_is_refused_rather_than_left_out():
    with pytest.raises(ValueError, match="sets mlp_bias, which the emulator does not model"):
        shape_from_config({**shape_config("llama-3-8b"), "mlp_bias": True}, "l")


def test_deepseeks_expert_groups_are_read_and_must_divide_its_experts():
    """DeepSeek-V3's config.json: n_group 8 over 256 experts (vLLM's EPLB keeps each group on one node)."""
    config = shape_config("deepseek-v2-lite")
    assert "n_group" not in config and shape_from_config(config, "d").moe.num_groups == 1
    assert shape_from_config({**config, "n_group": 8}, "d").moe.num_groups == 8
    with pytest.raises(ValueError, match=r"n_group \(5\) must divide n_routed_experts \(64\)"):
        shape_from_config({**config, "n_group": 5}, "d")


def test_qwen2_moe_has_a_gated_shared_expert():
    """Qwen1.5-MoE-A2.7B (its config.json's fields): 14.3B parameters, 2.7B activated (Qwen blog, 2024)."""
    model = shape_from_config(
        {
            "model_type": "qwen2_moe",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 151936,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
        "qwen1.5-moe-a2.7b",
    )
    assert model.moe.shared_expert_gate and model.moe.num_dense_layers == 0
    assert model.num_params() == pytest.approx(14.3e9, rel=0.002)
    assert model.active_params() == pytest.approx(2.7e9, rel=0.01)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_shape_fits_a_plan_and_prices_a_step(name):
    model = load_model_shape(name)
    plan = plan_memory(model, load_profile("maia200"), ServingConfig(tensor_parallel_size=4))
    assert plan.weight_bytes > 0 and plan.kv_bytes_per_token > 0
    cost = CostModel(load_profile("maia200"), model, Parallel(tp=4)).cost_of((1, 512), (3000, 512))
    assert cost.total_s > 0 and cost.memory_s > 0


def test_olmo3_windows_the_layers_its_layer_types_name():
    """Olmo-3 (the hybrid-window demo model's family): three windowed layers, then a full one."""
    config = {
        **shape_config("llama-3-8b"),
        "model_type": "olmo3",
        "sliding_window": 4096,
        "attention_bias": False,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    } | {"num_hidden_layers": 4}
    model = shape_from_config(config, "o")
    assert (model.sliding_window, model.num_sliding_layers, model.qk_norm) == (4096, 3, True)

"""Roofline step cost: golden values by hand through the engines' path, and invariants on random steps."""

import dataclasses
import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maia_serving.emulator import Parallel, ServingConfig, StepShape, load_model_shape, load_profile, step_cost
from maia_serving.emulator.cost import model as cost_module
from maia_serving.emulator.cost.model import CostModel, StepCost, roofline
from maia_serving.emulator.cost.terms import op_terms
from maia_serving.emulator.device.session import EmulatedDevice

PROFILES = ("maia100", "maia200", "h100-sxm", "h200")
MODELS = ("llama-3-8b", "llama-3-70b", "qwen2.5-7b")


@pytest.mark.parametrize("name", ["prefill", "chunk", "decode"])
def test_golden_steps_as_the_engines_charge_them(llama8b, maia100, golden, name):
    """The hand-priced steps of conftest.py, through EmulatedDevice.charge -> CostModel.cost_of."""
    step = golden[name]
    device = EmulatedDevice.fit(maia100, llama8b, ServingConfig())
    record = device.charge(step.new_tokens, step.context_lens, {}, [], kv_blocks_used=0)
    assert record.compute_s == pytest.approx(step.compute_s, rel=1e-12)
    assert record.memory_s == pytest.approx(step.memory_s, rel=1e-12)
    assert record.launch_s == pytest.approx((9 * 32 + 3) * 5e-6, rel=1e-12)  # 291 kernels at 5 us
    assert record.comm_s == 0.0
    assert record.step_s == pytest.approx(step.total_s, rel=1e-12)
    assert record.bound == ("memory" if name == "decode" else "compute")


def test_golden_qkv_gemm_one_token_on_maia100(llama8b, maia100):
    """Decode of one token through Llama-3-8B's qkv projection on a Maia 100.

    flops = 2 * 1 * 4096 * 6144; bytes = 4096 * 6144 * 2 (weights) + (4096 + 6144) * 2;
    memory time = bytes / (1.8 TB/s * 0.75) = 37.30 us, compute = flops / (0.8 PF * 0.6).
    """
    op = next(o for o in step_cost(maia100, llama8b, StepShape.of([(1, 1)])).ops if o.name == "qkv_proj")
    assert op.flops == 32 * 2 * 4096 * 6144
    assert op.bytes == 32 * (4096 * 6144 * 2 + (4096 + 6144) * 2)
    assert op.memory_s / 32 == pytest.approx(50_352_128 / (1.8e12 * 0.75))
    assert op.memory_s / 32 == pytest.approx(37.298e-6, rel=1e-4)
    assert op.compute_s / 32 == pytest.approx(2 * 4096 * 6144 / (0.8e15 * 0.6))
    assert op.bound == "memory"


def test_launch_cost_counts_every_kernel(llama8b):
    for name in ("maia100", "maia200"):  # profiles without host-launch, graph or step-overhead figures
        cost = step_cost(load_profile(name), llama8b, StepShape.of([(1, 900)] * 16 + [(300, 700)]), Parallel(tp=4))
        assert cost.comm_s > 0
        # Per layer: two norms (the residual adds fused into them) and seven other kernels; three outside the layers.
        assert cost.launch_s == pytest.approx((9 * 32 + 3) * load_profile(name).kernel_launch_s)


def test_fp8_kv_reads_half_the_attention_bytes(llama8b, maia100):
    step = StepShape.of([(1, 4096)] * 8)
    attn = {
        dt: next(o for o in step_cost(maia100, llama8b, step, kv_cache_dtype=dt).ops if o.name == "attention")
        for dt in ("auto", "fp8")
    }
    kv_bytes = lambda elem: (8 * 4096 + 8) * 2 * 8 * 128 * elem * 32  # noqa: E731
    q_and_out = 2 * 8 * 32 * 128 * 2 * 32
    assert attn["auto"].bytes == kv_bytes(2) + q_and_out
    assert attn["fp8"].bytes == kv_bytes(1) + q_and_out
    assert attn["fp8"].bytes - q_and_out == (attn["auto"].bytes - q_and_out) / 2


@pytest.mark.parametrize(
    ("kv", "row"), [("mxfp8", 4 * 33), ("mxfp6", 4 * 25), ("mxfp6_e2m3", 4 * 25), ("mxfp4", 4 * 17), ("nvfp4", 8 * 9)]
)
def test_block_scaled_kv_reads_and_writes_its_stored_bytes(llama8b, maia100, kv, row):
    """8 sequences decoding at 4096: per layer each reads 4096 tokens' K and V rows of 8 heads and writes one
    token's, each 128-wide row at its stored size (whole blocks with their scales), plus q and the output."""
    step = StepShape.of([(1, 4096)] * 8)
    attn = {
        dt: next(o for o in step_cost(maia100, llama8b, step, kv_cache_dtype=dt).ops if o.name == "attention")
        for dt in ("auto", kv)
    }
    q_and_out = 2 * 8 * 32 * 128 * 2 * 32
    assert attn[kv].bytes == (8 * 4096 + 8) * 2 * 8 * row * 32 + q_and_out
    assert attn[kv].flops == attn["auto"].flops  # dequantized in registers: the same math
    if kv == "mxfp4":
        assert attn[kv].bytes == 32_776 * 34_816 + 4_194_304 == 1_145_323_520
        assert attn[kv].memory_s == pytest.approx(1_145_323_520 / (1.8e12 * 0.75), rel=1e-12)


def test_llama3_8b_operators_on_two_chips_by_hand(llama8b):
    """Per operator and token (or sequence, query-key pair, context token, step), FLOPs and bytes on one of
    two tensor-parallel chips: the column-parallel GEMMs hold half their outputs, the row-parallel ones half
    their inputs, attention half the heads (4 of the 8 KV heads); norms, residuals and embedding are whole."""
    h, inter, layers = 4096, 14336, 32
    qkv, kv_token = (4096 + 2 * 1024) // 2, 2 * 4 * 128 * 2  # this chip's q, k, v outputs; K and V bytes per token
    expected = {  # name: (kernels, FLOPs by (tokens, seqs, pairs, context, constant), bytes by the same)
        "rmsnorm": (2 * layers, (5 * h, 0, 0, 0, 0), (2 * h * 2, 0, 0, 0, h * 2)),
        "qkv_proj": (layers, (2 * h * qkv, 0, 0, 0, 0), ((h + qkv) * 2, 0, 0, 0, h * qkv * 2)),
        "rotary": (layers, (6 * 2560, 0, 0, 0, 0), (2 * 2560 * 2, 0, 0, 0, 0)),
        "attention": (layers, (0, 0, 4 * 16 * 128, 0, 0), (kv_token + 2 * 16 * 128 * 2, 0, 0, kv_token, 0)),
        "o_proj": (layers, (2 * 2048 * h, 0, 0, 0, 0), ((2048 + h) * 2, 0, 0, 0, 2048 * h * 2)),
        "gate_up_proj": (layers, (2 * h * inter, 0, 0, 0, 0), ((h + inter) * 2, 0, 0, 0, h * inter * 2)),
        "silu_and_mul": (layers, (5 * inter // 2, 0, 0, 0, 0), (3 * inter // 2 * 2, 0, 0, 0, 0)),
        "down_proj": (layers, (2 * inter // 2 * h, 0, 0, 0, 0), ((inter // 2 + h) * 2, 0, 0, 0, inter // 2 * h * 2)),
        "residual_add": (2 * layers, (h, 0, 0, 0, 0), (3 * h * 2, 0, 0, 0, 0)),
        "embedding": (1, (0, 0, 0, 0, 0), (h * 2, 0, 0, 0, 0)),
        "final_norm": (1, (0, 5 * h, 0, 0, 0), (0, 2 * h * 2, 0, 0, h * 2)),
        "lm_head": (1, (0, 2 * h * 64128, 0, 0, 0), (0, (h + 64128) * 2, 0, 0, h * 64128 * 2)),
    }
    per_kernel = lambda n, coefficients: tuple(n * c for c in coefficients)  # noqa: E731
    expected = {name: (n, per_kernel(n, f), per_kernel(n, b)) for name, (n, f, b) in expected.items()}
    # The two residual adds per layer are fused into the next norm: their FLOPs and bytes, no kernel of their own.
    expected["residual_add"] = (0, *expected["residual_add"][1:])
    terms = op_terms(llama8b, Parallel(tp=2))
    assert {t.name: (t.launches, t.flops[:5], t.bytes[:5]) for t in terms} == expected
    assert all(not any(t.flops[5:]) and not any(t.bytes[5:]) for t in terms)  # no sliding window, no experts


def _deepseek_with_q_lora():
    """DeepSeek-V2-Lite projects queries straight from the hidden state; V2 and V3 through a 1536 latent."""
    lite = load_model_shape("deepseek-v2-lite")
    return dataclasses.replace(lite, mla=dataclasses.replace(lite.mla, q_lora_rank=1536))


def _terms(tokens=0.0, seqs=0.0, const=0.0, experts=0.0):
    return (tokens, seqs, 0.0, 0.0, const, 0.0, 0.0, experts)


# (model, tp, operator): (kernels, FLOPs, bytes), per token, sequence, step or expert touched, bf16.
FAMILY_OPERATORS = {
    # MLA: one norm over the KV and query latents (512 + 1536) per layer, 27 layers.
    ("deepseek-q-lora", 1, "latent_norm"): (27, _terms(27 * 5 * 2048), _terms(27 * 2 * 2048 * 2, const=27 * 2048 * 2)),
    # MLA rotary: 16 heads' 64 rope dims of the query and one shared 64-dim rope key.
    ("deepseek-q-lora", 1, "rotary"): (27, _terms(27 * 6 * 1088), _terms(27 * 2 * 1088 * 2)),
    # Qwen3: RMSNorm of this chip's q and k heads ((32 + 4) x 128 / 2), 48 layers; the norm weights of 128.
    ("qwen3-30b-a3b", 2, "qk_norm"): (48, _terms(48 * 5 * 2304), _terms(48 * 2 * 2304 * 2, const=48 * 2 * 128 * 2)),
    # Gemma-2: soft-capping this chip's half of the 256000 logits of each sequence's last token.
    ("gemma-2-9b", 2, "logit_softcap"): (1, _terms(seqs=3 * 128000), _terms(seqs=2 * 128000 * 2)),
    # Mixtral: an expert's weights are read once per expert the step's tokens touch, not once per step.
    ("mixtral-8x7b", 1, "experts.gate_up_proj"): (
        32,
        _terms(32 * 2 * 2 * 4096 * 28672),
        _terms(32 * 2 * (4096 + 28672) * 2, experts=32 * 4096 * 28672 * 2),
    ),
    ("mixtral-8x7b", 1, "experts.down_proj"): (
        32,
        _terms(32 * 2 * 2 * 14336 * 4096),
        _terms(32 * 2 * (14336 + 4096) * 2, experts=32 * 14336 * 4096 * 2),
    ),
}


@pytest.mark.parametrize("key", FAMILY_OPERATORS, ids=lambda key: f"{key[0]}-tp{key[1]}-{key[2]}")
def test_operators_of_other_families_by_hand(key):
    name, tp, op = key
    model = _deepseek_with_q_lora() if name == "deepseek-q-lora" else load_model_shape(name)
    (term,) = [t for t in op_terms(model, Parallel(tp=tp)) if t.name == op]
    assert (term.launches, term.flops, term.bytes) == FAMILY_OPERATORS[key]


def test_collectives_of_two_tensor_and_two_pipeline_stages_by_hand(llama8b, maia100):
    """Two all-reduces per layer of the tokens' hidden states and one after the vocabulary-parallel
    embedding, the logits all-gather of the last tokens, and a send of the hidden states and the residual
    to each next stage (bf16: 2 bytes an element), on Maia 100's mesh: 5 us a hop, 150 GB/s between a pair
    of chips.

    100 tokens: hidden = 100 * 4096 * 2 = 819,200 B. An all-reduce over 2 chips: one-shot 5 us + 819,200 /
    150e9 = 10.461 us beats two-shot 2 * (5 us + 409,600 / 150e9) = 15.461 us; over 4, one-shot 10.461 us
    beats 2 * (5 us + 204,800 / 150e9) = 12.731 us. The logits of 3 sequences, 3 * 128,256 * 2 = 769,536 B,
    gathered directly: 5 us + 769,536 / p / 150e9. A send to the next stage, on the same node: 5 us +
    2 * 819,200 / 150e9.
    """
    one_shot, send = 5e-6 + 819_200 / 150e9, 5e-6 + 2 * 819_200 / 150e9
    gather = {p: 5e-6 + 769_536 / p / 150e9 for p in (2, 4)}
    tp2_pp2 = CostModel(maia100, llama8b, Parallel(tp=2, pp=2))
    assert tp2_pp2.comm_s(100, 3) == pytest.approx(65 * one_shot + gather[2] + send, rel=1e-12)
    assert CostModel(maia100, llama8b, Parallel(pp=4)).comm_s(100, 3) == pytest.approx(3 * send, rel=1e-12)
    assert CostModel(maia100, llama8b, Parallel(tp=4)).comm_s(100, 3) == pytest.approx(
        65 * one_shot + gather[4], rel=1e-12
    )


def test_the_engines_own_collectives_priced_one_by_one_are_the_formulas(llama8b, maia100):
    """The calls a live vLLM step makes at tp=2 x pp=2 (tests/e2e/test_collectives.py counts them on the demo
    model), as the communicator ships them: on stage 0, 16 layers' two all-reduces and the embedding's, and
    the send of the hidden states and residual; on stage 1, 16 layers' all-reduces and the logits'
    all-gather. Priced call by call, they come to the cost model's formula for the same step."""
    hidden, logits = 100 * 4096 * 2, 3 * 128_256 * 2
    rows = [(0, 2, hidden, 33, 0), (4, 2, 2 * hidden, 1, 0), (0, 2, hidden, 32, 0), (1, 2, logits, 1, 0)]
    model = CostModel(maia100, llama8b, Parallel(tp=2, pp=2))
    assert model.collectives_s(rows) == pytest.approx(model.comm_s(100, 3), rel=1e-12)
    # Stage 0's send leaves the node when each stage holds a node of 4 Maia 100s: priced at the scale-out tier.
    llama70b = load_model_shape("llama-3-70b")
    across = CostModel(maia100, llama70b, Parallel(tp=4, pp=2))
    send = (4, 4, 2 * 100 * 8192 * 2, 1, 0)
    assert across.collectives_s([send]) == pytest.approx(sum(across.hops_s(100)), rel=1e-12)
    assert across.collectives_s([send]) > CostModel(maia100, llama70b, Parallel(tp=2, pp=2)).collectives_s([send])


def test_a_decode_steps_flops_count_every_operator(llama8b, maia100, golden):
    """Two sequences decode a token each: all memory-bound, so only the FLOP count sees the compute side."""
    step = golden["decode"]
    cost = CostModel(maia100, llama8b).cost_of(step.new_tokens, step.context_lens)
    gemms = 32 * 2 * 4096 * (6144 + 4096 + 28672) + 32 * 2 * 14336 * 4096  # qkv, o, gate_up, down per token
    elementwise = 64 * 5 * 4096 + 32 * 6 * (4096 + 1024) + 32 * 5 * 14336 + 64 * 4096  # norms, rotary, SiLU, adds
    per_seq = 5 * 4096 + 2 * 4096 * 128256  # final norm and LM head, on each sequence's last token
    pairs = 2049 + 4097
    assert cost.flops == pytest.approx(2 * (gemms + elementwise) + 2 * per_seq + pairs * 32 * 4 * 32 * 128, rel=1e-12)
    assert cost.compute_s == 0.0


def test_attention_full_and_sliding_adds_up_over_the_sequences(maia100):
    """Gemma-2 alternates full and 4096-token sliding layers: a step's attention is its sequences' sum."""
    model = CostModel(maia100, load_model_shape("gemma-2-9b"))

    def attention(*pairs):
        ops = model.cost_of(*zip(*pairs), detail=True).ops
        return {o.name: (o.flops, o.bytes) for o in ops if o.name.startswith("attention")}

    one, other, both = attention((3, 5000)), attention((2, 7000)), attention((3, 5000), (2, 7000))
    assert set(both) == {"attention", "attention_sliding"}
    for name, (flops, nbytes) in both.items():
        assert flops == pytest.approx(one[name][0] + other[name][0], rel=1e-12)
        assert nbytes == pytest.approx(one[name][1] + other[name][1], rel=1e-12)


def test_a_step_without_tokens_costs_nothing(llama8b, maia100):
    assert CostModel(maia100, llama8b, Parallel(tp=2)).cost_of((), (), detail=True) == StepCost(
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ()
    )


def test_a_step_cost_reports_milliseconds_gflop_and_megabytes():
    """The figures `maia-serving simulate` prints."""
    cost = StepCost(compute_s=0.5, memory_s=0.25, comm_s=0.125, launch_s=0.0625, flops=3e9, bytes=5e6, ops=())
    assert cost.to_dict() == {
        "total_ms": 937.5,
        "compute_ms": 500.0,
        "memory_ms": 250.0,
        "comm_ms": 125.0,
        "launch_ms": 62.5,
        "bound": "compute",
        "GFLOP": 3.0,
        "MB": 5.0,
    }


def test_bad_step_shapes_are_refused():
    with pytest.raises(ValueError, match="context length"):
        StepShape.of([(5, 4)])
    with pytest.raises(ValueError, match=r"^need 0 < new tokens <= context length, got \(0, 4\)$"):
        StepShape.of([(0, 4)])
    with pytest.raises(ValueError, match="^new_tokens and context_lens must have one entry per sequence$"):
        StepShape((1, 1), (4,))


def test_roofline_picks_the_slower_side(maia100):
    op = roofline(maia100, "x", flops=0.8e15 * 0.6, nbytes=1.0)
    assert op.compute_s == pytest.approx(1.0) and op.bound == "compute"
    assert (op.name, op.flops, op.bytes, op.memory_s) == ("x", 0.8e15 * 0.6, 1.0, 1.0 / (1.8e12 * 0.75))
    assert op == roofline(maia100, "x", 0.8e15 * 0.6, 1.0, dtype="bf16")  # BF16 unless told otherwise


@functools.cache
def _cost_model(profile: str, model: str, tp: int, pp: int, kv_cache_dtype: str) -> CostModel:
    return CostModel(load_profile(profile), load_model_shape(model), Parallel(tp, pp), kv_cache_dtype)


def _sequences(max_len: int) -> st.SearchStrategy[tuple[int, int]]:
    """(new tokens, context length) with 1 <= new <= context."""
    return st.integers(1, max_len).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n)))


# A continuous-batching step: decodes (one new token each) and a few prefills or prefill chunks.
DECODES = st.integers(1, 8192).map(lambda n: (1, n))
PREFILLS = _sequences(8192)
SEQUENCES = st.one_of(DECODES, PREFILLS)
BATCHES = (
    st.tuples(st.lists(DECODES, max_size=16), st.lists(PREFILLS, max_size=2))
    .map(lambda parts: parts[0] + parts[1])
    .filter(bool)
)
STEPS = BATCHES.map(StepShape.of)
# (profile, model, tp, pp, KV cache dtype)
SETUPS = st.tuples(
    st.sampled_from(PROFILES),
    st.sampled_from(MODELS),
    st.sampled_from((1, 2, 4)),
    st.sampled_from((1, 2)),
    st.sampled_from(("auto", "fp8")),
)
# Regrouping the compute- and memory-bound operators' sums when one changes side can move a total by an ulp.
ROUNDING = 1e-12


@given(SETUPS, STEPS)
def test_cost_of_is_cost(setup, step):
    """What the engines call prices a step exactly as the checked API and the reports do."""
    model = _cost_model(*setup)
    assert model.cost_of(step.new_tokens, step.context_lens) == model.cost(step)
    assert model.cost_of(step.new_tokens, step.context_lens, detail=True) == model.cost(step, detail=True)


def _same_price(a: StepCost, b: StepCost) -> bool:
    fields = ("compute_s", "memory_s", "comm_s", "launch_s", "flops", "bytes")
    return (
        all(getattr(a, f) == pytest.approx(getattr(b, f), rel=ROUNDING) for f in fields)
        and a.stages == pytest.approx(b.stages, rel=ROUNDING)
        and a.hops == b.hops
    )


@given(SETUPS, STEPS)
def test_the_remembered_price_is_the_price_worked_out_in_full(setup, step):
    """Without ``detail`` the operators that read no context are priced once per (tokens, sequences), and the
    shared cost model keeps them across examples: every step must still cost what the full pass says."""
    model = _cost_model(*setup)
    assert _same_price(model.cost(step), model.cost(step, detail=True))


def test_a_longer_context_is_priced_anew_after_the_same_counts(maia100, llama8b):
    """Two decodes of the same two sequences at 100 and at 8,000 tokens of context: the second step reuses
    the GEMMs' price but not the attention's."""
    model = CostModel(maia100, llama8b)
    short, long = model.cost_of((1, 1), (100, 100)), model.cost_of((1, 1), (8000, 8000))
    assert long.memory_s > short.memory_s
    assert _same_price(long, model.cost_of((1, 1), (8000, 8000), detail=True))
    assert _same_price(short, model.cost_of((1, 1), (100, 100), detail=True))


@given(SETUPS, STEPS)
def test_total_is_the_sum_of_its_parts(setup, step):
    cost = _cost_model(*setup).cost(step, detail=True)
    assert cost.total_s == cost.compute_s + cost.memory_s + cost.comm_s + cost.launch_s
    assert cost.compute_s == pytest.approx(sum(o.compute_s for o in cost.ops if o.bound == "compute"), rel=ROUNDING)
    assert cost.memory_s == pytest.approx(sum(o.memory_s for o in cost.ops if o.bound == "memory"), rel=ROUNDING)
    assert cost.flops == pytest.approx(sum(o.flops for o in cost.ops), rel=ROUNDING)
    assert cost.bytes == pytest.approx(sum(o.bytes for o in cost.ops), rel=ROUNDING)
    assert (cost.comm_s > 0) == (setup[2:4] != (1, 1))


@given(SETUPS, STEPS, st.floats(1.0, 16.0))
def test_more_bandwidth_is_never_slower(setup, step, factor):
    name, model, tp, pp, kv_cache_dtype = setup
    profile = load_profile(name)
    faster = dataclasses.replace(
        profile,
        hbm_bandwidth_bytes_per_s=profile.hbm_bandwidth_bytes_per_s * factor,
        scale_up=dataclasses.replace(
            profile.scale_up,
            bandwidth_bytes_per_s=profile.scale_up.bandwidth_bytes_per_s * factor,
            pair_bandwidth_bytes_per_s=profile.scale_up.pair_bandwidth_bytes_per_s
            and profile.scale_up.pair_bandwidth_bytes_per_s * factor,
        ),
    )
    fast = CostModel(faster, load_model_shape(model), Parallel(tp, pp), kv_cache_dtype).cost(step)
    assert fast.total_s <= _cost_model(*setup).cost(step).total_s * (1 + ROUNDING)


@st.composite
def _step_and_a_bigger_one(draw: st.DrawFn) -> tuple[StepShape, StepShape]:
    """A step, and the same step with one more sequence, or with one sequence adding more tokens, or
    attending to a longer context."""
    pairs = draw(BATCHES)
    grow = draw(st.sampled_from(("sequence", "new tokens", "context")))
    if grow == "sequence":
        return StepShape.of(pairs), StepShape.of([*pairs, draw(SEQUENCES)])
    i = draw(st.integers(0, len(pairs) - 1))
    q, n = pairs[i]
    more = draw(st.integers(1, 1024))
    bigger = (q + more, n + more) if grow == "new tokens" else (q, n + more)
    return StepShape.of(pairs), StepShape.of([*pairs[:i], bigger, *pairs[i + 1 :]])


@given(SETUPS, _step_and_a_bigger_one())
def test_more_tokens_are_never_cheaper(setup, steps):
    small, big = steps
    model = _cost_model(*setup)
    assert model.cost(big).total_s >= model.cost(small).total_s * (1 - ROUNDING)


def _causal_pairs_by_brute_force(step: StepShape) -> int:
    """Count (query, key) positions with key <= query, the new tokens being the last of each context."""
    return sum(
        1
        for q, n in zip(step.new_tokens, step.context_lens)
        for query in range(n - q, n)
        for key in range(n)
        if key <= query
    )


@given(st.lists(_sequences(40), min_size=1, max_size=6).map(StepShape.of))
def test_attention_prices_every_causal_pair(step):
    """Attention FLOPs are 4 per head dimension per query-key pair: QK^T and PV, a multiply-add each."""
    model = _cost_model("maia100", "llama-3-8b", 1, 1, "auto")
    attention = next(
        o for o in model.cost_of(step.new_tokens, step.context_lens, detail=True).ops if o.name == "attention"
    )
    assert attention.flops == 32 * 4 * 32 * 128 * _causal_pairs_by_brute_force(step)


def test_causal_pairs_of_known_steps():
    assert _causal_pairs_by_brute_force(StepShape.of([(1, 10)])) == 10
    assert _causal_pairs_by_brute_force(StepShape.of([(4, 4)])) == 4 + 3 + 2 + 1
    assert _causal_pairs_by_brute_force(StepShape.of([(2, 6), (1, 3)])) == 5 + 6 + 3


@pytest.mark.parametrize("profile", ["maia100", "h100-sxm"])
@pytest.mark.parametrize("pp", [2, 3])  # 32 layers: 16 + 16, and vLLM's uneven 11 + 11 + 10
@pytest.mark.parametrize(
    "step", [[(1, 900)] * 16, [(300, 700), (1, 40)], [(1, 100)] * 1024], ids=["decode", "mixed", "compute-bound-head"]
)  # 1024 rows: the LM head is compute bound
def test_pipeline_stages_split_one_chips_work_without_adding_or_losing_any(llama8b, profile, pp, step):
    """Stages run their share of the layers, the first the embedding and the last the head: summed over
    the stages, compute, memory and the tensor-parallel collectives are one stage's, only the sends are new."""
    whole, split = (
        CostModel(load_profile(profile), llama8b, Parallel(tp=2, pp=p)).cost_of(*zip(*step)) for p in (1, pp)
    )
    assert len(split.stages) == pp and len(split.hops) == pp - 1
    assert split.compute_s == pytest.approx(whole.compute_s, rel=1e-12)
    assert split.memory_s == pytest.approx(whole.memory_s, rel=1e-12)
    assert split.comm_s - sum(split.hops) == pytest.approx(whole.comm_s, rel=1e-12)
    assert (split.flops, split.bytes) == pytest.approx((whole.flops, whole.bytes), rel=1e-12)


def test_the_remembered_prices_stay_bounded(maia100, llama8b, monkeypatch):
    """A live server meets new (tokens, sequences) counts for as long as it runs: past the bound a memo is
    forgotten whole, and the prices after it are the full pass's."""
    monkeypatch.setattr(cost_module, "_MEMO_ENTRIES", 2)
    model = CostModel(maia100, llama8b)
    for n in range(1, 6):
        step = ((1,) * n, (100,) * n)
        assert _same_price(model.cost_of(*step), model.cost_of(*step, detail=True))
        assert len(model._free_memo) <= 2 and len(model._comm_memo) <= 2

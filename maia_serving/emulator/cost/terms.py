"""Per-operator FLOP and byte terms of a forward pass: coefficients of a few step quantities.

An operator's FLOPs and bytes are linear in the step quantities of ``STEP_VARIABLES``, so a live
engine prices a step with a few multiplications per operator (model.py evaluates them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from maia_serving.emulator.cost.layout import SINGLE_CHIP, Parallel
from maia_serving.emulator.model_shape import Linear, ModelShape
from maia_serving.formats.precision import Precision


class Coefficients(NamedTuple):
    """An operator's FLOPs or bytes as coefficients of the eight step quantities it is linear in. The window
    quantities are those of sliding-window layers (pairs and context within the window); ``experts`` is the
    expected number of distinct experts of this chip that a layer's routed tokens touch
    (model_shape.MoE.experts_touched). A NamedTuple: the hot loop unpacks it as fast as a plain tuple."""

    tokens: float = 0.0
    seqs: float = 0.0
    attended_pairs: float = 0.0
    context_tokens: float = 0.0
    constant: float = 0.0
    window_pairs: float = 0.0
    window_context: float = 0.0
    experts: float = 0.0

    def scaled(self, factor: float) -> Coefficients:
        return Coefficients(*(factor * c for c in self))

    # Element-wise sum, not tuple concatenation: it takes only tuples of numbers, where tuple.__add__ takes any
    # tuple, so the override is narrower than its base's (unavoidable for a NamedTuple that adds up).
    def __add__(self, other: tuple[float, ...]) -> Coefficients:  # type: ignore[override]
        return Coefficients(*(x + y for x, y in zip(self, other)))

    def __sub__(self, other: Coefficients) -> Coefficients:
        return Coefficients(*(x - y for x, y in zip(self, other)))


STEP_VARIABLES = Coefficients._fields
# Soft-capping an attention score or a logit, cap * tanh(x / cap): a division, a tanh, a multiplication.
SOFTCAP_FLOPS = 3


@dataclass(frozen=True)
class OpTerms:
    name: str
    flops: Coefficients  # coefficients of STEP_VARIABLES
    bytes: Coefficients
    launches: int  # kernels per step
    peak: str = "bf16"  # the profile peak its FLOPs run at (precision.DType.peak)
    kind: str = "elementwise"  # "gemm", "attention" or "elementwise": which efficiency model prices it
    gemm_rows: Coefficients | None = None  # a GEMM's m over all its groups, per layer (not times layers)
    gemm_groups: Coefficients | None = None  # how many independent GEMMs share those rows (experts touched)
    gemm_n: float = 0.0  # a GEMM's output columns on this chip

    def gemm_shape(self) -> tuple[float, float, float, float]:
        """What a GEMM's efficiency model reads (model.CostModel): its rows per token and per sequence, its groups
        per expert touched (0: one group) and its columns; ValueError for a term that is no GEMM."""
        if self.gemm_rows is None or self.gemm_groups is None:
            raise ValueError(f"{self.name} is a {self.kind} term, not a GEMM: it has no GEMM shape")
        return self.gemm_rows.tokens, self.gemm_rows.seqs, self.gemm_groups.experts, self.gemm_n


def _lin(
    tokens: float = 0.0,
    seqs: float = 0.0,
    pairs: float = 0.0,
    context: float = 0.0,
    const: float = 0.0,
    window_pairs: float = 0.0,
    window_context: float = 0.0,
    experts: float = 0.0,
) -> Coefficients:
    return Coefficients(tokens, seqs, pairs, context, const, window_pairs, window_context, experts)


ONCE = _lin(const=1.0)
PER_TOKEN = _lin(tokens=1.0)


def _op(name: str, count: int, flops: Coefficients, nbytes: Coefficients, peak: str) -> OpTerms:
    return OpTerms(name, flops.scaled(count), nbytes.scaled(count), count, peak)


def _gemm(
    name: str, lin: Linear, prec: Precision, tp: int, rows: Coefficients, count: int, weights: Coefficients = ONCE
) -> OpTerms:
    """``[m, k] @ [k, n]`` of ``lin``'s shard on one chip of ``tp`` sharing it, m = ``rows``: reads the weight
    (``weights`` times: once, or once per expert touched) in its stored dtype and the input in its GEMM dtype,
    writes the output in the model's. Biases are left out (under 0.1% of any layer's bytes)."""
    k: float = lin.in_features
    n: float = lin.out_features
    if lin.split == "column":
        n /= tp
    elif lin.split == "row":
        k /= tp
    a_in = prec.activation(lin.group).bytes_per_element
    a_out = prec.model.bytes_per_element
    wgt = prec.weight(lin.group).bytes_per_element
    flops = rows.scaled(2 * k * n)
    nbytes = rows.scaled(k * a_in + n * a_out) + weights.scaled(k * n * wgt)
    return replace(
        _op(name, count, flops, nbytes, prec.gemm_peak(lin.group)),
        kind="gemm",
        gemm_rows=rows,
        gemm_groups=weights,
        gemm_n=n,
    )


def _attention_ops(model: ModelShape, prec: Precision, tp: int) -> list[OpTerms]:
    """Projections, rotary, attention over the cache (full and sliding layers), output projection.

    Attention reads each sequence's KV once at the cache format's stored size (paged, flash-style; a
    block-scaled format with its scales and padding, as memory.py counts it), or its last
    ``sliding_window`` tokens in a sliding layer, and writes the new tokens' KV. MLA runs absorbed, as vLLM
    runs its decode: attention over the latent (scores over latent + rope dims, values over the latent),
    kv_b_proj's up-projections applied per token as one GEMM.
    """
    layers, mla, act, peak = model.num_layers, model.mla, prec.model.bytes_per_element, prec.model.peak
    heads = model.num_heads / tp
    linears = {lin.name: lin for lin in model.linears() if lin.group == "attention"}
    ops = [_gemm(name, lin, prec, tp, PER_TOKEN, layers) for name, lin in linears.items() if name != "o_proj"]
    if mla:
        qk_dim, v_dim = mla.latent_size, mla.kv_lora_rank
        rotary = heads * mla.qk_rope_head_dim + mla.qk_rope_head_dim
        latent = mla.kv_lora_rank + mla.q_lora_rank
        ops.append(
            _op("latent_norm", layers, _lin(tokens=5 * latent), _lin(tokens=2 * latent * act, const=latent * act), peak)
        )
    else:
        qk_dim = v_dim = model.head_dim
        rotary = (model.q_size + model.num_kv_heads * model.head_dim) / tp
    if model.qk_norm:
        ops.append(
            _op("qk_norm", layers, _lin(tokens=5 * rotary), _lin(tokens=2 * rotary * act, const=2 * qk_dim * act), peak)
        )
    ops.append(_op("rotary", layers, _lin(tokens=6 * rotary), _lin(tokens=2 * rotary * act), peak))
    kv_token = model.kv_bytes_per_token_layer(tp, prec.kv_cache)
    per_pair = 2 * heads * (qk_dim + v_dim) + (SOFTCAP_FLOPS * heads if model.attn_logit_softcap else 0)
    io = kv_token + heads * (qk_dim + v_dim) * act
    sliding = model.num_sliding_layers
    if layers - sliding:
        ops.append(
            replace(
                _op("attention", layers - sliding, _lin(pairs=per_pair), _lin(tokens=io, context=kv_token), peak),
                kind="attention",
            )
        )
    if sliding:
        ops.append(
            replace(
                _op(
                    "attention_sliding",
                    sliding,
                    _lin(window_pairs=per_pair),
                    _lin(tokens=io, window_context=kv_token),
                    peak,
                ),
                kind="attention",
            )
        )
    ops.append(_gemm("o_proj", linears["o_proj"], prec, tp, PER_TOKEN, layers))
    return ops


def _mlp_ops(model: ModelShape, prec: Precision, parallel: Parallel) -> list[OpTerms]:
    """Dense MLPs, or a router, the routed experts and the shared experts.

    A routed GEMM has top_k rows per token and reads the weights of every expert its tokens touch:
    E (1 - (1 - k/E)^T) of them for T tokens. With data parallelism a MoE layer runs the tokens of every
    replica (``dp`` times this replica's, each replica assumed to run a batch of the same shape, as vLLM's
    replicas step together through the MoE layers): every one of them on this chip's slice of every
    expert, or under expert parallelism the ``1 / (tp dp)`` of them routed to this chip's whole experts.
    """
    act, peak, moe, tp = prec.model.bytes_per_element, prec.model.peak, model.moe, parallel.tp
    lin = {x.name: x for x in model.linears()}
    ops = []

    def mlp(
        prefix: str, width: float, layers: int, rows: Coefficients, weights: Coefficients = ONCE, shard: int = tp
    ) -> list[OpTerms]:
        width /= shard
        return [
            _gemm(f"{prefix}gate_up_proj", lin[f"{prefix}gate_up_proj"], prec, shard, rows, layers, weights),
            _op(f"{prefix}silu_and_mul", layers, rows.scaled(5 * width), rows.scaled(3 * width * act), peak),
            _gemm(f"{prefix}down_proj", lin[f"{prefix}down_proj"], prec, shard, rows, layers, weights),
        ]

    dense = model.num_layers - model.num_moe_layers
    if dense:
        ops += mlp("", model.intermediate_size, dense, PER_TOKEN)
    if moe:
        layers = model.num_moe_layers
        ops.append(_gemm("router", lin["router"], prec, tp, PER_TOKEN, layers))
        routed = moe.top_k * parallel.dp / (parallel.moe_ranks if parallel.ep else 1)
        ops += mlp(
            "experts.",
            moe.intermediate_size,
            layers,
            _lin(tokens=routed),
            _lin(experts=1.0),
            1 if parallel.ep else parallel.moe_ranks,
        )
        if moe.shared_intermediate_size:
            ops += mlp("shared_experts.", moe.shared_intermediate_size, layers, PER_TOKEN)
    return ops


FUSIONS = ("qkv_rotary", "gate_up_silu")


def check_fusions(fusions: Iterable[str]) -> frozenset[str]:
    fusions = frozenset(fusions)
    if unknown := sorted(fusions - set(FUSIONS)):
        raise ValueError(f"unknown fusion {', '.join(unknown)}; known: {', '.join(FUSIONS)}")
    return fusions


def _fused(ops: list[OpTerms], fusions: frozenset[str]) -> list[OpTerms]:
    """``ops`` with ``fusions`` applied (module docstring). SiLU-and-mul reads 2w and writes w a row, so a third
    of its bytes is the w its gate-up GEMM no longer writes twice over."""
    by_name = {t.name: i for i, t in enumerate(ops)}
    out = list(ops)
    if "qkv_rotary" in fusions:
        i = by_name["rotary"]
        out[i] = replace(out[i], bytes=_lin(), launches=0)
    if "gate_up_silu" in fusions:
        for name, i in by_name.items():
            if name.endswith("silu_and_mul"):
                gemm = by_name[name.replace("silu_and_mul", "gate_up_proj")]
                written = out[i].bytes.scaled(1 / 3)
                out[gemm] = replace(out[gemm], bytes=out[gemm].bytes - written)
                out[i] = replace(out[i], bytes=_lin(), launches=0)
    return out


def op_terms(
    model: ModelShape, parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto", fusions: Iterable[str] = ()
) -> tuple[OpTerms, ...]:
    """Per-operator FLOP and byte terms of one forward pass on one chip of ``tp``.

    Weights are read in their stored dtype (precision.py), GEMM inputs in their GEMM dtype, everything
    else in the model's; the LM head runs on the last token of each sequence only.
    """
    prec = model.precision(kv_cache_dtype)
    tp, layers, h = parallel.tp, model.num_layers, model.hidden_size
    act = wgt = prec.model.bytes_per_element
    peak = prec.model.peak
    vocab = model.vocab_size / tp
    lm_head = Linear("lm_head", "lm_head", h, model.vocab_size, 1, "column")
    ops = [
        _op(
            "rmsnorm", model.norms_per_layer * layers, _lin(tokens=5 * h), _lin(tokens=2 * h * act, const=h * wgt), peak
        )
    ]
    ops += _attention_ops(model, prec, tp)
    ops += _mlp_ops(model, prec, parallel)
    ops += [
        # Fused into the next RMSNorm (fused_add_rms_norm): its bytes and FLOPs, no kernel of its own.
        replace(_op("residual_add", 2 * layers, _lin(tokens=h), _lin(tokens=3 * h * act), peak), launches=0),
        _op("embedding", 1, _lin(), _lin(tokens=h * act), peak),
        _op("final_norm", 1, _lin(seqs=5 * h), _lin(seqs=2 * h * act, const=h * wgt), peak),
        _gemm("lm_head", lm_head, prec, tp, _lin(seqs=1.0), 1),
    ]
    if model.final_logit_softcap:
        ops.append(_op("logit_softcap", 1, _lin(seqs=SOFTCAP_FLOPS * vocab), _lin(seqs=2 * vocab * act), peak))
    return tuple(_fused(ops, check_fusions(fusions)))


def window_sum(lo: int, hi: int, window: int) -> int:
    """sum(min(v, window) for v in range(lo, hi + 1)), for 1 <= lo <= hi."""
    if hi <= window:
        return (lo + hi) * (hi - lo + 1) // 2
    if lo >= window:
        return window * (hi - lo + 1)
    return (lo + window) * (window - lo + 1) // 2 + window * (hi - window)

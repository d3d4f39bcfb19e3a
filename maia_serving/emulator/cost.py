"""Roofline cost of one engine step on the emulated device, with a small model per operator class.

Each operator costs ``max(flops / (peak * efficiency), bytes / (bw * memory_eff))``
(Williams, Waterman and Patterson, "Roofline", CACM 2009); operators run one after
another, so the step's time is the sum of the operator times plus the collectives.
``compute_s`` sums the compute-bound operators, ``memory_s`` the memory-bound ones,
``comm_s`` the collectives and ``launch_s`` what is neither (what keeps a tiny model's
step from costing nanoseconds): ``total_s`` is exactly their sum.

The efficiency is shape-aware where the profile gives the figures (hardware.py; a profile
without them gets the flat model: ``compute_efficiency`` everywhere, ``kernel_launch`` per
kernel and nothing else):

- GEMMs: ``compute_efficiency`` times the share of the tensor units' work that is useful
  (``gemm_utilization``): rows and columns padded to whole output tiles, and tiles run in
  waves over the compute units. A decode GEMM of 8 rows on a 64-row tile does 8x the work
  it needs, so it is not "at 70% of peak"; it stays memory-bound because its weights cost more.
- Attention: prefill at ``attention_compute_efficiency`` (flash kernels reach less of the
  peak than a GEMM); decode attention takes at least the time of its longest (sequence,
  KV head, KV split) work item on one compute unit (``attention_floor_s``): a small batch of
  short contexts cannot occupy every unit and streams its KV at a fraction of the bandwidth.
- Launches: every kernel costs ``kernel_launch`` on the device (fill, drain, the gap to the
  next). The host's time to launch kernels (``host_launch`` each, or one ``cuda_graphs``
  launch for a decode step the engines replay as a graph) overlaps the device's work and
  only shows when it is longer (``exposed_host_s``). The engines fuse each residual add
  into the next RMSNorm (vLLM's fused_add_rms_norm), so those are not kernels of their own.
- ``step_overhead``: the host's work per step that the device waits for (scheduling,
  preparing inputs, sampling), charged once per step, plus ``step_overhead_per_seq`` for each
  running sequence and ``step_overhead_per_token`` for each scheduled token where the profile has
  them (``host_step_s``; `calibrate-host --engine-model` fits all three on the live engine).
- Fusions beyond the residual add (``FUSIONS``, none by default: vLLM and SGLang run BF16 rotary and
  SiLU-and-mul as kernels of their own): ``qkv_rotary`` applies rotary inside the kernel that reads the
  QKV projection's output (TensorRT-LLM's attention op does), so rotary moves no bytes and launches no
  kernel; ``gate_up_silu`` applies SiLU-and-mul in the gate-up GEMM's epilogue, so the GEMM writes the
  width instead of twice it and the activation is no kernel of its own. Their FLOPs stay.

A step is a batch of sequences, each adding ``num_new_tokens`` to a context that then
holds ``context_len`` tokens: decode is ``(1, n)``, a prefill ``(n, n)``, a chunk of a
chunked prefill or a prefill after a prefix-cache hit ``(q, n)`` with ``q < n``.

Pipeline parallelism: stage ``k`` runs its share of the layers as vLLM splits them (``stage_layers``),
the embedding on the first stage and the final norm, LM head and logits all-gather on the last, with
its own tensor-parallel all-reduces, kernel launches and exposed host time; the host's per-step
overhead is charged once, to the first stage. Between stages each tensor-parallel rank sends the
hidden states to its counterpart in the next stage (over the scale-out tier where the stages sit on
different nodes; vLLM places ranks stage-major, ``rank = stage * tp + tp_rank``). A step's cost is one
batch through every stage: ``StepCost.stages`` and ``StepCost.hops`` are each stage's busy time and each
transfer, and ``total_s`` their sum, the batch's latency. How stages overlap different batches is the
simulator's business (simulate.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from maia_serving.emulator import interconnect
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import Linear, ModelShape
from maia_serving.emulator.precision import Precision
from maia_serving.emulator.routing import eplb_error, eplb_nodes, uniform_load


@dataclass(frozen=True)
class StepShape:
    """One step's batch: per sequence, tokens added and the context length after them.

    Plain tuples of ints rather than an object per sequence: the live engines build
    one of these every step, so it must cost microseconds.
    """

    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.new_tokens) != len(self.context_lens):
            raise ValueError("new_tokens and context_lens must have one entry per sequence")
        for q, n in zip(self.new_tokens, self.context_lens):
            if not 0 < q <= n:
                raise ValueError(f"need 0 < new tokens <= context length, got ({q}, {n})")

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]]) -> StepShape:
        """From ``(num_new_tokens, context_len)`` pairs."""
        pairs = list(pairs)
        return cls(tuple(q for q, _ in pairs), tuple(n for _, n in pairs))


# vLLM's --all2all-backend values the cost model prices: the default gathers every data-parallel rank's tokens
# and reduce-scatters the experts' outputs back; DeepEP's kernels send each token to its experts' ranks only,
# and serve expert parallelism only (without it the default's moves are priced).
ALL2ALL_BACKENDS = ("allgather_reducescatter", "deepep_high_throughput", "deepep_low_latency")


@dataclass(frozen=True)
class Parallel:
    """A layout as vLLM's flags give it: ``dp`` replicas (``--data-parallel-size``) of ``tp x pp`` chips, and
    with ``ep`` (``--enable-expert-parallel``) the routed experts spread whole over the ``tp * dp`` chips of a
    stage instead of each expert's width split over them; with ``eplb`` (``--enable-eplb``, its
    ``num_redundant_experts``; None: off) placed by vLLM's load balancer, with that many redundant experts,
    balanced once it has ``eplb_rearranged`` (its initial map before: ``routing.eplb_initial_placement``)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False
    all2all: str = "allgather_reducescatter"
    eplb: int | None = None
    eplb_rearranged: bool = True

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be at least 1, got tp={self.tp}, pp={self.pp}, dp={self.dp}")
        if self.eplb is not None and not self.ep:
            raise ValueError("EPLB balances experts under expert parallelism: add --enable-expert-parallel "
                             "(vLLM refuses --enable-eplb without it)")
        if self.all2all not in ALL2ALL_BACKENDS:
            raise ValueError(f"unknown all2all backend {self.all2all!r}; the cost model prices: "
                             f"{', '.join(ALL2ALL_BACKENDS)}")

    @property
    def chips(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def moe_ranks(self) -> int:
        """The chips one MoE layer's experts are split over: vLLM flattens the data-parallel replicas' tensor
        parallel ranks into one group (``FusedMoEParallelConfig``), the expert-parallel group under ``ep``."""
        return self.tp * self.dp

    @property
    def sequence_parallel_moe(self) -> bool:
        """vLLM's ``use_sequence_parallel_moe``: with experts spread over replicas of several tensor-parallel
        ranks, each rank sends only its share of the replica's tokens, and an all-gather over the tensor-parallel
        group takes the place of the MoE output's all-reduce."""
        return self.ep and self.tp > 1 and self.dp > 1


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers of each pipeline stage as vLLM splits them (``vllm.distributed.utils.get_pp_indices``): evenly,
    the remainder one each to the stages before the last, which also holds the LM head."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline parallel size {pp}: a model of {num_layers} layers takes 1 to {num_layers} "
                         f"stages (each stage needs a layer)")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return tuple(parts)


def crosses_node(stage: int, tp: int, node_chips: int) -> bool:
    """Whether stage ``stage`` sends to the next over the scale-out tier: some rank ``stage * tp + j`` and its
    counterpart ``(stage + 1) * tp + j`` sit on different nodes of ``node_chips``."""
    return any((stage * tp + j) // node_chips != ((stage + 1) * tp + j) // node_chips for j in range(tp))


SINGLE_CHIP = Parallel()


@dataclass(frozen=True)
class OpCost:
    name: str
    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class StepCost:
    compute_s: float
    memory_s: float
    comm_s: float
    launch_s: float
    flops: float
    bytes: float
    ops: tuple[OpCost, ...]
    # With pipeline stages (pp > 1): each stage's busy time and each send to the next stage, which sum to
    # total_s; empty on one stage, where the whole step is the stage.
    stages: tuple[float, ...] = ()
    hops: tuple[float, ...] = ()

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.comm_s + self.launch_s

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comm_s,
                 "launch": self.launch_s}
        return max(parts, key=parts.__getitem__)

    def to_dict(self) -> dict[str, float | str]:
        return {
            "total_ms": self.total_s * 1e3,
            "compute_ms": self.compute_s * 1e3,
            "memory_ms": self.memory_s * 1e3,
            "comm_ms": self.comm_s * 1e3,
            "launch_ms": self.launch_s * 1e3,
            "bound": self.bound,
            "GFLOP": self.flops / 1e9,
            "MB": self.bytes / 1e6,
        }


def roofline(profile: DeviceProfile, name: str, flops: float, nbytes: float, dtype: str = "bf16") -> OpCost:
    """One operator on the roofline of ``profile``."""
    return OpCost(
        name=name,
        flops=flops,
        bytes=nbytes,
        compute_s=flops / profile.effective_flops(dtype),
        memory_s=nbytes / profile.effective_bandwidth_bytes_per_s,
    )


# An operator's FLOPs and bytes are linear in eight step quantities; terms are the coefficients,
# so a live engine evaluates a step with a few multiplications. The window quantities are those of
# sliding-window layers (pairs and context within the window); "experts" is the expected number of
# distinct experts of this chip that a layer's routed tokens touch (model_shape.MoE.experts_touched).
STEP_VARIABLES = ("tokens", "seqs", "attended_pairs", "context_tokens", "constant", "window_pairs",
                  "window_context", "experts")
Coefficients = tuple[float, float, float, float, float, float, float, float]
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


def _lin(tokens: float = 0.0, seqs: float = 0.0, pairs: float = 0.0, context: float = 0.0, const: float = 0.0,
         window_pairs: float = 0.0, window_context: float = 0.0, experts: float = 0.0) -> Coefficients:
    return (tokens, seqs, pairs, context, const, window_pairs, window_context, experts)


ONCE = _lin(const=1.0)
PER_TOKEN = _lin(tokens=1.0)


def _add(a: Coefficients, b: Coefficients) -> Coefficients:
    return tuple(x + y for x, y in zip(a, b))


def _op(name: str, count: int, flops: Coefficients, nbytes: Coefficients, peak: str) -> OpTerms:
    return OpTerms(name, tuple(count * c for c in flops), tuple(count * c for c in nbytes), count, peak)


def _gemm(name: str, lin: Linear, prec: Precision, tp: int, rows: Coefficients, count: int,
          weights: Coefficients = ONCE) -> OpTerms:
    """``[m, k] @ [k, n]`` of ``lin``'s shard on one chip of ``tp`` sharing it, m = ``rows``: reads the weight
    (``weights`` times: once, or once per expert touched) in its stored dtype and the input in its GEMM dtype,
    writes the output in the model's. Biases are left out (under 0.1% of any layer's bytes)."""
    k, n = lin.in_features, lin.out_features
    if lin.split == "column":
        n /= tp
    elif lin.split == "row":
        k /= tp
    a_in = prec.activation(lin.group).bytes_per_element
    a_out = prec.model.bytes_per_element
    wgt = prec.weight(lin.group).bytes_per_element
    flops = tuple(2 * k * n * r for r in rows)
    nbytes = _add(tuple((k * a_in + n * a_out) * r for r in rows), tuple(k * n * wgt * w for w in weights))
    return replace(_op(name, count, flops, nbytes, prec.gemm_peak(lin.group)), kind="gemm", gemm_rows=rows,
                   gemm_groups=weights, gemm_n=n)


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
        ops.append(_op("latent_norm", layers, _lin(tokens=5 * latent),
                       _lin(tokens=2 * latent * act, const=latent * act), peak))
    else:
        qk_dim = v_dim = model.head_dim
        rotary = (model.q_size + model.num_kv_heads * model.head_dim) / tp
    if model.qk_norm:
        ops.append(_op("qk_norm", layers, _lin(tokens=5 * rotary),
                       _lin(tokens=2 * rotary * act, const=2 * qk_dim * act), peak))
    ops.append(_op("rotary", layers, _lin(tokens=6 * rotary), _lin(tokens=2 * rotary * act), peak))
    kv_token = model.kv_bytes_per_token_layer(tp, prec.kv_cache)
    per_pair = 2 * heads * (qk_dim + v_dim) + (SOFTCAP_FLOPS * heads if model.attn_logit_softcap else 0)
    io = kv_token + heads * (qk_dim + v_dim) * act
    sliding = model.num_sliding_layers
    if layers - sliding:
        ops.append(replace(_op("attention", layers - sliding, _lin(pairs=per_pair), _lin(tokens=io, context=kv_token),
                               peak), kind="attention"))
    if sliding:
        ops.append(replace(_op("attention_sliding", sliding, _lin(window_pairs=per_pair),
                               _lin(tokens=io, window_context=kv_token), peak), kind="attention"))
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

    def mlp(prefix: str, width: float, layers: int, rows: Coefficients, weights: Coefficients = ONCE,
            shard: int = tp) -> list[OpTerms]:
        width /= shard
        return [_gemm(f"{prefix}gate_up_proj", lin[f"{prefix}gate_up_proj"], prec, shard, rows, layers, weights),
                _op(f"{prefix}silu_and_mul", layers, tuple(5 * width * r for r in rows),
                    tuple(3 * width * act * r for r in rows), peak),
                _gemm(f"{prefix}down_proj", lin[f"{prefix}down_proj"], prec, shard, rows, layers, weights)]

    dense = model.num_layers - model.num_moe_layers
    if dense:
        ops += mlp("", model.intermediate_size, dense, PER_TOKEN)
    if moe:
        layers = model.num_moe_layers
        ops.append(_gemm("router", lin["router"], prec, tp, PER_TOKEN, layers))
        routed = moe.top_k * parallel.dp / (parallel.moe_ranks if parallel.ep else 1)
        ops += mlp("experts.", moe.intermediate_size, layers, _lin(tokens=routed), _lin(experts=1.0),
                   1 if parallel.ep else parallel.moe_ranks)
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
                written = tuple(b / 3 for b in out[i].bytes)
                out[gemm] = replace(out[gemm], bytes=tuple(b - w for b, w in zip(out[gemm].bytes, written)))
                out[i] = replace(out[i], bytes=_lin(), launches=0)
    return out


def op_terms(model: ModelShape, parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto",
             fusions: Iterable[str] = ()) -> tuple[OpTerms, ...]:
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
    ops = [_op("rmsnorm", model.norms_per_layer * layers, _lin(tokens=5 * h), _lin(tokens=2 * h * act, const=h * wgt),
               peak)]
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


def _window_sum(lo: int, hi: int, window: int) -> int:
    """sum(min(v, window) for v in range(lo, hi + 1)), for 1 <= lo <= hi."""
    if hi <= window:
        return (lo + hi) * (hi - lo + 1) // 2
    if lo >= window:
        return window * (hi - lo + 1)
    return (lo + window) * (window - lo + 1) // 2 + window * (hi - window)


def gemm_utilization(rows: float, cols: float, groups: float, tile_m: int, tile_n: int, units: int) -> float:
    """Share of the tensor units' work that is useful in ``groups`` GEMMs of ``rows / groups`` x ``cols`` outputs.

    Why: a GEMM kernel computes whole output tiles (a Hopper warpgroup MMA is 64 rows), so 8 decode rows
    cost as much compute as 64; and tiles run in waves over the compute units, so 133 tiles on 132 SMs
    take two waves. With fewer tiles than units, split-K / stream-K kernels spread the K dimension over
    the idle units, so a single partial wave costs nothing. 1.0 for shapes that fill whole waves.
    """
    if rows <= 0 or cols <= 0:
        return 1.0
    groups = max(groups, 1.0)
    tiles = groups * math.ceil(rows / groups / tile_m) * math.ceil(cols / tile_n)
    padding = rows * cols / (tiles * tile_m * tile_n)
    waves = 1.0 if tiles <= units else tiles / (math.ceil(tiles / units) * units)
    return padding * waves


def attention_floor_s(item_bytes: float, units: int, bytes_per_s: float) -> float:
    """The shortest time attention can take: its longest work item streamed by one unit at ``1 / units``
    of the bandwidth.

    Why: paged decode kernels (vLLM's paged attention v2, FlashInfer, FlashDecoding) give each (sequence,
    KV head, KV split) to one compute unit. A batch with fewer items than units leaves units idle, and its
    KV streams at a fraction of the bandwidth: eight sequences of 160 tokens with eight KV heads make 64
    items on an H100's 132 SMs and take about twice their bytes / bandwidth. Long contexts are split into
    ``attention_split`` tokens, so they fill the chip and the floor falls under bytes / bandwidth.
    A floor rather than a divisor, so that adding work never makes a step cheaper.
    """
    return item_bytes * units / bytes_per_s


def expert_imbalance(tokens: float, top_k: int, chips: int, experts_per_chip: float,
                     chip_shares: tuple[tuple[float, ...], ...] | None = None) -> float:
    """How many times the mean routed rows the busiest of ``chips`` expert-parallel chips runs, when ``tokens``
    tokens each pick ``top_k`` experts uniformly and every chip holds ``experts_per_chip`` of them.

    Why: under expert parallelism a MoE layer ends when its busiest chip has run its rows (the combine waits for
    every chip), and with few tokens the busiest chip runs several times the mean: one decode token's two experts
    sit on at most two of eight chips. A chip's rows are a sum of ``tokens * top_k`` draws, each its own with
    probability ``1 / chips`` (mean ``mu``, deviation ``sigma``); the largest of ``chips`` such sums is about
    ``mu + sigma sqrt(2 ln chips)`` (the Gaussian maximum), and no chip can run more than each token's
    ``min(top_k, experts_per_chip)`` rows. Uniform routing is the best case: real routers favour some experts.
    ``chip_shares`` (``routing.ExpertLoad.chip_shares``: per layer, each chip's share of the draws) prices a
    measured routing: each chip's sum has its own mean and deviation, the busiest is the largest of
    ``mu_c + sigma_c sqrt(2 ln chips)`` (an upper estimate where one chip is far the hottest), averaged over
    the layers. Without it every chip's share is ``1 / chips``.
    """
    if chips <= 1 or tokens <= 0:
        return 1.0
    draws, spread = tokens * top_k, math.sqrt(2 * math.log(chips))
    mean, cap = draws / chips, tokens * min(top_k, experts_per_chip)
    factors = [max(1.0, min(cap, max(draws * p + math.sqrt(draws * p * (1 - p)) * spread for p in layer)) / mean)
               for layer in (chip_shares or ((1.0 / chips,) * chips,))]
    return sum(factors) / len(factors)


def exposed_host_s(host_s: float, device_s: float) -> float:
    """The host's launch time the device waits for: max(0, host - device).

    Why: kernel launches are asynchronous, so the host issues the next kernels while the device runs the
    earlier ones; the device only idles when the host issues them slower than it runs them (small models,
    eager mode). CUDA graphs replace a step's launches by one, which is why engines capture decode steps.
    """
    return max(0.0, host_s - device_s)


# Operators outside the decoder layers, by the pipeline stage that runs them (1: the first, 2: the last);
# every other operator is a layer's and runs on every stage in proportion to its layers (0).
_EDGE_PLACE = {"embedding": 1, "final_norm": 2, "lm_head": 2, "logit_softcap": 2}


_T = TypeVar("_T")

# Entries a CostModel's memo holds before it forgets them all: a live server meets new (tokens, seqs) counts for
# as long as it runs, and the table must stay small (65,536 entries of a few floats each).
_MEMO_ENTRIES = 1 << 16


def _remember(memo: dict, key: object, value: _T) -> _T:
    """``memo[key] = value``, forgetting the whole memo first when it is full; returns ``value``."""
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


# Some terms' roofline summed for one step (CostModel._priced): compute, memory, FLOPs and bytes in total, and
# compute and memory per place (_EDGE_PLACE), which pipeline stages share out.
_Sum = tuple[float, float, float, float, list[float], list[float]]


class CostModel:
    """step_cost for one (profile, model, parallelism, KV dtype), with the terms
    worked out once: what a live engine calls every step."""

    def __init__(self, profile: DeviceProfile, model: ModelShape, parallel: Parallel = SINGLE_CHIP,
                 kv_cache_dtype: str = "auto", fusions: Iterable[str] = ()):
        self.profile = profile
        self.model = model
        self.parallel = parallel
        self.terms = op_terms(model, parallel, kv_cache_dtype, fusions)
        prec = model.precision(kv_cache_dtype)
        self._model_bytes = prec.model.bytes_per_element
        self._comm_bytes = prec.comm.bytes_per_element
        attention_eff = profile.attention_compute_efficiency or profile.compute_efficiency
        self._flops_per_s = tuple(profile.peak_flops(t.peak) * attention_eff if t.kind == "attention"
                                  else profile.effective_flops(t.peak) for t in self.terms)
        self._bytes_per_s = profile.effective_bandwidth_bytes_per_s
        self._window = model.sliding_window if model.num_sliding_layers else None
        self._gemm = profile.gemm
        self._split = profile.attention_split_tokens if profile.gemm else 0
        self._kv_heads = 1 if model.mla else math.ceil(model.num_kv_heads / parallel.tp)
        # Per term, what its efficiency model needs, flattened for the per-step loop: a GEMM's rows per token and
        # per sequence, its groups per expert touched (0: one group) and its columns; None for the others.
        self._gemm_shapes = tuple((t.gemm_rows[0], t.gemm_rows[1], t.gemm_groups[7], t.gemm_n)
                                  if self._gemm and t.kind == "gemm" else None for t in self.terms)
        self._net = profile.network
        self._places = tuple(_EDGE_PLACE.get(t.name, 0) for t in self.terms)
        self._kernels = tuple(sum(t.launches for t, p in zip(self.terms, self._places) if p == place)
                              for place in range(3))
        self._stage_layers = stage_layers(model.num_layers, parallel.pp)
        self._crosses = tuple(crosses_node(k, parallel.tp, self._net.node_chips) for k in range(parallel.pp - 1))
        # MoE under data parallelism: every replica's tokens reach this chip's experts (_mlp_ops), and the
        # chips per node of the two groups they travel in (vLLM's rank = (dp_rank * pp + stage) * tp + tp_rank).
        self._expert_ranks = parallel.moe_ranks if parallel.ep else 1
        # Under expert parallelism the routed experts' rows are the busiest chip's (expert_imbalance).
        self._routed = tuple(parallel.ep and model.moe is not None and parallel.moe_ranks > 1
                             and t.name.startswith("experts.") for t in self.terms)
        self._any_routed = any(self._routed)
        self._redundant = parallel.eplb
        if self._redundant is not None:
            if model.moe is None:
                raise ValueError(f"--enable-eplb balances routed experts; {model.name} has none (a dense model)")
            error = eplb_error(model.moe.num_experts, self._redundant, self._expert_ranks)
            if error:
                raise ValueError(error)
        # Under expert parallelism each chip's rows and reads follow its experts' share of the routing: the
        # measured load, or uniform routing (whose chips differ only where the experts do not divide evenly).
        self._load = model.moe.load if model.moe else None
        if self._any_routed:
            self._load = self._load or uniform_load(model.moe.num_experts, model.moe.top_k)
        # EPLB balances a grouped model per node first, over the nodes the whole deployment spans.
        nodes = eplb_nodes(parallel.chips, self._net.node_chips, self._expert_ranks)
        self._placement = (self._expert_ranks, self._redundant, parallel.eplb_rearranged,
                           model.moe.num_groups if model.moe else 1, nodes)
        self._chip_shares = self._load.chip_shares(*self._placement) if self._any_routed else None
        # Per term, what a step's loop reads, gathered once (the loop runs for every simulated step).
        self._loop = tuple(zip(self.terms, self._flops_per_s, self._gemm_shapes, self._places, self._routed,
                               (t.kind == "attention" for t in self.terms)))
        # Terms that read no context variable (pairs, context, window pairs, window context) and no attention
        # floor: their price is a function of (tokens, seqs) alone (_context_free).
        free = tuple(t.kind != "attention" and not any(c[i] for c in (t.flops, t.bytes) for i in (2, 3, 5, 6))
                     for t in self.terms)
        self._free_loop = tuple(item for item, f in zip(self._loop, free) if f)
        self._context_loop = tuple(item for item, f in zip(self._loop, free) if not f)
        self._free_memo: dict[tuple[int, int], _Sum] = {}
        self._busiest_memo: dict[int, float] = {}
        self._comm_memo: dict[tuple[int, int], tuple[float, float, float, tuple[float, ...]]] = {}
        replica, node = parallel.tp * parallel.pp, self._net.node_chips
        self._dp_per_node = max(1, node // replica)
        self._ep_per_node = min(parallel.tp, node) if replica >= node else node // replica * parallel.tp

    def _busiest_factor(self, tokens: int) -> float:
        """``expert_imbalance`` for this layout, remembered per token count: a simulation asks for the same
        counts many times, and a measured load (a sum over every layer's chips) costs a few hundred powers."""
        factor = self._busiest_memo.get(tokens)
        if factor is None:
            moe = self.model.moe
            per_chip = (moe.num_experts + (self._redundant or 0)) / self._expert_ranks
            factor = _remember(self._busiest_memo, tokens, expert_imbalance(
                tokens, moe.top_k, self._expert_ranks, per_chip, self._chip_shares))
        return factor

    def all_reduce_s(self, tokens: int) -> float:
        """One tensor-parallel all-reduce of the tokens' hidden states."""
        hidden = tokens * self.model.hidden_size * self._comm_bytes
        return interconnect.all_reduce(self._net, hidden, self.parallel.tp).time_s

    def logits_s(self, seqs: int) -> float:
        """The LM head's all-gather of the sequences' logits over the tensor-parallel group."""
        logits = seqs * self.model.vocab_size * self._model_bytes
        return interconnect.all_gather(self._net, logits, self.parallel.tp).time_s

    def moe_layer_s(self, tokens: int) -> float:
        """What one MoE layer adds to the tensor-parallel all-reduces with data parallelism: the dispatch of every
        replica's tokens to the experts and the combine of their outputs as ``--all2all-backend`` moves them
        (the default all-gathers the hidden states and router logits of every replica's tokens and
        reduce-scatters the outputs back; DeepEP sends each token's hidden state to its ``top_k`` experts' chips
        and back), and under sequence-parallel MoE the tensor-parallel all-gather that replaces the layer's
        all-reduce, less that all-reduce. 0 with one replica: vLLM then runs no all2all."""
        par, moe = self.parallel, self.model.moe
        if par.dp == 1 or moe is None:
            return 0.0
        net, hidden = self._net, self.model.hidden_size * self._comm_bytes
        sp = par.sequence_parallel_moe
        if par.all2all == "allgather_reducescatter" or not par.ep:
            group, per_node = (par.moe_ranks, self._ep_per_node) if sp else (par.dp, self._dp_per_node)
            gathered = par.dp * tokens * (hidden + moe.num_experts * self._model_bytes)
            moved = (interconnect.all_gather(net, gathered, group, per_node).time_s
                     + interconnect.reduce_scatter(net, par.dp * tokens * hidden, group, per_node).time_s)
        else:
            sent = tokens / par.tp * moe.top_k * hidden
            moved = 2 * interconnect.all_to_all(net, sent, par.moe_ranks, self._ep_per_node).time_s
        if sp:
            moved += interconnect.all_gather(net, tokens * hidden, par.tp).time_s - self.all_reduce_s(tokens)
        return moved

    def hops_s(self, tokens: int) -> tuple[float, ...]:
        """Each stage's send to the next (each rank to its counterpart, all at once): the hidden states
        and the residual stream, the two tensors vLLM's decoder models hand between stages."""
        hidden = 2 * tokens * self.model.hidden_size * self._comm_bytes
        return tuple(interconnect.send_recv_s(self._net, hidden, across) for across in self._crosses)

    def collectives_s(self, rows: Iterable[tuple[int, int, int, int, int]]) -> float:
        """The collectives an engine step performed, each priced for its own bytes and group (rows as
        ``maia_serving.serving.collectives`` ships them: op index, group, bytes, count, sending stage)."""
        ops, net, tp, chips = interconnect.COLLECTIVE_OPS, self._net, self.parallel.tp, self._net.node_chips
        return sum(count * interconnect.collective(net, ops[op], nbytes, group,
                                                   ops[op] == "send" and crosses_node(stage, tp, chips)).time_s
                   for op, group, nbytes, count, stage in rows)

    def _comm_parts(self, tokens: int, seqs: int) -> tuple[float, float, float, tuple[float, ...]]:
        """One tensor-parallel all-reduce, the logits all-gather, one MoE layer's dispatch and combine, and each
        stage's hop for a step, remembered per (tokens, seqs): a simulation asks for the same counts many times."""
        parts = self._comm_memo.get((tokens, seqs))
        if parts is None:
            parts = _remember(self._comm_memo, (tokens, seqs), (self.all_reduce_s(tokens), self.logits_s(seqs),
                                                                self.moe_layer_s(tokens), self.hops_s(tokens)))
        return parts

    def comm_s(self, tokens: int, seqs: int) -> float:
        """Tensor-parallel all-reduces (two per layer, and the vocabulary-parallel embedding's) and the
        logits all-gather; one send/recv between consecutive pipeline stages; each MoE layer's dispatch and
        combine across data-parallel replicas. The counts are those a live vLLM step performs
        (tests/e2e/test_collectives.py)."""
        all_reduce, logits, moe, hops = self._comm_parts(tokens, seqs)
        comm = (2 * self.model.num_layers + 1) * all_reduce + logits
        return comm + (self.model.num_moe_layers * moe + sum(hops))

    def host_step_s(self, tokens: int, seqs: int) -> float:
        """The host's own time in a step of ``seqs`` sequences and ``tokens`` tokens, which the device waits on:
        the engine's scheduling, input preparation, sampling and output processing."""
        p = self.profile
        return p.step_overhead_s + p.step_overhead_per_seq_s * seqs + p.step_overhead_per_token_s * tokens

    def _launch_s(self, compute_s: float, memory_s: float, comm_s: float, kernels: float, host_s: float,
                  decode_graph: bool) -> float:
        """Launch time of a stage (or a whole step) of ``kernels`` kernels: on the device, the host's step
        overhead ``host_s`` (all of it on the first stage, none elsewhere), and the host's launch time where it
        outlasts the device's work."""
        device_launch = self.profile.kernel_launch_s * kernels
        launch = device_launch + host_s
        graph = self.profile.graph
        host = graph.launch_s if decode_graph else self.profile.host_launch_s * kernels
        if host:
            launch += exposed_host_s(host, compute_s + memory_s + comm_s + device_launch)
        return launch

    def _staged(self, tokens: int, seqs: int, compute: list[float], memory: list[float], flops: float,
                nbytes: float, decode_graph: bool) -> StepCost:
        """A pipelined step's cost from the per-place sums: each stage's share of the layers (the first also
        runs the embedding and waits on the host, the last the LM head), the sums over stages, each stage's
        total and the hops between them."""
        layers, last, kernels = self.model.num_layers, self.parallel.pp - 1, self._kernels
        all_reduce, logits, moe_layer, hops = self._comm_parts(tokens, seqs)
        moe = self.model.num_moe_layers / layers * moe_layer  # per layer of a stage
        host = self.host_step_s(tokens, seqs)
        totals = []
        compute_s = memory_s = comm_s = launch_s = 0.0
        for k, count in enumerate(self._stage_layers):
            share, first, is_last = count / layers, k == 0, k == last
            c = share * compute[0] + first * compute[1] + is_last * compute[2]
            m = share * memory[0] + first * memory[1] + is_last * memory[2]
            comm = (2 * count + first) * all_reduce + count * moe + is_last * logits
            n = share * kernels[0] + first * kernels[1] + is_last * kernels[2]
            launch = self._launch_s(c, m, comm, n, first * host, decode_graph)
            compute_s += c
            memory_s += m
            comm_s += comm
            launch_s += launch
            totals.append(c + m + comm + launch)
        return StepCost(compute_s, memory_s, comm_s + sum(hops), launch_s, flops, nbytes, (),
                        stages=tuple(totals), hops=hops)

    def cost(self, step: StepShape, detail: bool = False) -> StepCost:
        """The cost of a checked step; ``detail`` also lists each operator (slower: for reports)."""
        return self.cost_of(step.new_tokens, step.context_lens, detail)

    def _routing(self, tokens: int) -> tuple[float, float]:
        """(routed rows, experts touched) of a step of ``tokens`` tokens: the busiest expert chip's rows under
        expert parallelism (else the tokens), and the experts one chip reads (0 for a dense model)."""
        moe = self.model.moe
        experts = 0.0
        if self._chip_shares is not None:  # under EP: the chip that reads the most
            experts = self._load.busiest_chip_touched(tokens * self.parallel.dp, *self._placement)
        elif moe:
            experts = moe.experts_touched(tokens * self.parallel.dp) / self._expert_ranks
        busiest = tokens * self._busiest_factor(tokens * self.parallel.dp) if self._any_routed else tokens
        return busiest, experts

    def _priced(self, loop: tuple, tokens: int, seqs: int, routing: tuple[float, float], pairs: int = 0,
                ctx: int = 0, wpairs: int = 0, wctx: int = 0, longest: int = 0,
                ops: list[OpCost] | None = None) -> _Sum:
        """The summed roofline of ``loop``'s terms (each bound by its larger side) for one step's variables
        (``routing``: ``_routing(tokens)``); ``ops``, when given, gets each operator's cost."""
        busiest, experts = routing
        gemm, split, window = self._gemm, self._split, self._window
        tile_m, tile_n, units = (gemm.tile_m, gemm.tile_n, gemm.units) if gemm else (0, 0, 0)
        bytes_per_s = self._bytes_per_s
        # Tokens of KV the longest attention work item streams, in full and in sliding-window layers.
        item_tokens = min(longest, split)
        window_item_tokens = min(longest, split, window or longest)
        compute = memory = flops = nbytes = 0.0
        placed_compute, placed_memory = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        for term, flops_per_s, shape, place, routed, attention in loop:
            ft, fs, fp, fc, f1, fwp, fwc, fe = term.flops
            bt, bs, bp, bc, b1, bwp, bwc, be = term.bytes
            rows = busiest if routed else tokens
            f = ft * rows + fs * seqs + fp * pairs + fc * ctx + f1 + fwp * wpairs + fwc * wctx + fe * experts
            b = bt * rows + bs * seqs + bp * pairs + bc * ctx + b1 + bwp * wpairs + bwc * wctx + be * experts
            compute_s, memory_s = f / flops_per_s, b / bytes_per_s
            if shape:
                per_token, per_seq, per_expert, cols = shape
                groups = per_expert * experts if per_expert else 1.0
                compute_s /= gemm_utilization(per_token * rows + per_seq * seqs, cols, groups, tile_m, tile_n, units)
            elif split and attention:
                # bc / bwc: KV bytes per context token over this term's layers; one item holds one KV head.
                item_bytes = (bc * item_tokens + bwc * window_item_tokens) / self._kv_heads
                memory_s = max(memory_s, attention_floor_s(item_bytes, units, bytes_per_s))
            if compute_s >= memory_s:
                compute += compute_s
                placed_compute[place] += compute_s
            else:
                memory += memory_s
                placed_memory[place] += memory_s
            flops += f
            nbytes += b
            if ops is not None:
                ops.append(OpCost(term.name, f, b, compute_s, memory_s))
        return compute, memory, flops, nbytes, placed_compute, placed_memory

    def _context_free(self, tokens: int, seqs: int, routing: tuple[float, float]) -> _Sum:
        """The terms that do not read the contexts (GEMMs, norms, activations), remembered per (tokens, seqs):
        a simulation's steps repeat those counts while their contexts grow, so only attention is priced anew."""
        part = self._free_memo.get((tokens, seqs))
        if part is None:
            part = _remember(self._free_memo, (tokens, seqs), self._priced(self._free_loop, tokens, seqs, routing))
        return part

    def cost_of(self, new_tokens: tuple[int, ...], context_lens: tuple[int, ...], detail: bool = False) -> StepCost:
        """The one implementation of a step's cost; a live engine calls it every step with a shape
        trusted to be well formed, so it makes one pass and no checks (cost() checks first)."""
        tokens = pairs = ctx = wpairs = wctx = longest = 0
        window = self._window
        for q, n in zip(new_tokens, context_lens):
            tokens += q
            ctx += n
            # Causal: the new tokens hold positions n-q .. n-1 and each attends to itself and all before it.
            pairs += q * n - q * (q - 1) // 2
            if window:
                wpairs += _window_sum(n - q + 1, n, window)
                wctx += min(n, window)
            if n > longest:
                longest = n
        if tokens == 0:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ())
        seqs = len(new_tokens)
        ops: list[OpCost] = []
        routing = self._routing(tokens)
        if detail:  # every operator in the model's order, none remembered
            compute, memory, flops, nbytes, placed_compute, placed_memory = self._priced(
                self._loop, tokens, seqs, routing, pairs, ctx, wpairs, wctx, longest, ops)
        else:
            compute, memory, flops, nbytes, free_compute, free_memory = self._context_free(tokens, seqs, routing)
            c, m, f, b, placed_compute, placed_memory = self._priced(
                self._context_loop, tokens, seqs, routing, pairs, ctx, wpairs, wctx, longest)
            compute, memory, flops, nbytes = compute + c, memory + m, flops + f, nbytes + b
            for place in range(3):
                placed_compute[place] += free_compute[place]
                placed_memory[place] += free_memory[place]
        graph = self.profile.graph
        decode_graph = bool(graph and tokens == seqs <= graph.max_batch)
        if self.parallel.pp == 1:
            comm = self.comm_s(tokens, seqs)
            launch = self._launch_s(compute, memory, comm, sum(self._kernels), self.host_step_s(tokens, seqs),
                                    decode_graph)
            return StepCost(compute, memory, comm, launch, flops, nbytes, tuple(ops))
        staged = self._staged(tokens, seqs, placed_compute, placed_memory, flops, nbytes, decode_graph)
        return replace(staged, ops=tuple(ops)) if ops else staged


def step_cost(profile: DeviceProfile, model: ModelShape, step: StepShape,
              parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto") -> StepCost:
    """Emulated time of one forward pass of ``step`` on ``tp * pp`` chips of ``profile``,
    with the per-operator breakdown."""
    return CostModel(profile, model, parallel, kv_cache_dtype).cost(step, detail=True)

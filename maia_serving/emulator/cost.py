"""Roofline cost of one engine step on the emulated device.

Each operator costs ``max(flops / (peak * compute_eff), bytes / (bw * memory_eff))``
(Williams, Waterman and Patterson, "Roofline", CACM 2009); operators run one after
another, so the step's time is the sum of the operator times plus the collectives.
``compute_s`` sums the compute-bound operators, ``memory_s`` the memory-bound ones,
``comm_s`` the collectives and ``launch_s`` a fixed launch cost per kernel (what
keeps a tiny model's step from costing nanoseconds): ``total_s`` is exactly their sum.

A step is a batch of sequences, each adding ``num_new_tokens`` to a context that then
holds ``context_len`` tokens: decode is ``(1, n)``, a prefill ``(n, n)``, a chunk of a
chunked prefill or a prefill after a prefix-cache hit ``(q, n)`` with ``q < n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from maia_serving.emulator import interconnect
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import ModelShape, kv_cache_bytes_per_element


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


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1


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


# An operator's FLOPs and bytes are linear in five step quantities; terms are the
# coefficients, so a live engine evaluates a step with a few multiplications.
STEP_VARIABLES = ("tokens", "seqs", "attended_pairs", "context_tokens", "constant")


@dataclass(frozen=True)
class OpTerms:
    name: str
    flops: tuple[float, float, float, float, float]  # coefficients of STEP_VARIABLES
    bytes: tuple[float, float, float, float, float]
    launches: int  # kernels per step


def _lin(tokens: float = 0.0, seqs: float = 0.0, pairs: float = 0.0, context: float = 0.0,
         const: float = 0.0) -> tuple[float, float, float, float, float]:
    return (tokens, seqs, pairs, context, const)


def _op(name: str, count: int, flops: tuple, nbytes: tuple) -> OpTerms:
    return OpTerms(name, tuple(count * c for c in flops), tuple(count * c for c in nbytes), count)


def _gemm(name: str, per_seq: bool, k: float, n: float, act: float, wgt: float, count: int) -> OpTerms:
    """``[m, k] @ [k, n]`` with m tokens (or sequences): reads the weight and the input,
    writes the output."""
    rows = _lin(seqs=1.0) if per_seq else _lin(tokens=1.0)
    flops = tuple(2 * k * n * r for r in rows)
    nbytes = tuple((k + n) * act * r for r in rows)
    nbytes = nbytes[:4] + (k * n * wgt,)
    return _op(name, count, flops, nbytes)


def op_terms(model: ModelShape, parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto") -> tuple[OpTerms, ...]:
    """Per-operator FLOP and byte terms of one forward pass on one chip of ``tp``.

    Attention reads each sequence's KV once at the cache dtype's size (paged,
    flash-style) and writes the new tokens' KV; the LM head runs on the last token
    of each sequence only.
    """
    tp, layers = parallel.tp, model.num_layers
    act = wgt = model.dtype_bytes
    h, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    heads, hd = model.num_heads / tp, model.head_dim
    kv_token = 2 * math.ceil(model.num_kv_heads / tp) * hd * kv_cache_bytes_per_element(kv_cache_dtype, model.dtype)
    return (
        _op("rmsnorm", 2 * layers, _lin(tokens=5 * h), _lin(tokens=2 * h * act, const=h * wgt)),
        _gemm("qkv_proj", False, h, (q + 2 * kv) / tp, act, wgt, layers),
        _op("rotary", layers, _lin(tokens=6 * (q + kv) / tp), _lin(tokens=2 * (q + kv) / tp * act)),
        _op("attention", layers, _lin(pairs=4 * heads * hd),
            _lin(tokens=kv_token + 2 * heads * hd * act, context=kv_token)),
        _gemm("o_proj", False, q / tp, h, act, wgt, layers),
        _gemm("gate_up_proj", False, h, 2 * inter / tp, act, wgt, layers),
        _op("silu_and_mul", layers, _lin(tokens=5 * inter / tp), _lin(tokens=3 * inter / tp * act)),
        _gemm("down_proj", False, inter / tp, h, act, wgt, layers),
        _op("residual_add", 2 * layers, _lin(tokens=h), _lin(tokens=3 * h * act)),
        _op("embedding", 1, _lin(), _lin(tokens=h * act)),
        _op("final_norm", 1, _lin(seqs=5 * h), _lin(seqs=2 * h * act, const=h * wgt)),
        _gemm("lm_head", True, h, model.vocab_size / tp, act, wgt, 1),
    )


_COMPUTE_DTYPE = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
                  "float32": "fp32", "fp32": "fp32", "float": "fp32"}


class CostModel:
    """step_cost for one (profile, model, parallelism, KV dtype), with the terms
    worked out once: what a live engine calls every step."""

    def __init__(self, profile: DeviceProfile, model: ModelShape, parallel: Parallel = SINGLE_CHIP,
                 kv_cache_dtype: str = "auto"):
        self.profile = profile
        self.model = model
        self.parallel = parallel
        self.terms = op_terms(model, parallel, kv_cache_dtype)
        self._flops_per_s = profile.effective_flops(_COMPUTE_DTYPE.get(model.dtype.removeprefix("torch."), "bf16"))
        self._bytes_per_s = profile.effective_bandwidth_bytes_per_s
        self._launch_s = profile.kernel_launch_s * sum(t.launches for t in self.terms)

    def comm_s(self, tokens: int, seqs: int) -> float:
        """Tensor-parallel all-reduces (two per layer) and the logits all-gather; one
        send/recv of the hidden states between consecutive pipeline stages."""
        tp, pp = self.parallel.tp, self.parallel.pp
        link, model = self.profile.scale_up, self.model
        hidden = tokens * model.hidden_size * model.dtype_bytes
        comm = 0.0
        if tp > 1:
            comm += 2 * model.num_layers * interconnect.all_reduce_s(link, hidden, tp)
            comm += interconnect.all_gather_s(link, seqs * model.vocab_size * model.dtype_bytes, tp)
        if pp > 1:
            comm += (pp - 1) * interconnect.send_recv_s(link, hidden)
        return comm

    def cost(self, step: StepShape, detail: bool = False) -> StepCost:
        """The cost of a checked step; ``detail`` also lists each operator (slower: for reports)."""
        return self.cost_of(step.new_tokens, step.context_lens, detail)

    def cost_of(self, new_tokens: tuple[int, ...], context_lens: tuple[int, ...], detail: bool = False) -> StepCost:
        """The one implementation of a step's cost; a live engine calls it every step with a shape
        trusted to be well formed, so it makes one pass and no checks (cost() checks first)."""
        tokens = pairs = ctx = 0
        for q, n in zip(new_tokens, context_lens):
            tokens += q
            ctx += n
            # Causal: the new tokens hold positions n-q .. n-1 and each attends to itself and all before it.
            pairs += q * n - q * (q - 1) // 2
        if tokens == 0:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ())
        seqs = len(new_tokens)
        compute = memory = flops = nbytes = 0.0
        ops = []
        for term in self.terms:
            ft, fs, fp, fc, f1 = term.flops
            bt, bs, bp, bc, b1 = term.bytes
            f = ft * tokens + fs * seqs + fp * pairs + fc * ctx + f1
            b = bt * tokens + bs * seqs + bp * pairs + bc * ctx + b1
            compute_s, memory_s = f / self._flops_per_s, b / self._bytes_per_s
            if compute_s >= memory_s:
                compute += compute_s
            else:
                memory += memory_s
            flops += f
            nbytes += b
            if detail:
                ops.append(OpCost(term.name, f, b, compute_s, memory_s))
        return StepCost(compute, memory, self.comm_s(tokens, seqs), self._launch_s, flops, nbytes, tuple(ops))


def step_cost(profile: DeviceProfile, model: ModelShape, step: StepShape,
              parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto") -> StepCost:
    """Emulated time of one forward pass of ``step`` on ``tp * pp`` chips of ``profile``,
    with the per-operator breakdown."""
    return CostModel(profile, model, parallel, kv_cache_dtype).cost(step, detail=True)

"""Roofline cost of one engine step on the emulated device.

Each operator costs ``max(flops / (peak * compute_eff), bytes / (bw * memory_eff))``
(Williams, Waterman and Patterson, "Roofline", CACM 2009); operators run one after
another, so the step's time is the sum of the operator times plus the collectives.
``compute_s`` sums the compute-bound operators, ``memory_s`` the memory-bound ones
and ``comm_s`` the collectives: ``total_s`` is exactly their sum.

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

    @property
    def num_seqs(self) -> int:
        return len(self.new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.new_tokens)

    def attended_pairs(self) -> int:
        """Query-key pairs under a causal mask when the new tokens end each context."""
        return sum(q * n - q * (q - 1) // 2 for q, n in zip(self.new_tokens, self.context_lens))


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1


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
    flops: float
    bytes: float
    ops: tuple[OpCost, ...]

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.comm_s

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comm_s}
        return max(parts, key=parts.__getitem__)

    def to_dict(self) -> dict[str, float | str]:
        return {
            "total_ms": self.total_s * 1e3,
            "compute_ms": self.compute_s * 1e3,
            "memory_ms": self.memory_s * 1e3,
            "comm_ms": self.comm_s * 1e3,
            "bound": self.bound,
            "GFLOP": self.flops / 1e9,
            "MB": self.bytes / 1e6,
        }


def roofline(profile: DeviceProfile, name: str, flops: float, nbytes: float, dtype: str = "bf16",
             count: int = 1) -> OpCost:
    """One operator (``count`` times) on the roofline of ``profile``."""
    return OpCost(
        name=name,
        flops=flops * count,
        bytes=nbytes * count,
        compute_s=count * flops / profile.effective_flops(dtype),
        memory_s=count * nbytes / profile.effective_bandwidth_bytes_per_s,
    )


def _gemm(profile: DeviceProfile, name: str, tokens: int, k: float, n: float, act: float, wgt: float,
          count: int) -> OpCost:
    """``[tokens, k] @ [k, n]``: reads the weight and the input, writes the output."""
    return roofline(profile, name, 2 * tokens * k * n, k * n * wgt + tokens * (k + n) * act,
                    count=count)


def _attention(profile: DeviceProfile, model: ModelShape, step: StepShape, tp: int, kv_elem: float,
               layers: int) -> OpCost:
    """Attention over the paged cache: reads each sequence's KV once at the cache dtype."""
    heads = model.num_heads / tp
    kv_heads = math.ceil(model.num_kv_heads / tp)
    act = model.dtype_bytes
    pairs = step.attended_pairs()
    ctx = sum(step.context_lens)
    tokens = step.num_tokens
    flops = 4 * heads * model.head_dim * pairs
    kv_token = 2 * kv_heads * model.head_dim * kv_elem
    nbytes = ctx * kv_token + tokens * kv_token + 2 * tokens * heads * model.head_dim * act
    return roofline(profile, "attention", flops, nbytes, count=layers)


def step_cost(profile: DeviceProfile, model: ModelShape, step: StepShape,
              parallel: Parallel = Parallel(), kv_cache_dtype: str = "auto") -> StepCost:
    """Emulated time of one forward pass of ``step`` on ``tp * pp`` chips of ``profile``."""
    tp, pp = parallel.tp, parallel.pp
    tokens = step.num_tokens
    if tokens == 0:
        return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, ())
    layers = model.num_layers
    act = wgt = model.dtype_bytes
    h, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    kv_elem = kv_cache_bytes_per_element(kv_cache_dtype, model.dtype)
    seqs = step.num_seqs
    ops = [
        roofline(profile, "rmsnorm", 5 * tokens * h, 2 * tokens * h * act + h * wgt, count=2 * layers),
        _gemm(profile, "qkv_proj", tokens, h, (q + 2 * kv) / tp, act, wgt, layers),
        roofline(profile, "rotary", 6 * tokens * (q + kv) / tp, 2 * tokens * (q + kv) / tp * act,
                 count=layers),
        _attention(profile, model, step, tp, kv_elem, layers),
        _gemm(profile, "o_proj", tokens, q / tp, h, act, wgt, layers),
        _gemm(profile, "gate_up_proj", tokens, h, 2 * inter / tp, act, wgt, layers),
        roofline(profile, "silu_and_mul", 5 * tokens * inter / tp, 3 * tokens * inter / tp * act,
                 count=layers),
        _gemm(profile, "down_proj", tokens, inter / tp, h, act, wgt, layers),
        roofline(profile, "residual_add", tokens * h, 3 * tokens * h * act, count=2 * layers),
        roofline(profile, "embedding", 0, tokens * h * act),
        roofline(profile, "final_norm", 5 * seqs * h, 2 * seqs * h * act + h * wgt),
        _gemm(profile, "lm_head", seqs, h, model.vocab_size / tp, act, wgt, 1),
    ]
    link = profile.scale_up
    comm = 0.0
    if tp > 1:
        comm += 2 * layers * interconnect.all_reduce_s(link, tokens * h * act, tp)
        comm += interconnect.all_gather_s(link, seqs * model.vocab_size * act, tp)
    if pp > 1:
        comm += (pp - 1) * interconnect.send_recv_s(link, tokens * h * act)
    compute = sum(op.time_s for op in ops if op.bound == "compute")
    memory = sum(op.time_s for op in ops if op.bound == "memory")
    return StepCost(
        compute_s=compute,
        memory_s=memory,
        comm_s=comm,
        flops=sum(op.flops for op in ops),
        bytes=sum(op.bytes for op in ops),
        ops=tuple(ops),
    )

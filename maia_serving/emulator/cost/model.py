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

from maia_serving.emulator.cost import interconnect
from maia_serving.emulator.cost.efficiency import (
    attention_floor_s,
    expert_imbalance,
    exposed_host_s,
    gemm_utilization,
)
from maia_serving.emulator.cost.layout import SINGLE_CHIP, Parallel, crosses_node, stage_layers
from maia_serving.emulator.cost.routing import ExpertLoad, eplb_error, eplb_nodes, uniform_load
from maia_serving.emulator.cost.terms import OpTerms, op_terms, window_sum
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import ModelShape


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
        parts = {
            "compute": self.compute_s,
            "memory": self.memory_s,
            "communication": self.comm_s,
            "launch": self.launch_s,
        }
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


# Operators outside the decoder layers, by the pipeline stage that runs them (1: the first, 2: the last);
# every other operator is a layer's and runs on every stage in proportion to its layers (0).
_EDGE_PLACE = {"embedding": 1, "final_norm": 2, "lm_head": 2, "logit_softcap": 2}


_K = TypeVar("_K")
_T = TypeVar("_T")

# Entries a CostModel's memo holds before it forgets them all: a live server meets new (tokens, seqs) counts for
# as long as it runs, and the table must stay small (65,536 entries of a few floats each).
_MEMO_ENTRIES = 1 << 16


def _remember(memo: dict[_K, _T], key: _K, value: _T) -> _T:
    """``memo[key] = value``, forgetting the whole memo first when it is full; returns ``value``."""
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


# Some terms' roofline summed for one step (CostModel._priced): compute, memory, FLOPs and bytes in total, and
# compute and memory per place (_EDGE_PLACE), which pipeline stages share out.
_Sum = tuple[float, float, float, float, list[float], list[float]]

# A GEMM term's shape as its efficiency model reads it (OpTerms.gemm_shape), and one term of a step's loop as
# CostModel._priced unpacks it: the term, its FLOP rate, its GEMM shape (None: no GEMM model), its place
# (_EDGE_PLACE), whether its rows are the busiest expert chip's, whether it is attention.
_GemmShape = tuple[float, float, float, float]
_LoopItem = tuple[OpTerms, float, _GemmShape | None, int, bool, bool]


class CostModel:
    """step_cost for one (profile, model, parallelism, KV dtype), with the terms
    worked out once: what a live engine calls every step."""

    def __init__(
        self,
        profile: DeviceProfile,
        model: ModelShape,
        parallel: Parallel = SINGLE_CHIP,
        kv_cache_dtype: str = "auto",
        fusions: Iterable[str] = (),
    ):
        self.profile = profile
        self.model = model
        self.parallel = parallel
        self.terms = op_terms(model, parallel, kv_cache_dtype, fusions)
        prec = model.precision(kv_cache_dtype)
        self._model_bytes = prec.model.bytes_per_element
        self._comm_bytes = prec.comm.bytes_per_element
        attention_eff = profile.attention_compute_efficiency or profile.compute_efficiency
        self._flops_per_s = tuple(
            profile.peak_flops(t.peak) * attention_eff if t.kind == "attention" else profile.effective_flops(t.peak)
            for t in self.terms
        )
        self._bytes_per_s = profile.effective_bandwidth_bytes_per_s
        self._window = model.sliding_window if model.num_sliding_layers else None
        self._gemm = profile.gemm
        self._split = profile.attention_split_tokens if profile.gemm else 0
        self._kv_heads = 1 if model.mla else math.ceil(model.num_kv_heads / parallel.tp)
        # Per term, what its efficiency model needs, flattened for the per-step loop: a GEMM's rows per token and
        # per sequence, its groups per expert touched (0: one group) and its columns; None for the others.
        self._gemm_shapes = tuple(t.gemm_shape() if self._gemm and t.kind == "gemm" else None for t in self.terms)
        self._net = profile.network
        self._places = tuple(_EDGE_PLACE.get(t.name, 0) for t in self.terms)
        self._kernels = tuple(
            sum(t.launches for t, p in zip(self.terms, self._places) if p == place) for place in range(3)
        )
        self._stage_layers = stage_layers(model.num_layers, parallel.pp)
        self._crosses = tuple(crosses_node(k, parallel.tp, self._net.node_chips) for k in range(parallel.pp - 1))
        # MoE under data parallelism: every replica's tokens reach this chip's experts (_mlp_ops), and the
        # chips per node of the two groups they travel in (vLLM's rank = (dp_rank * pp + stage) * tp + tp_rank).
        self._expert_ranks = parallel.moe_ranks if parallel.ep else 1
        # Under expert parallelism the routed experts' rows are the busiest chip's (expert_imbalance).
        self._routed = tuple(
            parallel.ep and model.moe is not None and parallel.moe_ranks > 1 and t.name.startswith("experts.")
            for t in self.terms
        )
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
        # (None: no routed experts, so no chip's share to price.)
        self._routed_load: ExpertLoad | None = None
        if self._any_routed:
            moe = model.require_moe()
            self._routed_load = moe.load or uniform_load(moe.num_experts, moe.top_k)
        # EPLB balances a grouped model per node first, over the nodes the whole deployment spans.
        nodes = eplb_nodes(parallel.chips, self._net.node_chips, self._expert_ranks)
        self._placement = (
            self._expert_ranks,
            self._redundant,
            parallel.eplb_rearranged,
            model.moe.num_groups if model.moe else 1,
            nodes,
        )
        self._chip_shares = self._routed_load.chip_shares(*self._placement) if self._routed_load is not None else None
        # Per term, what a step's loop reads, gathered once (the loop runs for every simulated step).
        self._loop: tuple[_LoopItem, ...] = tuple(
            zip(
                self.terms,
                self._flops_per_s,
                self._gemm_shapes,
                self._places,
                self._routed,
                (t.kind == "attention" for t in self.terms),
            )
        )
        # Terms that read no context variable (pairs, context, window pairs, window context) and no attention
        # floor: their price is a function of (tokens, seqs) alone (_context_free).
        free = tuple(
            t.kind != "attention"
            and not any(
                c.attended_pairs or c.context_tokens or c.window_pairs or c.window_context for c in (t.flops, t.bytes)
            )
            for t in self.terms
        )
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
            moe = self.model.require_moe()  # only routed experts ask (_routing)
            per_chip = (moe.num_experts + (self._redundant or 0)) / self._expert_ranks
            factor = _remember(
                self._busiest_memo,
                tokens,
                expert_imbalance(tokens, moe.top_k, self._expert_ranks, per_chip, self._chip_shares),
            )
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
            moved = (
                interconnect.all_gather(net, gathered, group, per_node).time_s
                + interconnect.reduce_scatter(net, par.dp * tokens * hidden, group, per_node).time_s
            )
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
        return sum(
            count
            * interconnect.collective(
                net, ops[op], nbytes, group, ops[op] == "send" and crosses_node(stage, tp, chips)
            ).time_s
            for op, group, nbytes, count, stage in rows
        )

    def _comm_parts(self, tokens: int, seqs: int) -> tuple[float, float, float, tuple[float, ...]]:
        """One tensor-parallel all-reduce, the logits all-gather, one MoE layer's dispatch and combine, and each
        stage's hop for a step, remembered per (tokens, seqs): a simulation asks for the same counts many times."""
        parts = self._comm_memo.get((tokens, seqs))
        if parts is None:
            parts = _remember(
                self._comm_memo,
                (tokens, seqs),
                (self.all_reduce_s(tokens), self.logits_s(seqs), self.moe_layer_s(tokens), self.hops_s(tokens)),
            )
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

    def _launch_s(
        self, compute_s: float, memory_s: float, comm_s: float, kernels: float, host_s: float, decode_graph: bool
    ) -> float:
        """Launch time of a stage (or a whole step) of ``kernels`` kernels: on the device, the host's step
        overhead ``host_s`` (all of it on the first stage, none elsewhere), and the host's launch time where it
        outlasts the device's work."""
        device_launch = self.profile.kernel_launch_s * kernels
        launch = device_launch + host_s
        if decode_graph:
            graph = self.profile.graph
            assert graph is not None  # decode_graph: the step replays the profile's CUDA graphs (cost_of)
            host = graph.launch_s
        else:
            host = self.profile.host_launch_s * kernels
        if host:
            launch += exposed_host_s(host, compute_s + memory_s + comm_s + device_launch)
        return launch

    def _staged(
        self,
        tokens: int,
        seqs: int,
        compute: list[float],
        memory: list[float],
        flops: float,
        nbytes: float,
        decode_graph: bool,
    ) -> StepCost:
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
        return StepCost(
            compute_s, memory_s, comm_s + sum(hops), launch_s, flops, nbytes, (), stages=tuple(totals), hops=hops
        )

    def cost(self, step: StepShape, detail: bool = False) -> StepCost:
        """The cost of a checked step; ``detail`` also lists each operator (slower: for reports)."""
        return self.cost_of(step.new_tokens, step.context_lens, detail)

    def _routing(self, tokens: int) -> tuple[float, float]:
        """(routed rows, experts touched) of a step of ``tokens`` tokens: the busiest expert chip's rows under
        expert parallelism (else the tokens), and the experts one chip reads (0 for a dense model)."""
        moe, load = self.model.moe, self._routed_load
        experts = 0.0
        if load is not None:  # under EP: the chip that reads the most
            experts = load.busiest_chip_touched(tokens * self.parallel.dp, *self._placement)
        elif moe:
            experts = moe.experts_touched(tokens * self.parallel.dp) / self._expert_ranks
        busiest = tokens * self._busiest_factor(tokens * self.parallel.dp) if self._any_routed else tokens
        return busiest, experts

    def _priced(
        self,
        loop: tuple[_LoopItem, ...],
        tokens: int,
        seqs: int,
        routing: tuple[float, float],
        pairs: int = 0,
        ctx: int = 0,
        wpairs: int = 0,
        wctx: int = 0,
        longest: int = 0,
        ops: list[OpCost] | None = None,
    ) -> _Sum:
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
                wpairs += window_sum(n - q + 1, n, window)
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
                self._loop, tokens, seqs, routing, pairs, ctx, wpairs, wctx, longest, ops
            )
        else:
            compute, memory, flops, nbytes, free_compute, free_memory = self._context_free(tokens, seqs, routing)
            c, m, f, b, placed_compute, placed_memory = self._priced(
                self._context_loop, tokens, seqs, routing, pairs, ctx, wpairs, wctx, longest
            )
            compute, memory, flops, nbytes = compute + c, memory + m, flops + f, nbytes + b
            for place in range(3):
                placed_compute[place] += free_compute[place]
                placed_memory[place] += free_memory[place]
        graph = self.profile.graph
        decode_graph = bool(graph and tokens == seqs <= graph.max_batch)
        if self.parallel.pp == 1:
            comm = self.comm_s(tokens, seqs)
            launch = self._launch_s(
                compute, memory, comm, sum(self._kernels), self.host_step_s(tokens, seqs), decode_graph
            )
            return StepCost(compute, memory, comm, launch, flops, nbytes, tuple(ops))
        staged = self._staged(tokens, seqs, placed_compute, placed_memory, flops, nbytes, decode_graph)
        return replace(staged, ops=tuple(ops)) if ops else staged


def step_cost(
    profile: DeviceProfile,
    model: ModelShape,
    step: StepShape,
    parallel: Parallel = SINGLE_CHIP,
    kv_cache_dtype: str = "auto",
) -> StepCost:
    """Emulated time of one forward pass of ``step`` on ``tp * pp`` chips of ``profile``,
    with the per-operator breakdown."""
    return CostModel(profile, model, parallel, kv_cache_dtype).cost(step, detail=True)

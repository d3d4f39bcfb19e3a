"""Measured expert routing: how often each expert of a MoE layer is chosen, from a file.

Why: the cost model's uniform routing is the best case for expert parallelism and the worst for the
weights a step reads. Real routers favour some experts, per layer: without expert parallelism a hot
expert's weights serve more tokens, so a decode step touches fewer distinct experts and reads less;
with it the chip that holds the hot experts runs more rows than the mean, and the layer waits for it.
``--expert-load FILE`` on ``simulate`` and ``plan`` prices a measured histogram instead.

The file is JSON: ``{"source": "...", "layers": [[count, ...], ...]}``, one list per MoE layer (or a
single list for all layers) of how many tokens chose each expert, ``num_experts`` counts each, from
any run of the model on representative text (vLLM's expert-parallel load balancer, ``--enable-eplb``,
counts them as it serves; a forward hook on the router gives them too). Counts are normalized per layer to each expert's
probability of being among a token's ``top_k`` (they sum to ``top_k``). Refused, by name: a number of
layer lists other than one or the model's MoE layers, a list of another length than its experts,
negative, non-finite or all-zero counts, and an expert with more than ``1 / top_k`` of a layer's
choices (a top-k router picks an expert at most once a token).

Placement follows vLLM's default (``--expert-placement-strategy linear``): consecutive experts, ``E // chips``
on each chip and one more on the first ``E % chips``. With ``--enable-eplb`` it follows vLLM's expert-parallel
load balancer instead: until its first rearrangement, vLLM's initial map (``eplb_initial_placement``), and
from then on the balanced one (``eplb_placement``: per node first for a grouped model across nodes), balanced on
the same counts, which stand for the window of load it measured before rearranging.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Per layer, per chip, the share of the tokens' choices each expert (or replica) the chip holds takes.
Placement = tuple[tuple[tuple[float, ...], ...], ...]


@dataclass(frozen=True)
class ExpertLoad:
    """Per MoE layer, each expert's probability of being among a token's ``top_k`` (sums to top_k)."""

    shares: tuple[tuple[float, ...], ...]
    source: str = ""
    # Per token count, what a step asks of it: a simulation asks for the same few counts thousands of times,
    # and a model of 256 experts in 58 layers would cost 15,000 powers a step. One memo per question, keyed
    # by its arguments: experts_touched's tokens, busiest_chip_touched's and placed's.
    _touched_memo: dict[float, float] = field(default_factory=dict, compare=False, repr=False)
    _busiest_memo: dict[tuple[float, int, int | None, bool, int, int], float] = field(
        default_factory=dict, compare=False, repr=False
    )
    _placed_memo: dict[tuple[int, int | None, bool, int, int], Placement] = field(
        default_factory=dict, compare=False, repr=False
    )

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct experts a layer's ``tokens`` route to, averaged over layers:
        sum over experts of ``1 - (1 - p)^T`` (the uniform case is ``E (1 - (1 - k/E)^T)``)."""
        memo = self._touched_memo
        if tokens not in memo:
            memo[tokens] = sum(sum(1.0 - (1.0 - p) ** tokens for p in layer) for layer in self.shares) / len(
                self.shares
            )
        return memo[tokens]

    def busiest_chip_touched(
        self,
        tokens: float,
        chips: int,
        redundant: int | None = None,
        rearranged: bool = True,
        groups: int = 1,
        nodes: int = 1,
    ) -> float:
        """Under expert parallelism, the distinct experts the chip touching most of its own reads, per layer,
        averaged over layers: the layer waits for that chip's weights (with uniform routing, where the experts
        divide evenly, every chip's). The other arguments: as ``placed``."""
        key = (tokens, chips, redundant, rearranged, groups, nodes)
        memo = self._busiest_memo
        if key not in memo:
            placed = self.placed(chips, redundant, rearranged, groups, nodes)
            memo[key] = sum(
                max(sum(1.0 - (1.0 - p) ** tokens for p in chip) for chip in layer) for layer in placed
            ) / len(self.shares)
        return memo[key]

    def chip_shares(
        self, chips: int, redundant: int | None = None, rearranged: bool = True, groups: int = 1, nodes: int = 1
    ) -> tuple[tuple[float, ...], ...]:
        """Per layer, the fraction of the routed rows each chip's experts receive."""
        return tuple(
            tuple(sum(chip) / sum(layer) for chip in chips_of)
            for layer, chips_of in zip(self.shares, self.placed(chips, redundant, rearranged, groups, nodes))
        )

    def placed(
        self, chips: int, redundant: int | None = None, rearranged: bool = True, groups: int = 1, nodes: int = 1
    ) -> Placement:
        """Per layer, per chip, the share of the tokens' choices each expert (or replica) the chip holds takes:
        vLLM's linear placement, or with ``redundant`` EPLB's, balanced once it has ``rearranged`` (for a model
        of ``groups`` expert groups over ``nodes`` nodes: ``eplb_placement``) and its initial map before."""
        key = (chips, redundant, rearranged, groups, nodes)
        memo = self._placed_memo
        if key not in memo:
            if redundant is None:
                memo[key] = tuple(_placed(layer, chips) for layer in self.shares)
            elif rearranged:
                memo[key] = tuple(eplb_placement(layer, chips, redundant, groups, nodes) for layer in self.shares)
            else:
                memo[key] = tuple(eplb_initial_placement(layer, chips, redundant) for layer in self.shares)
        return memo[key]


def _placed(layer: tuple[float, ...], chips: int) -> tuple[tuple[float, ...], ...]:
    """A layer's per-expert values as each of ``chips`` holds them: vLLM's linear placement (module doc)."""
    base, extra = divmod(len(layer), chips)
    out: list[tuple[float, ...]] = []
    start = 0
    for c in range(chips):
        end = start + base + (c < extra)
        out.append(layer[start:end])
        start = end
    return tuple(out)


def eplb_error(num_experts: int, redundant: int, chips: int) -> str | None:
    """Why vLLM's EPLB refuses ``num_experts`` experts and ``redundant`` more over ``chips`` chips, or None."""
    if redundant < 0:
        return f"num_redundant_experts must be at least 0, got {redundant}"
    if chips < 2:
        return "EPLB balances experts over several chips: it needs tensor or data parallelism (vLLM refuses one)"
    if (num_experts + redundant) % chips:
        return (
            f"EPLB places the experts evenly: {num_experts} experts + {redundant} redundant do not divide over "
            f"{chips} expert-parallel chips (vLLM refuses it); choose num_redundant_experts (--eplb-config) so "
            "that they do"
        )
    return None


def _with_replicas(layer: Sequence[float], slots: list[int]) -> list[float]:
    """Each slot's share of the tokens' choices: its expert's, split evenly among the expert's replicas (vLLM
    picks among them by the token's index)."""
    replicas = Counter(slots)
    return [layer[e] / replicas[e] for e in slots]


def eplb_initial_placement(layer: tuple[float, ...], chips: int, redundant: int) -> tuple[tuple[float, ...], ...]:
    """A layer's experts as vLLM's EPLB holds them until it first rearranges (``EplbState``'s initial map): the
    ``E`` experts in order, then ``redundant`` replicas of experts ``0, 1, ...`` (``i % E``), the ``E + R``
    slots in order, ``(E + R) / chips`` a chip. With no redundant experts, vLLM's linear placement."""
    error = eplb_error(len(layer), redundant, chips)
    if error:
        raise ValueError(error)
    physical = _with_replicas(layer, list(range(len(layer))) + [i % len(layer) for i in range(redundant)])
    room = len(physical) // chips
    return tuple(tuple(physical[c * room : (c + 1) * room]) for c in range(chips))


def eplb_nodes(world_chips: int, node_chips: int, ep_chips: int) -> int:
    """The node count vLLM's EPLB balances over: the nodes the whole deployment spans (``get_node_count``, every
    stage's and replica's chips), or one where they do not divide its ``ep_chips`` (vLLM then warns and balances
    globally)."""
    nodes = max(1, -(-world_chips // node_chips))
    return 1 if ep_chips % nodes else nodes


def _pack(weights: list[float], packs: int) -> list[list[int]]:
    """vLLM's balanced packing: the items heaviest first, each to the lightest pack not yet full, ``len / packs``
    a pack (item ``i`` to pack ``i`` where that is one). Ties go to the lower index, as numpy's argmin chooses."""
    room = len(weights) // packs
    if room == 1:
        return [[i] for i in range(len(weights))]
    loads = [0.0] * packs
    held: list[list[int]] = [[] for _ in range(packs)]
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(packs) if len(held[p]) < room), key=lambda p: (loads[p], p))
        held[pack].append(item)
        loads[pack] += weights[item]
    return held


def _replicate(layer: list[float], slots: int) -> list[float]:
    """vLLM's replication: the experts, and ``slots - len(layer)`` more replicas, each of the expert whose
    replicas now carry the most each (ties to the lower index, as numpy's argmax); each slot's share."""
    replicas = [1] * len(layer)
    for _ in range(slots - len(layer)):
        hot = max(range(len(layer)), key=lambda e: (layer[e] / replicas[e], -e))
        replicas[hot] += 1
    return _with_replicas(layer, [e for e in range(len(layer)) for _ in range(replicas[e])])


def eplb_placement(
    layer: tuple[float, ...], chips: int, redundant: int, groups: int = 1, nodes: int = 1
) -> tuple[tuple[float, ...], ...]:
    """A layer's experts as vLLM's expert-parallel load balancer (its default policy) places them from their
    measured load, over ``chips`` chips on ``nodes`` nodes (``eplb_nodes``: they divide the chips) for a model of
    ``groups`` expert groups (DeepSeek's ``n_group``: consecutive experts), node by node in rank order:

    1. where the groups divide over the nodes, each node gets ``groups / nodes`` of them, the heaviest group
       first to the lightest node with room (vLLM's hierarchical policy); otherwise one node holds all (its
       global policy, which the hierarchical one is on one node);
    2. per node, ``redundant / nodes`` more replicas of its experts, each of the expert whose replicas now carry
       the most each;
    3. per node, its replicas heaviest first, each to the lightest of its chips with room, ``(E + R) / chips``
       a chip.

    A token picks among its expert's replicas evenly (vLLM hashes the token's index), so a replica takes its
    expert's share over its replica count. ``tests/unit/vllm/test_eplb_conformance.py`` checks it, and
    ``eplb_initial_placement``, against vLLM's code.
    """
    error = eplb_error(len(layer), redundant, chips)
    if error:
        raise ValueError(error)
    if groups % nodes:
        groups = nodes = 1
    size = len(layer) // groups
    out: list[tuple[float, ...]] = []
    for held_groups in _pack([sum(layer[g * size : (g + 1) * size]) for g in range(groups)], nodes):
        local = [layer[e] for g in held_groups for e in range(g * size, (g + 1) * size)]
        physical = _replicate(local, (len(layer) + redundant) // nodes)
        out.extend(tuple(physical[i] for i in chip) for chip in _pack(physical, chips // nodes))
    return tuple(out)


def from_counts(
    counts: list[Any], num_experts: int, top_k: int, moe_layers: int, where: str = "expert load", source: str = ""
) -> ExpertLoad:
    """Validate and normalize ``counts`` (one list, or one per MoE layer) for a model's MoE layers."""
    layers = counts if counts and isinstance(counts[0], list) else [counts]
    if len(layers) not in (1, moe_layers):
        raise ValueError(
            f"{where}: {len(layers)} layer lists for a model with {moe_layers} MoE layers; give one "
            f"list for all layers or one per MoE layer"
        )
    shares = []
    for i, layer in enumerate(layers):
        if len(layer) != num_experts or not all(isinstance(c, (int, float)) for c in layer):
            raise ValueError(
                f"{where}: layer {i} has {len(layer)} entries; the model has {num_experts} experts, "
                f"and each entry is a token count"
            )
        total = sum(layer)
        if any(not math.isfinite(c) or c < 0 for c in layer) or not total:
            raise ValueError(f"{where}: layer {i}'s counts must be finite, non-negative and not all zero")
        hot = max(range(num_experts), key=layer.__getitem__)
        if top_k * layer[hot] > total * (1 + 1e-9):
            raise ValueError(
                f"{where}: layer {i}'s expert {hot} has {layer[hot]} of {total} choices, more than "
                f"1/top_k = 1/{top_k} of them, which a top-{top_k} router cannot make (each token "
                "picks an expert once); are these counts of another model?"
            )
        shares.append(tuple(top_k * c / total for c in layer))
    return ExpertLoad(tuple(shares), source)


def uniform_load(num_experts: int, top_k: int) -> ExpertLoad:
    """Every expert alike in every layer: what EPLB balances when no load was measured."""
    return from_counts([1.0] * num_experts, num_experts, top_k, 1, source="uniform routing")


def load_expert_load(path: str | Path, num_experts: int, top_k: int, moe_layers: int) -> ExpertLoad:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--expert-load {path}: no such file (a JSON file of per-expert token counts)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--expert-load {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
        raise ValueError(f'--expert-load {path}: expected {{"source": ..., "layers": [[count, ...], ...]}}')
    return from_counts(
        data["layers"], num_experts, top_k, moe_layers, f"--expert-load {path}", str(data.get("source", path.name))
    )

"""The emulator's EPLB placements (``emulator/routing.py``) against vLLM's own code, on the same loads: the
balanced map of its default policy and the initial map it serves until its first rearrangement. The
emulator may not import vLLM, so it re-states both; this test fails when vLLM changes either."""

import random

import pytest
import torch
from vllm.distributed.eplb.eplb_state import EplbState
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

from maia_serving.emulator.cost.routing import eplb_initial_placement, eplb_placement

# (experts, redundant, chips): one expert a chip, many, replicas of a few experts, more replicas than experts.
CASES = [(8, 0, 8), (8, 8, 8), (64, 0, 8), (64, 16, 8), (128, 0, 8), (60, 4, 16), (6, 10, 4)]


def _chips(layer: list[float], phy2log: list[int], chips: int) -> list[tuple[float, ...]]:
    """Each chip's share of the choices per slot, from vLLM's physical-to-logical map: a token picks among its
    expert's replicas evenly, and rank r holds the r-th contiguous run of slots."""
    replicas = [phy2log.count(e) for e in range(len(layer))]
    shares = [layer[e] / replicas[e] for e in phy2log]
    room = len(shares) // chips
    return [tuple(shares[c * room : (c + 1) * room]) for c in range(chips)]


def _load(experts: int, seed: int) -> list[float]:
    """Distinct shares (vLLM sorts with an unstable argsort, so ties may pack in another order)."""
    rng = random.Random(seed)
    return [rng.paretovariate(1.2) + 1e-6 * e for e in range(experts)]


@pytest.mark.parametrize(("experts", "redundant", "chips"), CASES)
@pytest.mark.parametrize("seed", range(3))
def test_the_balanced_map_is_vllms_default_policy(experts, redundant, chips, seed):
    """Compared as each chip's set of shares, the chips in any order (vLLM numbers them by its packing)."""
    layer = _load(experts, seed)
    phy2log = DefaultEplbPolicy.rebalance_experts(
        torch.tensor([layer], dtype=torch.float64), experts + redundant, 1, 1, chips
    )[0].tolist()
    ours = eplb_placement(tuple(layer), chips, redundant)
    vllms = _chips(layer, phy2log, chips)
    assert sorted(sorted(c) for c in ours) == sorted(sorted(c) for c in vllms)


# (experts, redundant, chips, groups, nodes), DeepSeek-style expert groups: on one node (the global policy), across
# nodes (per node first), one group a node, one replica a chip, and groups that do not divide over the nodes
# (vLLM balances globally then).
GROUPED = [
    (64, 0, 8, 8, 1),
    (256, 32, 8, 8, 1),
    (256, 0, 16, 8, 2),
    (256, 32, 16, 8, 2),
    (64, 16, 16, 8, 4),
    (64, 0, 8, 4, 2),
    (16, 0, 16, 8, 2),
    (64, 0, 16, 2, 2),
    (60, 4, 16, 3, 2),
]


@pytest.mark.parametrize(("experts", "redundant", "chips", "groups", "nodes"), GROUPED)
@pytest.mark.parametrize("seed", range(3))
def test_a_grouped_model_is_balanced_per_node_as_vllm_balances_it(experts, redundant, chips, groups, nodes, seed):
    """Compared node by node (vLLM's ranks fill node 0 first): each node's chips hold the same shares."""
    layer = _load(experts, seed)
    phy2log = DefaultEplbPolicy.rebalance_experts(
        torch.tensor([layer], dtype=torch.float64), experts + redundant, groups, nodes, chips
    )[0].tolist()
    ours, vllms = eplb_placement(tuple(layer), chips, redundant, groups, nodes), _chips(layer, phy2log, chips)
    per_node = chips // nodes
    for node in range(nodes):
        mine, theirs = (c[node * per_node : (node + 1) * per_node] for c in (ours, vllms))
        assert sorted(sorted(c) for c in mine) == sorted(sorted(c) for c in theirs)


def test_across_nodes_a_grouped_model_leaves_the_busiest_chip_heavier_than_the_global_policy():
    """What the hierarchical policy costs: groups stay whole on a node, so the nodes cannot even out."""
    layer = tuple(_load(256, 1))
    busiest = [max(map(sum, eplb_placement(layer, 16, 32, groups, nodes))) for groups, nodes in ((1, 1), (8, 2))]
    assert busiest[1] > busiest[0] * 1.001


@pytest.mark.parametrize(("experts", "redundant", "chips"), CASES)
def test_the_initial_map_is_vllms(experts, redundant, chips):
    layer = _load(experts, 0)
    phy2log = list(EplbState.build_initial_global_physical_to_logical_map(experts, redundant))
    assert list(eplb_initial_placement(tuple(layer), chips, redundant)) == _chips(layer, phy2log, chips)

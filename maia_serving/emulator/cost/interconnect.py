"""Alpha-beta costs of collectives over a chip's network, with the algorithm chosen as NCCL chooses.

The model is Hockney's: a message of ``n`` bytes over one link costs ``alpha + n / beta`` (``latency_s``,
the per-direction bandwidth). Each topology offers the algorithms NCCL and vLLM run on it, and the
cheapest is taken for the message size at hand, as NCCL's tuner picks the algorithm of least predicted
time (``src/graph/tuning.cc``). For an all-reduce of ``n`` bytes over ``p`` chips of one node:

* ``full_mesh`` (each pair of chips directly linked at ``b`` per direction, the pair bandwidth):
  ``one_shot``, every chip sends its whole buffer to every peer at once and reduces locally:
  ``alpha + n / b``; ``two_shot``, a direct reduce-scatter then a direct all-gather, each chip sending
  ``n / p`` to each peer at once: ``2 (alpha + n / (p b))``. One-shot wins under ``n = alpha p b / (p - 2)``.
* ``switch`` (NVSwitch; ``B`` a chip's injection bandwidth): ``ring``, ``2 (p - 1)`` steps of ``n / p``
  (Thakur, Rabenseifner and Gropp, IJHPCA 2005): ``2 (p - 1) (alpha + n / (p B))``; ``one_shot``, vLLM's
  custom all-reduce for small messages, the whole buffer to ``p - 1`` peers through the switch:
  ``alpha + (p - 1) n / B``; with in-switch reduction, ``nvls``: each chip sends its ``n`` for the switch to
  reduce and receives ``n`` multicast back, the two pipelined, ``2 alpha + (1 + 1 / p) n / B`` (our reading
  of NVLink SHARP; a ring moves ``2 (p - 1) / p n``).
* ``pcie``: ``ring`` only (vLLM's custom all-reduce needs NVLink beyond two GPUs).

Each collective also costs the node tier's ``collective_latency_s`` once (NCCL's ``baseLat``: the kernel's
launch and synchronization), on top of ``latency_s`` per step (NCCL's ``hwLat``); a send between stages
too.

A group larger than a node (``p = m c`` over ``m`` nodes of ``c`` chips) runs over the scale-out tier:
a flat ``ring`` at the scale-out bandwidth (NCCL's multi-node ring: each chip's NIC carries one ring's
node crossing), or ``hierarchical/ring`` and ``hierarchical/tree``: reduce-scatter in the node, an
all-reduce of ``n / c`` among the ``m`` chips of the same local rank (a ring, or NCCL's double binary tree:
``2 ceil(log2 m)`` hops, ``2 n / B``), all-gather in the node. Reduce-scatter and all-gather are one
phase: a direct exchange on a full mesh, a ring elsewhere, and over nodes the in-node phase and a ring
across nodes.

An all-to-all (expert parallelism's dispatch and combine) sends ``n / p`` of each chip's ``n`` bytes to
every peer at once, as NCCL posts its ``p - 1`` sends and receives together and DeepEP's kernels write
their peers' buffers directly: on a full mesh each share goes over its pair's links,
``alpha + n / (p b)``; through a switch or PCIe all shares leave through the chip's injection bandwidth,
``alpha + (p - 1) n / (p B)``. Over nodes the shares to the other nodes' chips leave through the chip's
scale-out NICs while the in-node ones cross the scale-up tier, the two at once: the longer of the two.

A group need not fill its nodes: ``per_node`` says how many of its chips share one (data parallelism's
group holds one rank of each replica, so on nodes of ``c`` chips and replicas of ``r`` chips it has
``max(1, c / r)`` in a node); a group spans ``ceil(p / per_node)`` nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maia_serving.emulator.hardware import LinkProfile, Network


@dataclass(frozen=True)
class Collective:
    """The algorithm chosen for one collective and its time."""

    algorithm: str
    time_s: float


NONE = Collective("none", 0.0)


def _cheapest(net: Network, options: dict[str, float]) -> Collective:
    name = min(options, key=options.__getitem__)
    return Collective(name, net.scale_up.collective_latency_s + options[name])


def _pair_bandwidth(link: LinkProfile) -> float:
    """A full_mesh tier's pair bandwidth, which LinkProfile requires of every full_mesh tier; ValueError for
    another topology."""
    pair = link.pair_bandwidth_bytes_per_s
    if pair is None:
        raise ValueError(f"a {link.topology} tier has no pair bandwidth (only a full_mesh tier gives one)")
    return pair


def _node_all_reduce(link: LinkProfile, n: float, p: int) -> dict[str, float]:
    """The all-reduce algorithms of one tier and their times (module docstring)."""
    a, bw = link.latency_s, link.bandwidth_bytes_per_s
    if link.topology == "full_mesh":
        pair = _pair_bandwidth(link)
        return {"one_shot": a + n / pair, "two_shot": 2 * (a + n / p / pair)}
    options = {"ring": 2 * (p - 1) * (a + n / p / bw)}
    if link.topology == "switch":
        options["one_shot"] = a + (p - 1) * n / bw
        if link.in_network_reduction:
            options["nvls"] = 2 * a + (1 + 1 / p) * n / bw
    return options


def _node_phase(link: LinkProfile, n: float, p: int) -> Collective:
    """One reduce-scatter or all-gather phase of an ``n``-byte buffer over ``p`` chips of a tier."""
    a = link.latency_s
    if link.topology == "full_mesh":
        return Collective("direct", a + n / p / _pair_bandwidth(link))
    return Collective("ring", (p - 1) * (a + n / p / link.bandwidth_bytes_per_s))


def _across_all_reduce(link: LinkProfile, n: float, m: int) -> dict[str, float]:
    """All-reduce of ``n`` bytes among ``m`` nodes, one chip each, over the scale-out tier."""
    a, bw = link.latency_s, link.bandwidth_bytes_per_s
    return {"ring": 2 * (m - 1) * (a + n / m / bw), "tree": 2 * math.ceil(math.log2(m)) * a + 2 * n / bw}


def _span(net: Network, group: int, per_node: int | None = None) -> tuple[int, int]:
    """A group's chips on each node (``per_node``, at most a node's worth, by default that) and how many nodes
    it spans (1 within one); ValueError where the network cannot hold it."""
    if group < 1:
        raise ValueError(f"group size must be at least 1, got {group}")
    per_node = min(per_node or net.node_chips, net.node_chips)
    if group <= per_node:
        return per_node, 1
    out = _scale_out(net, group)
    if group > out.chips:
        raise ValueError(f"a group of {group} chips exceeds the {out.chips} chips the scale-out network connects")
    return per_node, math.ceil(group / per_node)


def _scale_out(net: Network, group: int) -> LinkProfile:
    """The scale-out tier a group of ``group`` chips spanning nodes runs over (``_span`` found it spans more
    than one); ValueError where the profile names none."""
    out = net.scale_out
    if out is None:
        raise ValueError(
            f"a group of {group} chips exceeds the {net.node_chips} chips of a node, and the "
            f"profile names no scale-out network"
        )
    return out


def all_reduce(net: Network, nbytes: float, group: int) -> Collective:
    """All-reduce of an ``nbytes`` buffer held by each of ``group`` chips, by the cheapest algorithm."""
    _, nodes = _span(net, group)
    if group == 1 or nbytes <= 0:
        return NONE
    if nodes == 1:
        return _cheapest(net, _node_all_reduce(net.scale_up, nbytes, group))
    out, c = _scale_out(net, group), net.node_chips
    options = {"ring": 2 * (group - 1) * (out.latency_s + nbytes / group / out.bandwidth_bytes_per_s)}
    if group % c == 0:
        in_node = 2 * _node_phase(net.scale_up, nbytes, c).time_s
        for name, across in _across_all_reduce(out, nbytes / c, nodes).items():
            options[f"hierarchical/{name}"] = in_node + across
    return _cheapest(net, options)


def _phase(net: Network, nbytes: float, group: int, per_node: int | None = None) -> Collective:
    c, nodes = _span(net, group, per_node)
    if group == 1 or nbytes <= 0:
        return NONE
    if nodes == 1:
        phase = _node_phase(net.scale_up, nbytes, group)
        return _cheapest(net, {phase.algorithm: phase.time_s})
    out = _scale_out(net, group)
    options = {"ring": _node_phase(out, nbytes, group).time_s}
    if group % c == 0 and c > 1:
        options["hierarchical/ring"] = (
            _node_phase(net.scale_up, nbytes, c).time_s + _node_phase(out, nbytes / c, nodes).time_s
        )
    return _cheapest(net, options)


def reduce_scatter(net: Network, nbytes: float, group: int, per_node: int | None = None) -> Collective:
    """Reduce-scatter of an ``nbytes`` buffer held by each of ``group`` chips."""
    return _phase(net, nbytes, group, per_node)


def all_gather(net: Network, nbytes: float, group: int, per_node: int | None = None) -> Collective:
    """All-gather whose result is ``nbytes`` on every chip."""
    return _phase(net, nbytes, group, per_node)


def _exchange_s(link: LinkProfile, share: float, peers: int) -> float:
    """``share`` bytes to each of ``peers`` chips of one tier at once."""
    if peers < 1:
        return 0.0
    if link.topology == "full_mesh":
        return link.latency_s + share / _pair_bandwidth(link)
    return link.latency_s + peers * share / link.bandwidth_bytes_per_s


def all_to_all(net: Network, nbytes: float, group: int, per_node: int | None = None) -> Collective:
    """All-to-all of the ``nbytes`` each of ``group`` chips holds, an equal share for every chip of the group
    (its own stays): expert parallelism's dispatch or combine under uniform routing (module docstring)."""
    c, nodes = _span(net, group, per_node)
    if group == 1 or nbytes <= 0:
        return NONE
    share = nbytes / group
    in_node = _exchange_s(net.scale_up, share, min(group, c) - 1)
    if nodes == 1:
        return _cheapest(net, {"direct": in_node})
    out = _scale_out(net, group)
    across = out.latency_s + (group - min(group, c)) * share / out.bandwidth_bytes_per_s
    return _cheapest(net, {"direct": max(in_node, across)})


def send_recv_s(net: Network, nbytes: float, across_nodes: bool = False) -> float:
    """Point-to-point transfer, as between pipeline stages: over the pair's direct links on a full mesh,
    through the switch otherwise, over the scale-out tier between nodes."""
    if nbytes <= 0:
        return 0.0
    base = net.scale_up.collective_latency_s
    if across_nodes:
        if net.scale_out is None:
            raise ValueError("a transfer between nodes needs a scale-out network; the profile names none")
        link = net.scale_out
        return base + link.latency_s + nbytes / link.bandwidth_bytes_per_s
    link = net.scale_up
    return base + link.latency_s + nbytes / (link.pair_bandwidth_bytes_per_s or link.bandwidth_bytes_per_s)


# The collectives an engine step performs, as its communicator names them; ``nbytes`` is the
# buffer each chip holds for an all-reduce or reduce-scatter, the result for an all-gather or a
# gather, the payload for a send.
COLLECTIVE_OPS = ("all_reduce", "all_gather", "gather", "reduce_scatter", "send")


def collective(net: Network, op: str, nbytes: float, group: int, across_nodes: bool = False) -> Collective:
    """One collective by name. A gather to one chip is priced as the all-gather phase that delivers the
    same bytes (on a ring or a direct exchange the root receives as much as every chip of an all-gather)."""
    if op == "all_reduce":
        return all_reduce(net, nbytes, group)
    if op in ("all_gather", "gather"):
        return all_gather(net, nbytes, group)
    if op == "reduce_scatter":
        return reduce_scatter(net, nbytes, group)
    if op == "send":
        return Collective("direct", send_recv_s(net, nbytes, across_nodes))
    raise ValueError(f"unknown collective {op!r}; known: {', '.join(COLLECTIVE_OPS)}")

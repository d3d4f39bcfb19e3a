"""Alpha-beta collectives on each profile's network, against values worked by hand from the profiles' figures.

Maia 100: a mesh of 4, 150 GB/s a pair, 5 us a hop; 150 GB/s a chip to the scale-out switches, 10 us.
Maia 200: a mesh of 4, 350 GB/s a pair, 3 us; 350 GB/s to the switch tier, 5 us.
H100 SXM: NVSwitch of 8, 450 GB/s a GPU, 0.6 us a step and 6.6 us a collective (NCCL's tuning model),
in-switch reduction (``@no-nvls``: without); ``@pcie``: PCIe Gen5 x16, 64 GB/s, 1 us a step; InfiniBand
50 GB/s a GPU between nodes, 5 us.
"""

import dataclasses

import pytest

from maia_serving.emulator import load_profile
from maia_serving.emulator.cost.interconnect import all_gather, all_reduce, collective, reduce_scatter, send_recv_s
from maia_serving.emulator.cost.layout import crosses_node
from maia_serving.emulator.hardware import LinkProfile, Network

US = 1e-6
N = 64e6  # a 64 MB buffer

CASES = [
    # Maia 100, 4 chips: two-shot 2 (5 us + 16 MB / 150 GB/s) = 2 (5 + 106.667) us; one-shot would be
    # 5 us + 64 MB / 150 GB/s = 431.667 us.
    ("maia100", all_reduce, N, 4, "two_shot", 2 * (5 + 106.6667) * US),
    # 2 of the 4: one-shot 5 us + 64 MB / 150 GB/s over the pair's links (two-shot: 10 us + the same bytes).
    ("maia100", all_reduce, N, 2, "one_shot", (5 + 426.6667) * US),
    # A direct phase: each chip sends N / 4 to each peer at once, 5 us + 106.667 us.
    ("maia100", reduce_scatter, N, 4, "direct", (5 + 106.6667) * US),
    ("maia100", all_gather, N, 4, "direct", (5 + 106.6667) * US),
    # Maia 200: 2 (3 us + 16 MB / 350 GB/s) = 2 (3 + 45.714) us.
    ("maia200", all_reduce, N, 4, "two_shot", 2 * (3 + 45.7143) * US),
    ("maia200", reduce_scatter, N, 4, "direct", (3 + 45.7143) * US),
    # H100 with NVLS: 6.6 us + 2 * 0.6 us + (1 + 1/8) 64 MB / 450 GB/s = 6.6 + 1.2 + 160 us; a ring would take
    # 6.6 + 14 (0.6 us + 8 MB / 450 GB/s) = 6.6 + 257.29 us, one-shot 6.6 + 0.6 + 7 * 64 MB / 450 GB/s = 1002.8 us.
    ("h100-sxm", all_reduce, N, 8, "nvls", (6.6 + 1.2 + 160) * US),
    ("h100-sxm@no-nvls", all_reduce, N, 8, "ring", (6.6 + 14 * (0.6 + 17.7778)) * US),
    # Reduce-scatter and all-gather rings: 6.6 us + 7 (0.6 us + 8 MB / 450 GB/s).
    ("h100-sxm", reduce_scatter, N, 8, "ring", (6.6 + 7 * (0.6 + 17.7778)) * US),
    ("h100-sxm", all_gather, N, 8, "ring", (6.6 + 7 * (0.6 + 17.7778)) * US),
    # PCIe: a ring at 64 GB/s, 6.6 us + 14 (1 us + 8 MB / 64 GB/s) = 6.6 + 14 (1 + 125) us.
    ("h100-sxm@pcie", all_reduce, N, 8, "ring", (6.6 + 14 * 126) * US),
    ("h100-sxm@pcie", all_gather, N, 8, "ring", (6.6 + 7 * 126) * US),
    # Two Maia 100 nodes: in each node a reduce-scatter and an all-gather of 64 MB, 2 (5 + 106.667) us;
    # between them a ring of 2 over 150 GB/s on each chip's quarter, 2 (10 us + 8 MB / 150 GB/s) =
    # 2 (10 + 53.333) us: 350 us. A flat ring would take 14 (10 us + 8 MB / 150 GB/s) = 886.67 us, a tree
    # across 2 (10 us) + 2 * 16 MB / 150 GB/s = 233.33 us (in-node phases aside).
    ("maia100", all_reduce, N, 8, "hierarchical/ring", 350 * US),
    # Reduce-scatter over 2 nodes: in the node 5 + 106.667 us, then across (10 us + 8 MB / 150 GB/s).
    ("maia100", reduce_scatter, N, 8, "hierarchical/ring", (5 + 106.6667 + 10 + 53.3333) * US),
    # Two H100 nodes: the NVLS all-reduce is not a phase, so the node runs ring phases, 14 (0.6 + 17.778) us, and
    # across each GPU's 8 MB a ring of 2 at 50 GB/s, 2 (5 us + 4 MB / 50 GB/s) = 170 us; 6.6 us once.
    ("h100-sxm", all_reduce, N, 16, "hierarchical/ring", (6.6 + 14 * (0.6 + 17.7778) + 170) * US),
]


@pytest.mark.parametrize(
    ("profile", "collective", "nbytes", "group", "algorithm", "seconds"),
    CASES,
    ids=[f"{c[0]}-{c[1].__name__}-{c[3]}" for c in CASES],
)
def test_each_collective_on_each_topology_by_hand(profile, collective, nbytes, group, algorithm, seconds):
    chosen = collective(load_profile(profile).network, nbytes, group)
    assert chosen.algorithm == algorithm
    assert chosen.time_s == pytest.approx(seconds, rel=1e-5)


def test_the_algorithm_follows_the_message_size():
    """On Maia 100's mesh one-shot wins below n = alpha p b / (p - 2) = 5 us * 4 * 150 GB/s / 2 = 1.5 MB; on
    NVSwitch one-shot wins small messages (0.6 us + 7 n / 450 GB/s) and NVLS large ones (1.2 us + 1.125 n /
    450 GB/s, equal at n = 0.6 us * 450 GB/s / 5.875 = 46 KB); across 64 H100 nodes NCCL's tree wins a 64 KB
    buffer (2 * 6 * 5 us + 2 * 8 KB / 50 GB/s = 60.32 us against a ring's 126 (5 us + 125 B / 50 GB/s) = 630.3
    us), after ring phases in the node of 14 (0.6 us + 8 KB / 450 GB/s) and the collective's 6.6 us."""
    mesh = load_profile("maia100").network
    assert [all_reduce(mesh, n, 4).algorithm for n in (1.4e6, 1.6e6)] == ["one_shot", "two_shot"]
    nvswitch = load_profile("h100-sxm").network
    assert [all_reduce(nvswitch, n, 8).algorithm for n in (40e3, 50e3)] == ["one_shot", "nvls"]
    small = all_reduce(nvswitch, 64e3, 512)
    assert small.algorithm == "hierarchical/tree"
    assert small.time_s == pytest.approx((6.6 + 14 * (0.6 + 8e3 / 450e3) + 60.32) * US, rel=1e-5)
    assert all_reduce(nvswitch, 64e6, 16).algorithm == "hierarchical/ring"


def test_one_chip_costs_nothing_and_a_group_beyond_the_network_is_an_error():
    net = load_profile("maia100").network
    assert all_reduce(net, 1e6, 1).time_s == 0.0 and all_gather(net, 0, 4).time_s == 0.0
    with pytest.raises(ValueError, match="exceeds the 1024 chips the scale-out network connects"):
        all_reduce(net, 1e6, 2048)
    with pytest.raises(ValueError, match="exceeds the 4 chips of a node, and the profile names no scale-out"):
        all_reduce(Network(net.scale_up), 1e6, 8)


def test_send_recv_takes_the_pairs_links_the_switch_or_the_scale_out_tier():
    """32 MB: over a Maia 100 pair 5 us + 32 MB / 150 GB/s; through NVSwitch 6.6 us + 0.6 us + 32 MB / 450 GB/s;
    between Maia 100 nodes 10 us + 32 MB / 150 GB/s."""
    assert send_recv_s(load_profile("maia100").network, 32e6) == pytest.approx(5e-6 + 32e6 / 150e9)
    assert send_recv_s(load_profile("h100-sxm").network, 32e6) == pytest.approx(7.2e-6 + 32e6 / 450e9)
    assert send_recv_s(load_profile("maia100").network, 32e6, across_nodes=True) == pytest.approx(10e-6 + 32e6 / 150e9)
    assert send_recv_s(load_profile("maia100").network, 0) == 0.0


def test_stages_cross_nodes_where_their_ranks_do():
    """Stage-major ranks on nodes of 4: tp=4 puts each stage on its own node; tp=2 puts stages 0 and 1 on the
    first node and 2 and 3 on the second; tp=1 crosses only between ranks 3 and 4."""
    assert [crosses_node(s, 4, 4) for s in range(1)] == [True]
    assert [crosses_node(s, 2, 4) for s in range(3)] == [False, True, False]
    assert [crosses_node(s, 1, 4) for s in range(7)] == [False, False, False, True, False, False, False]


def test_maia100_mesh_counts_the_nine_ports_to_its_peers_not_all_twelve():
    """12 x 400 GbE per chip: 3 to each of 3 peers (450 GB/s), 3 to the scale-out switches (150 GB/s)."""
    m100 = load_profile("maia100")
    assert m100.scale_up.bandwidth_bytes_per_s == pytest.approx(9 * 50e9)
    assert m100.scale_up.pair_bandwidth_bytes_per_s == pytest.approx(3 * 50e9)
    assert m100.scale_out.bandwidth_bytes_per_s == pytest.approx(3 * 50e9)


def test_more_link_bandwidth_is_never_slower():
    net = load_profile("maia100").network
    fast = Network(dataclasses.replace(net.scale_up, pair_bandwidth_bytes_per_s=300e9), net.scale_out)
    for n in (1e3, 1e6, 1e9):
        for group in (2, 4, 8):
            assert all_reduce(fast, n, group).time_s <= all_reduce(net, n, group).time_s


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"topology": "torus"}, "unknown topology"),
        ({"topology": "full_mesh"}, "full_mesh tier, and only one, gives its pair bandwidth"),
        ({"topology": "pcie", "in_network_reduction": True}, "only a switch reduces"),
    ],
)
def test_bad_links_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        LinkProfile(**{"chips": 4, "bandwidth_bytes_per_s": 1e9, "latency_s": 0, **kwargs})


def test_a_collective_by_name_is_the_function_of_that_name():
    """As the engine's communicator names them; a gather to one chip costs the all-gather phase."""
    net = load_profile("maia100").network
    assert collective(net, "all_reduce", N, 4) == all_reduce(net, N, 4)
    assert collective(net, "reduce_scatter", N, 4) == reduce_scatter(net, N, 4)
    assert collective(net, "all_gather", N, 4) == collective(net, "gather", N, 4) == all_gather(net, N, 4)
    assert collective(net, "send", N, 2).time_s == send_recv_s(net, N)
    assert collective(net, "send", N, 2, across_nodes=True).time_s == send_recv_s(net, N, across_nodes=True)
    with pytest.raises(ValueError, match="unknown collective 'all_to_all'; known: all_reduce, all_gather"):
        collective(net, "all_to_all", N, 4)

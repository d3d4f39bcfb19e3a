"""Alpha-beta collectives: hand values for a full mesh and a ring."""

import pytest

from maia_serving.emulator import load_profile
from maia_serving.emulator.hardware import LinkProfile
from maia_serving.emulator.interconnect import all_gather_s, all_reduce_s, reduce_scatter_s, send_recv_s


def test_full_mesh_all_reduce_is_two_steps():
    link = LinkProfile("full_mesh", chips=4, bandwidth_bytes_per_s=600e9, latency_s=5e-6)
    n = 64e6
    assert all_reduce_s(link, n, 4) == pytest.approx(2 * (5e-6 + n * 3 / 4 / 600e9))


def test_ring_all_reduce_takes_2_p_minus_1_steps():
    link = LinkProfile("switch", chips=8, bandwidth_bytes_per_s=450e9, latency_s=2e-6)
    n = 64e6
    assert all_reduce_s(link, n, 8) == pytest.approx(2 * (7 * 2e-6 + n * 7 / 8 / 450e9))
    assert reduce_scatter_s(link, n, 8) + all_gather_s(link, n, 8) == pytest.approx(all_reduce_s(link, n, 8))


def test_one_chip_costs_nothing_and_too_many_is_an_error():
    link = load_profile("maia100").scale_up
    assert all_reduce_s(link, 1e6, 1) == 0.0
    with pytest.raises(ValueError, match="exceeds the 4 chips"):
        all_reduce_s(link, 1e6, 8)


def test_send_recv():
    link = LinkProfile("pcie", chips=1, bandwidth_bytes_per_s=32e9, latency_s=2e-6)
    assert send_recv_s(link, 32e6) == pytest.approx(2e-6 + 1e-3)


def test_more_link_bandwidth_is_never_slower():
    slow = LinkProfile("full_mesh", chips=4, bandwidth_bytes_per_s=100e9, latency_s=5e-6)
    fast = LinkProfile("full_mesh", chips=4, bandwidth_bytes_per_s=200e9, latency_s=5e-6)
    for n in (1e3, 1e6, 1e9):
        assert all_reduce_s(fast, n, 4) <= all_reduce_s(slow, n, 4)


def test_unknown_topology_is_refused():
    with pytest.raises(ValueError, match="unknown topology"):
        LinkProfile("torus", chips=4, bandwidth_bytes_per_s=1e9, latency_s=0)

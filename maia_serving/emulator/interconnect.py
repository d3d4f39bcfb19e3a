"""Alpha-beta costs of collectives over a chip's scale-up links.

The model is Hockney's: a message of ``n`` bytes over one link costs
``alpha + n / beta``. Collective formulas follow Thakur, Rabenseifner and Gropp,
"Optimization of Collective Communication Operations in MPICH" (IJHPCA 2005):

* ring (``switch``, ``ring``, ``pcie``): reduce-scatter and all-gather each take
  ``p - 1`` steps of ``n / p`` bytes; all-reduce is the two in sequence.
* ``full_mesh``: every chip has a direct link to every other, so reduce-scatter and
  all-gather are one step in which each chip sends ``n / p`` bytes to each of its
  ``p - 1`` peers at once, sharing its injection bandwidth among them.

``bandwidth_bytes_per_s`` is a chip's injection bandwidth per direction, the figure
the profiles give.
"""

from __future__ import annotations

from maia_serving.emulator.hardware import LinkProfile


def _check(link: LinkProfile, group: int) -> None:
    if group < 1:
        raise ValueError(f"group size must be at least 1, got {group}")
    if group > link.chips:
        raise ValueError(
            f"a group of {group} chips exceeds the {link.chips} chips that the "
            f"{link.topology} scale-up domain connects"
        )


def _one_phase_s(link: LinkProfile, nbytes: float, group: int) -> float:
    """One reduce-scatter or all-gather phase moving ``nbytes`` in total per chip."""
    if group == 1 or nbytes <= 0:
        return 0.0
    moved = nbytes * (group - 1) / group
    steps = 1 if link.topology == "full_mesh" else group - 1
    return steps * link.latency_s + moved / link.bandwidth_bytes_per_s


def reduce_scatter_s(link: LinkProfile, nbytes: float, group: int) -> float:
    """Reduce-scatter of an ``nbytes`` buffer held by each of ``group`` chips."""
    _check(link, group)
    return _one_phase_s(link, nbytes, group)


def all_gather_s(link: LinkProfile, nbytes: float, group: int) -> float:
    """All-gather whose result is ``nbytes`` on every chip."""
    _check(link, group)
    return _one_phase_s(link, nbytes, group)


def all_reduce_s(link: LinkProfile, nbytes: float, group: int) -> float:
    """All-reduce as reduce-scatter then all-gather (bandwidth-optimal)."""
    _check(link, group)
    return 2 * _one_phase_s(link, nbytes, group)


def send_recv_s(link: LinkProfile, nbytes: float) -> float:
    """Point-to-point transfer to a neighbour, as between pipeline stages."""
    if nbytes <= 0:
        return 0.0
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s

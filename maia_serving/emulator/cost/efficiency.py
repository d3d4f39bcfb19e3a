"""Shape-aware efficiency: small pure functions the CostModel applies to an operator's roofline time.

Each says in its docstring why the device falls short of its peak there; model.py's docstring says
where each is applied.
"""

from __future__ import annotations

import math


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


def expert_imbalance(
    tokens: float,
    top_k: int,
    chips: int,
    experts_per_chip: float,
    chip_shares: tuple[tuple[float, ...], ...] | None = None,
) -> float:
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
    factors = [
        max(1.0, min(cap, max(draws * p + math.sqrt(draws * p * (1 - p)) * spread for p in layer)) / mean)
        for layer in (chip_shares or ((1.0 / chips,) * chips,))
    ]
    return sum(factors) / len(factors)


def exposed_host_s(host_s: float, device_s: float) -> float:
    """The host's launch time the device waits for: max(0, host - device).

    Why: kernel launches are asynchronous, so the host issues the next kernels while the device runs the
    earlier ones; the device only idles when the host issues them slower than it runs them (small models,
    eager mode). CUDA graphs replace a step's launches by one, which is why engines capture decode steps.
    """
    return max(0.0, host_s - device_s)

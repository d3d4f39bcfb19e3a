"""Measure the host as a device profile (``maia-serving calibrate-host``).

The host's peak is what it reaches: matmul FLOP/s per dtype and the bandwidth of
a large copy, measured with torch, so the efficiency factors are 1.0; prefill attention
gets its own, the serving host attention's measured rate against the matmul's. Capacity
is the machine's physical memory.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(dtype_name: str, n: int = 1024, repeats: int = 5) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best_of(lambda: torch.mm(a, b), repeats)


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes read plus bytes written per second for one large tensor copy."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_of(lambda: dst.copy_(src), repeats)


def measure_op_overhead_s(repeats: int = 2000) -> float:
    """Dispatch cost of one tiny torch op: the host's counterpart of a kernel launch."""
    import torch

    x = torch.zeros(8)
    return _best_of(lambda: [x.add_(1) for _ in range(repeats)], 3) / repeats


def measure_attention_flops(tokens: int = 1024, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                            repeats: int = 3) -> float:
    """FLOP/s of one causal prefill through the host attention that serves (``maia_serving.ops``: the
    native kernel where built), counted as the cost model counts attention: ``2 * heads * (2 * head_dim)``
    per attended (query, key) pair. It is no matmul, so the matmul peak overstates it several times."""
    import torch

    from maia_serving import ops

    block = 16
    blocks = -(-tokens // block)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, heads, head_dim, generator=gen).to(torch.bfloat16)
    kv = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    key_cache = torch.zeros(blocks, block, kv_heads, head_dim, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    ops.reshape_and_cache(kv, kv, key_cache, value_cache, torch.arange(tokens))
    tables, lens, starts = torch.arange(blocks)[None], torch.tensor([tokens]), torch.tensor([0, tokens])
    seconds = _best_of(lambda: ops.paged_attention(query, key_cache, value_cache, tables, lens, starts,
                                                   head_dim ** -0.5, max_query_len=tokens), repeats)
    pairs = tokens * (tokens + 1) // 2
    return 2 * heads * (2 * head_dim) * pairs / seconds


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fig(value: float, unit: str, source: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "source": source}


def host_profile_dict() -> dict[str, Any]:
    """The host as a profile data file, every figure measured here and now."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    measured = f"measured by maia-serving calibrate-host on {platform.node()}, {when}"
    bf16 = measure_matmul_flops("bf16") / 1e12  # also what the host attention's rate is a share of
    link = {
        "topology": "pcie",
        "chips": _fig(1, "count", "a single host"),
        "bandwidth": _fig(copy_gbs := measure_copy_bandwidth() / 1e9, "GB/s", measured),
        "latency": _fig(1, "us", "shared memory between processes on one host"),
    }
    return {
        "name": "host",
        "description": f"this host ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "hbm_capacity": _fig(physical_memory_bytes() / 1e9, "GB", "os.sysconf physical pages"),
        "hbm_bandwidth": _fig(copy_gbs, "GB/s", measured + " (torch copy, read + write)"),
        "sram": _fig(0, "MB", "caches not modelled for the host"),
        "peak_compute": {
            "fp32": _fig(measure_matmul_flops("fp32") / 1e12, "TFLOP/s", measured + " (torch.mm 1024^3)"),
            "bf16": _fig(bf16, "TFLOP/s", measured + " (torch.mm 1024^3)"),
        },
        "compute_efficiency": _fig(1.0, "ratio", "the measured rate is already achieved"),
        # Prefill attention at the serving host attention's own rate: priced at the matmul peak, one
        # prefill of 1,024 tokens was predicted at a ninth of its measured time (benchmarks/host_fidelity.py).
        "attention_compute_efficiency": _fig(min(1.0, measure_attention_flops() / (bf16 * 1e12)), "ratio",
                                             measured + " (maia_serving.ops prefill attention, 1,024 tokens, "
                                             "8 heads of 64, against the bf16 matmul)"),
        "memory_efficiency": _fig(1.0, "ratio", "the measured rate is already achieved"),
        "runtime_reserve": _fig(0, "GiB", "none"),
        "kernel_launch": _fig(measure_op_overhead_s() * 1e6, "us", measured + " (a tiny torch op)"),
        "scale_up": link,
        "host_link": link,
    }


def calibrate_host(path: Path) -> dict[str, Any]:
    """Measure the host and write its profile to ``path``."""
    data = host_profile_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data

"""Micro-benchmark of the maia_serving KV-cache kernels on a CUDA GPU.

Reports, per kernel, the time per call and the bytes it must move (inputs read plus outputs
written, from the tensors' dtypes) as GB/s and as a fraction of a given peak bandwidth.
These kernels are memory-bound (decode attention, the cache write, the absmax), so the
fraction of peak is the figure of merit. Without a CUDA GPU it prints why and exits 0.

    python benchmarks/kernels_bench.py --peak-gb-per-s 3350 --kv-cache-dtype fp8_e4m3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# H100 SXM HBM3 bandwidth (NVIDIA H100 datasheet; /work/shared/notes/engines.md).
H100_SXM_PEAK_GB_PER_S = 3350.0


@dataclass(frozen=True)
class BenchResult:
    op: str
    time_us: float
    bytes_moved: int
    gb_per_s: float
    peak_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(op: str, fn: Callable[[], object], bytes_moved: int, peak_gb_per_s: float) -> BenchResult:
    import triton.testing

    time_ms = triton.testing.do_bench(fn, warmup=25, rep=100)
    gb_per_s = bytes_moved / (time_ms * 1e-3) / 1e9
    return BenchResult(op, time_ms * 1e3, bytes_moved, gb_per_s, gb_per_s / peak_gb_per_s)


def run(args: argparse.Namespace) -> list[BenchResult]:
    from maia_serving.ops.fp8 import resolve_kv_cache_dtype
    from maia_serving.ops.triton import kv_absmax, paged_attention, reshape_and_cache

    dev, act = torch.device("cuda"), torch.bfloat16
    fmt = resolve_kv_cache_dtype(args.kv_cache_dtype)
    cache_dtype = torch.uint8 if fmt else act
    g = torch.Generator(device=dev).manual_seed(0)
    kvh, d, bs = args.num_kv_heads, args.head_dim, args.block_size
    pages_per_seq = -(-args.seq_len // bs)
    num_blocks = args.num_seqs * pages_per_seq
    cache_shape = (num_blocks, bs, kvh, d)
    key_cache = torch.zeros(cache_shape, dtype=cache_dtype, device=dev)
    value_cache = torch.zeros_like(key_cache)
    k_scale = v_scale = torch.tensor(0.05, device=dev) if fmt else None
    results = []

    # Cache write: one new token per sequence per step, like a decode batch (and a prefill).
    prefill_tokens = min(8192, num_blocks * bs)
    for op, num_tokens in (
        ("reshape_and_cache.decode", args.num_seqs),
        ("reshape_and_cache.prefill", prefill_tokens),
    ):
        key = torch.randn(num_tokens, kvh, d, generator=g, device=dev, dtype=act)
        value = torch.randn_like(key)
        slots = torch.randperm(num_blocks * bs, device=dev)[:num_tokens]
        moved = _nbytes(key, value, slots) + 2 * num_tokens * kvh * d * key_cache.element_size()
        results.append(
            _measure(
                op,
                lambda k=key, v=value, s=slots: reshape_and_cache(
                    k,
                    v,
                    key_cache,
                    value_cache,
                    s,
                    args.kv_cache_dtype,
                    k_scale,
                    v_scale,
                ),
                moved,
                args.peak_gb_per_s,
            )
        )

    # Decode attention: one query token per sequence over seq_len tokens of context.
    query = torch.randn(args.num_seqs, args.num_heads, d, generator=g, device=dev, dtype=act)
    block_tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(args.num_seqs, -1)
    seq_lens = torch.full((args.num_seqs,), args.seq_len, dtype=torch.int32, device=dev)
    query_start_loc = torch.arange(args.num_seqs + 1, dtype=torch.int32, device=dev)
    out = torch.empty_like(query)
    kv_read = 2 * args.num_seqs * args.seq_len * kvh * d * key_cache.element_size()
    moved = kv_read + _nbytes(query, out, block_tables, seq_lens, query_start_loc)
    results.append(
        _measure(
            "paged_attention.decode",
            lambda: paged_attention(
                query,
                key_cache,
                value_cache,
                block_tables,
                seq_lens,
                query_start_loc,
                d**-0.5,
                args.kv_cache_dtype,
                k_scale,
                v_scale,
                max_query_len=1,
                out=out,
            ),
            moved,
            args.peak_gb_per_s,
        )
    )

    x = torch.randn(8192, kvh, d, generator=g, device=dev, dtype=act)
    results.append(_measure("kv_absmax", lambda: kv_absmax(x), _nbytes(x), args.peak_gb_per_s))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peak-gb-per-s",
        type=float,
        default=H100_SXM_PEAK_GB_PER_S,
        help="peak memory bandwidth to compare with (default: H100 SXM)",
    )
    parser.add_argument("--kv-cache-dtype", default="fp8_e4m3")
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "kernels_bench: skipped, no CUDA GPU here (the Triton interpreter is not a "
            "benchmark); run it on a GPU host."
        )
        return 0
    results = run(args)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
        return 0
    print(f"{torch.cuda.get_device_name()}, kv_cache_dtype={args.kv_cache_dtype}, peak {args.peak_gb_per_s:.0f} GB/s")
    print(f"{'op':<28}{'time_us':>10}{'MB_moved':>10}{'GB_per_s':>10}{'of_peak':>9}")
    for r in results:
        print(f"{r.op:<28}{r.time_us:>10.1f}{r.bytes_moved / 1e6:>10.2f}{r.gb_per_s:>10.0f}{r.peak_fraction:>9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

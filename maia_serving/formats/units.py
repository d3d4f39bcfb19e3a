"""Human-readable figures for logs and tables."""

from __future__ import annotations


def format_bytes(nbytes: float) -> str:
    """Binary units with their IEC labels: "64.00 GiB", "128.00 KiB". HBM stacks are sized in binary gigabytes,
    so a datasheet's "64 GB" of Maia 100 is 64 GiB here, not "68.72 GB"; bandwidths stay decimal (GB/s)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def format_seconds(seconds: float) -> str:
    """Emulated steps of tiny models take microseconds, big ones seconds: "3.2 us", "41.0 ms"."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"

"""Human-readable figures for logs and tables."""

from __future__ import annotations


def format_bytes(nbytes: float) -> str:
    """Decimal units, as datasheets give HBM capacity: "1.84 MB", "141.11 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def format_seconds(seconds: float) -> str:
    """Emulated steps of tiny models take microseconds, big ones seconds: "3.2 us", "41.0 ms"."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"

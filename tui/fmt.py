"""Short, fixed-width renderings of numbers for the dashboard."""
from __future__ import annotations

from dair.units import format_bytes


def human_bytes(n: float | None) -> str:
    """'1.5K', '200M': dair.units.format_bytes in its compact form."""
    return format_bytes(n, compact=True)


def rate(n: float | None) -> str:
    return "-" if n is None else f"{human_bytes(n)}/s"


def ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def span(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}-{last}"

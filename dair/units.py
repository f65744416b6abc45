"""Byte sizes as people read them: the one formatter of every message, table and dashboard."""
from __future__ import annotations

_FULL = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float | None, *, compact: bool = False, unit: str | None = None, digits: int = 1) -> str:
    """'1.5 MiB' (powers of 1024), or '1.5M' with `compact` (fixed-width tables: no decimal from
    100 up). `unit` ("KiB", "MiB", ...) fixes the unit; `digits` the decimals of the full form.
    None is '-'."""
    if n is None:
        return "-"
    x = float(n)
    if unit is not None:
        i = _FULL.index(unit)
        x /= 1024.0 ** i
    else:
        i = 0
        while abs(x) >= 1024 and i < len(_FULL) - 1:
            x /= 1024
            i += 1
    if compact:
        short = _FULL[i][0]
        if i == 0 or abs(x) >= 100 or digits == 0:
            return f"{x:.0f}{short}"
        return f"{x:.{digits}f}{short}"
    return f"{x:.0f} B" if i == 0 else f"{x:.{digits}f} {_FULL[i]}"

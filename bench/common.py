"""Shared bench helpers: device peak memory and the one-table printout every bench ends with."""
from __future__ import annotations

import jax


def peak_bytes() -> float | None:
    """Peak device memory in bytes since process start (None where the backend doesn't report it)."""
    try:
        stats = jax.devices()[0].memory_stats()
        return None if stats is None else stats.get("peak_bytes_in_use")
    except Exception:
        return None


def print_table(name: str, rows) -> None:
    """Print ``rows`` of (label, value) under ``== bench.<name> ==``, labels aligned."""
    rows = [tuple(r) for r in rows]
    width = max(len(r[0]) for r in rows)
    print(f"\n== bench.{name} ==")
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(str(x) for x in r[1:]))

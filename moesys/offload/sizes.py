"""Byte sizes for the user: parse "16GiB" / "512MB" / 17179869184 and print them back readably."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_bytes(value: int | str, *, name: str = "gpu_memory") -> int:
    """Bytes from an int or a string like "16GiB", "4.5 GB", "512MiB" (bare K/M/G/T mean binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int number of bytes or a string like '16GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive number of bytes, e.g. 17179869184 or '16GiB'")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be an int number of bytes or a string like '16GiB', got {type(value).__name__}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a size; write a number of bytes or a number with a unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '16GiB'")
    n = int(float(match.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name}={value!r} must be positive, e.g. '16GiB'")
    return n


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"

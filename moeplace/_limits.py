"""One memory budget for every allocation whose size a file, header or flag declares.

A 2 KB header may declare 10^6 experts; checking the implied allocation before making it is what
keeps a small hostile or corrupt input from taking a machine's memory. Callers estimate bytes
from the declared shape and call ``check_memory`` before allocating.
"""

from __future__ import annotations

import os
import re

from moeplace.errors import InputError

ENV = "MOEPLACE_MAX_MEMORY"
# 1 GiB of declared arrays, plus the interpreter and libraries (~300 MB), stays under the 2 GB
# that any small input may cost; real production shapes (DeepSeek-V3, Kimi-K2 statistics: tens
# of MB) are far below it.
DEFAULT_MAX_BYTES = 1 << 30

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def memory_cap() -> int:
    """Bytes any one declared allocation may take: ``MOEPLACE_MAX_MEMORY`` (e.g. ``8G``) or 1 GiB."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?", raw)
    if not m or float(m.group(1)) <= 0:
        raise InputError(ENV, "value", f"{raw!r} is not a size", f"e.g. {ENV}=8G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def check_memory(nbytes: float, what: str, source: object, field: str) -> None:
    """Refuse (``InputError``) when ``nbytes`` of ``what``, implied by ``field`` of ``source``,
    exceeds the cap; the message gives the estimate and how to raise the cap."""
    cap = memory_cap()
    if nbytes > cap:
        raise InputError(source, field, f"{what} would need about {human_bytes(nbytes)}, above "
                         f"the {human_bytes(cap)} memory cap",
                         f"check the value, or raise the cap with {ENV}=16G if it is real")

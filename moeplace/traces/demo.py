"""Locate the bundled FLAME-MoE-290M sample trace (Apache-2.0) used by demos and tests."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_NAME = "flame_moe_290m_2048tok.parquet"


def demo_trace_path() -> Path:
    """Path of the 2,048-token x 8-layer x top-6 FLAME-MoE-290M sample shipped with moeplace."""
    return Path(str(resources.files("moeplace") / "data" / DEMO_NAME))

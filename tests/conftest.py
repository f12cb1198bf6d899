"""Shared fixtures: the ../shared reference traces (skipped when absent) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from moeplace.traces import Trace, TraceMeta

# CI runs a fixed set of examples so a green or red result reproduces; locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED = Path(os.environ.get("MOEPLACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TRACES = SHARED / "traces"


def shared_file(rel: str) -> Path:
    """Path under ../shared/traces, skipping the test when the reference data is not here."""
    p = TRACES / rel
    if not p.exists():
        pytest.skip(f"reference data {p} not available")
    return p


DEEPSEEK = "deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz"
DEEPSEEK_COUNTS = "deepseek-v2-lite-puffin-prefill/derived_counts.npz"
FLAME = "flame-moe-290m/flame_moe_290m_prefill_2048tok.npz"
FLAME_COUNTS = "flame-moe-290m/derived_counts_prefill_2048tok.npz"
MIXTRAL = "mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz"
QWEN = "qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz"
SWITCH = "switch-base-128-encoder-loads/switch_base_128_encoder_expert_counts.npz"


def random_trace(rng: np.random.Generator, T: int, L: int, N: int, k: int, *,
                 weights: bool = False, requests: int | None = None) -> Trace:
    """Tokens with k distinct experts per layer, optional weights and request ids."""
    e = np.argsort(rng.random((T, L, N)), axis=2)[:, :, :k]
    tokens = {}
    if requests:
        tokens["request"] = np.sort(rng.integers(0, requests, T)).astype(np.int64)
        tokens["position"] = np.arange(T, dtype=np.int32)
    w = rng.random((T, L, k)).astype(np.float32) if weights else None
    meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(range(L)), model="random")
    return Trace(e, meta, w, tokens)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)



def _moeplace_under_test() -> Path:
    import moeplace

    return Path(moeplace.__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """With MOEPLACE_REQUIRE_INSTALLED=1 (CI) insist that the installed package is under test, not
    the source tree, so a wheel that lacks a file cannot pass."""
    if os.environ.get("MOEPLACE_REQUIRE_INSTALLED") == "1":
        where = _moeplace_under_test()
        if where == Path(__file__).resolve().parents[1] / "moeplace":
            raise pytest.UsageError(f"moeplace is imported from the source tree ({where}), not "
                                    "the installed package; install it (pip install '.[dev]') "
                                    "and run the README's test command")


def pytest_report_header(config: pytest.Config) -> str:
    return f"moeplace under test: {_moeplace_under_test()}"

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


# The slowest tests (seconds on a 2-core machine running -n auto), started first: xdist hands tests
# out in collection order a few at a time (the scheduler below), so the run ends on short tests
# instead of one worker still in a 30 s test while the other idles. Only an order: a stale or
# missing entry costs balance, never a test. Node-id prefixes, longest first.
SLOW_FIRST = (
    "tests/test_docs_commands.py::test_documented_commands_run_as_printed",  # 35
    "tests/profiling/test_profile_cli.py::test_bad_config_json_is_one_stderr_line",  # 30
    "tests/integrations/test_sglang_disaggregation.py::",  # 35 (two SGLang instances)
    "tests/solvers/test_static.py::test_deepseek_static_engine_beats_eplb_on_held_out",  # 27
    "tests/profiling/test_transformers_versions.py::",  # 2 x 20
    "tests/solvers/test_interrupts.py::test_signal_stops_every_exact_method_at_every_moment",  # 13-22
    "tests/solvers/test_interrupts.py::test_signal_stops_the_search",  # 13-17
    "tests/solvers/test_time_limits.py::test_sigint_stops_cpsat_solve_and_writes_nothing",  # 16
    "tests/integrations/test_replay_engines.py::",  # 10
    "tests/solvers/test_solvers.py::test_heuristics_never_beat_their_lower_bound",  # 10
    "tests/solvers/test_static.py::test_engine_picks_the_objective_and_exact_methods",  # 10
    "tests/solvers/test_online_kernels.py::test_compiled_search_equals_numpy_search",  # 10 (JIT)
    "tests/placement/test_stack_conformance.py::test_deepseek_v3_preset_to_sglang_rows",  # 10
    "tests/solvers/test_report.py::test_solve_headline_matches_its_json",  # 7-9
    "tests/fuzz/test_fuzz.py::test_flags",  # 9
    "tests/solvers/test_groups.py::test_respecting_groups_is_optimal_among_group_respecting",  # 8
    "tests/integrations/test_engine_oracle.py::",  # 6-7
    "tests/solvers/test_solvers.py::test_exact_backends_match_brute_force",  # 7
    "tests/service/test_service_load.py::test_concurrent_uploads_add_up_exactly",  # 7
    "tests/solvers/test_registry.py::test_exact_methods_prove_what_the_dp_finds",  # 7
    "tests/service/test_service_inproc.py::test_openapi_operations_never_5xx",  # 7
    "tests/service/test_status_page.py::test_status_page_in_a_headless_browser",  # 7
    "tests/fuzz/test_fuzz.py::test_mutated_inputs",  # 2-6
    "tests/solvers/test_solvers.py::test_deepseek_",  # 6
    "tests/solvers/test_time_limits.py::",  # 2-6
    "tests/integrations/test_sglang_hook.py::",  # 6 for the first (SGLang's import)
    "tests/integrations/test_vllm_plugin.py::",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)),
                    len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the rest keep their collection order


# Checks that fork from one engine interpreter (tests/engines.py, one per test process and
# prelude) run on one xdist worker, so that each engine is imported once per run.
ENGINE_GROUPS = {
    "vllm": ("tests/integrations/test_vllm_plugin.py::", "tests/integrations/test_replay_engines.py::",
             "tests/integrations/test_engine_oracle.py::test_eplb_equals_vllm"),
    "sglang-hook": ("tests/integrations/test_sglang_hook.py::",),
    "sglang-boot": ("tests/integrations/test_engine_oracle.py::test_eplb_equals_sglang",
                    "tests/integrations/test_engine_oracle.py::test_sglang_loads"),
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's default (-n without --dist) with the order above kept and the engine groups kept
    together: each test its own unit, each ENGINE_GROUPS entry one unit, handed out in collection
    order as workers free up. (xdist's own loadgroup does not work under pytest 9: the group
    suffix it writes to ``item._nodeid`` is no longer read.)"""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist is xdist's to serve
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((g for g, pre in ENGINE_GROUPS.items() if nodeid.startswith(pre)), nodeid)

    config.option.loadscopereorder = False  # its reorder would put the biggest groups first
    return Scheduling(config, log)


def pytest_report_header(config: pytest.Config) -> str:
    return f"moeplace under test: {_moeplace_under_test()}"

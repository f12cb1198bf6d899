"""The table of methods: every registered method runs through solve_with_report, requests a
method cannot serve are refused from its declared capabilities, and a method registered from
outside the package is callable without editing the front door."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import numpy as np
import pytest

from moeplace.errors import InputError
from moeplace.placement import Placement, contiguous
from moeplace.solvers import Cluster, Weights, lower_bound, registry, score, solve_with_report
from moeplace.solvers.registry import MethodResult, SolveOptions, Solver, register, unregister
from moeplace.solvers.solve import BASELINES, METHODS, baseline
from moeplace.traces import compute_stats
from tests.conftest import random_trace

BUILT_IN = {"search", "dp", "cpsat", "ilp-cbc", "ilp-highs", "moetuner", "eplb",
            "eplb-distinct", "contiguous", "round_robin", "random"}


@pytest.fixture(scope="module")
def tiny():
    # 3 layers x 6 experts on 3 GPUs: every method (the exact ones included) finishes in seconds.
    return compute_stats(random_trace(np.random.default_rng(11), 80, 3, 6, 2), coactivation=True)


def _check_layout(plc: Placement, L: int, N: int, G: int, R: int) -> None:
    """Counted slot by slot, independently of Placement.validate."""
    assert plc.phy2log.shape == (L, N + R)
    S = (N + R) // G
    for row in plc.phy2log:
        counts = Counter(int(e) for e in row)
        assert set(counts) == set(range(N))  # every expert has a copy
        assert sum(counts.values()) == N + R
        for g in range(G):
            on_gpu = [int(e) for e in row[g * S:(g + 1) * S]]
            if not plc.colocated:
                assert len(set(on_gpu)) == S  # no two copies of one expert on one GPU


def test_methods_and_baselines_are_the_registered_ones():
    assert METHODS == ("auto", "search", "dp", "cpsat", "ilp-cbc", "ilp-highs", "moetuner",
                       "eplb", "eplb-distinct", "contiguous", "round_robin", "random")
    assert set(BASELINES) == {"contiguous", "round_robin", "random", "eplb", "eplb-distinct"}
    assert set(registry.names()) >= BUILT_IN
    assert {n for n in BUILT_IN if registry.get(n).baseline} == set(BASELINES)


@pytest.mark.parametrize("method", sorted(BUILT_IN))
def test_every_method_runs_and_returns_a_valid_placement(tiny, method):
    plc, rep = solve_with_report(tiny, Cluster(3), method=method, time_limit=20)
    _check_layout(plc, 3, 6, 3, 0)
    assert rep.method == method and plc.info["method"] == method
    assert plc.info["status"] == rep.status
    # The report scores what came back, and the bound is below it.
    engine = rep.details["engine"]
    assert engine == ("sglang" if method == "search" or registry.get(method).baseline else "exflow")
    assert rep.objective["total"] == pytest.approx(score(tiny, plc, engine=engine).total, abs=1e-9)
    assert rep.bound["total"] <= rep.objective["total"] + 1e-9
    if registry.get(method).baseline:
        assert rep.status == "baseline"


@pytest.mark.parametrize("method", sorted(n for n in BUILT_IN if registry.get(n).replicas))
def test_methods_declaring_replicas_place_them(tiny, method):
    plc, rep = solve_with_report(tiny, Cluster(3, 1, 3), method=method, time_limit=10)
    _check_layout(plc, 3, 6, 3, 3)
    assert rep.bound["total"] <= rep.objective["total"] + 1e-9


def test_exact_methods_prove_what_the_dp_finds(tiny):
    """The proof is about the fitted problem: the method's own placement (``method_objective``,
    ``method_gap``) is the optimum every exact method finds; the held-back check is reported
    beside it, per layer. 80 tokens are too few requests to judge balance on new traffic, so
    every layer takes EPLB's layout (GPUs permuted), as the static search's start comes back."""
    best = solve_with_report(tiny, 3, method="dp")[1].heldout["method_objective"]
    ref = baseline("eplb", tiny, Cluster(3))
    for method in (n for n in BUILT_IN if registry.get(n).exact):
        plc, rep = solve_with_report(tiny, 3, method=method, time_limit=30)
        assert rep.status == "optimal", method
        held = rep.heldout
        assert held["method_objective"] == pytest.approx(best, abs=1e-6)
        assert held["method_gap"] == pytest.approx(0.0, abs=1e-6)
        # The returned placement is scored as returned: never below the proven optimum.
        assert rep.objective["total"] == pytest.approx(score(tiny, plc).total, abs=1e-9)
        assert rep.objective["total"] >= best - 1e-9
        assert held["status"] == "too few requests"
        assert held["num_fallback_layers"] == len(held["fallback_layers"]) > 0
        assert set(held["fallback_layers"]) <= {0, 1, 2}
        # Every layer has EPLB's GPUs, in some order (the listed ones differed before).
        assert all(_same_gpus(plc, ref, l) for l in range(3))
    # With slack the user accepts the risk: the method's optimum comes back unchanged.
    plc, rep = solve_with_report(tiny, 3, method="dp", balance_slack=0.1)
    assert rep.heldout["num_fallback_layers"] == 0
    assert rep.objective["total"] == pytest.approx(best, abs=1e-6)


def _same_gpus(a: Placement, b: Placement, layer: int) -> bool:
    """Whether layer ``layer`` of ``a`` and ``b`` groups the experts into the same GPUs."""
    def groups(p: Placement) -> set[frozenset[int]]:
        S = p.slots_per_gpu
        return {frozenset(int(e) for e in p.phy2log[layer][g * S:(g + 1) * S])
                for g in range(p.num_gpus)}
    return groups(a) == groups(b)


@pytest.mark.parametrize(("method", "kw", "flag"), [
    ("dp", {"cluster": Cluster(3, 1, 3)}, "--replicas"),
    ("cpsat", {"cluster": Cluster(3, 1, 3)}, "--replicas"),
    ("round_robin", {"cluster": Cluster(3, 1, 3)}, "--replicas"),
    ("ilp-highs", {"weights": Weights(coact=1.0)}, "--weights"),
    ("ilp-cbc", {"weights": Weights(coact=1.0)}, "--weights"),
    ("dp", {"weights": Weights(migration=1.0), "current": True}, "--current"),
    ("moetuner", {"weights": Weights(migration=1.0), "current": True}, "--current"),
])
def test_requests_a_method_cannot_serve_are_refused(tiny, method, kw, flag):
    cluster = kw.pop("cluster", Cluster(3))
    if kw.pop("current", False):
        kw["current"] = contiguous(3, 6, 3)
    with pytest.raises(InputError) as exc:
        solve_with_report(tiny, cluster, method=method, time_limit=5, **kw)
    msg = str(exc.value)
    assert "\n" not in msg and flag in msg and method in msg
    # The fix names a method that does declare the capability.
    assert "search" in msg


def test_refusals_follow_the_declared_capabilities(tiny):
    """Every (method, capability) pair: refused exactly when the method does not declare it
    (baselines never for the objective's terms: they optimise none)."""
    cur = contiguous(3, 6, 3)
    asks = {"replicas": (Cluster(3, 1, 3), SolveOptions()),
            "coact": (Cluster(3), SolveOptions(weights=Weights(coact=0.5))),
            "migration": (Cluster(3), SolveOptions(weights=Weights(migration=0.5), current=cur))}
    for name in registry.names():
        solver = registry.get(name)
        for flag, (cluster, options) in asks.items():
            expect = not getattr(solver, flag) and (flag == "replicas" or not solver.baseline)
            try:
                registry.check_supported(solver, cluster, options)
                refused = False
            except InputError:
                refused = True
            assert refused == expect, (name, flag)


def test_baseline_refuses_a_method_that_is_not_one(tiny):
    with pytest.raises(InputError, match="not a baseline"):
        baseline("search", tiny, Cluster(3))
    with pytest.raises(InputError, match="unknown method"):
        baseline("nope", tiny, Cluster(3))
    assert baseline("contiguous", tiny, Cluster(3)) == contiguous(3, 6, 3)


def test_unknown_method_lists_auto_and_the_registered(tiny):
    with pytest.raises(InputError) as exc:
        solve_with_report(tiny, 3, method="nope")
    assert "'auto'" in str(exc.value) and "'search'" in str(exc.value)


class _Reversed(Solver):
    """Experts in reverse id order, S per GPU; says it proved ``claimed``."""

    name = "reversed-for-test"
    exact = False
    claimed = 1e6  # an absurd "bound": only exact methods' bounds may be used
    seen: ClassVar[list[SolveOptions]] = []

    def solve(self, stats, cluster, options):
        type(self).seen.append(options)
        L, N = stats.load.shape
        rows = np.tile(np.arange(N)[::-1], (L, 1))
        return (Placement(rows, cluster.num_gpus, cluster.num_nodes, N),
                MethodResult("reversed", self.claimed, {"note": "from a test"}))


@pytest.fixture
def reversed_method():
    _Reversed.seen = []
    register(_Reversed)
    yield _Reversed
    unregister(_Reversed.name)


def test_a_registered_method_is_callable_without_editing_solve(tiny, reversed_method):
    plc, rep = solve_with_report(tiny, Cluster(3), method="reversed-for-test", time_limit=7,
                                 seed=5, balance_slack=0.25)
    assert plc.phy2log.tolist() == [[5, 4, 3, 2, 1, 0]] * 3
    assert rep.method == "reversed-for-test" and rep.status == "reversed"
    assert rep.details == {"note": "from a test", "engine": "exflow"}  # what it declares
    assert rep.objective["total"] == pytest.approx(score(tiny, plc).total)
    # Not declared exact: its claimed bound is ignored, the general lower bound is reported:
    # between the bound without refinements and the fully refined one (how far its short
    # budget refines it depends on the machine's speed).
    assert (lower_bound(tiny, 3, time_limit=0.0).total - 1e-9 <= rep.bound["total"]
            <= lower_bound(tiny, 3).total + 1e-9)
    # The options arrive as given, with the deadline set when the solve started.
    opts = reversed_method.seen[-1]
    assert (opts.seed, opts.balance_slack, opts.time_limit) == (5, 0.25, 7)
    assert opts.deadline is not None and opts.seconds_left() <= 7
    assert "reversed-for-test" in registry.names()
    # Capabilities it does not declare are refused generically.
    with pytest.raises(InputError, match="--replicas"):
        solve_with_report(tiny, Cluster(3, 1, 3), method="reversed-for-test")


def test_an_exact_method_bound_tightens_the_report(tiny, reversed_method):
    plc, _ = solve_with_report(tiny, 3, method="reversed-for-test")
    reversed_method.exact = True
    reversed_method.claimed = score(tiny, plc).total  # "proved optimal"
    try:
        _, rep = solve_with_report(tiny, 3, method="reversed-for-test")
    finally:
        reversed_method.exact, reversed_method.claimed = False, 1e6
    assert rep.bound["total"] == pytest.approx(score(tiny, plc).total)
    assert rep.gap == pytest.approx(0.0, abs=1e-12)


def test_unregistered_method_is_gone(tiny, reversed_method):
    unregister(reversed_method.name)
    with pytest.raises(InputError, match="unknown method"):
        solve_with_report(tiny, 3, method=reversed_method.name)


def test_register_refuses_bad_names_and_duplicates():
    class Auto(_Reversed):
        name = "auto"

    class Clash(_Reversed):
        name = "search"

    class Abstract(Solver):
        name = "abstract-for-test"

    for cls in (Auto, Clash, Abstract):
        with pytest.raises(ValueError):
            register(cls)
    assert registry.get("search").__class__.__name__ == "SearchSolver"
    assert "abstract-for-test" not in registry.names()


def test_cli_method_choices_are_the_methods():
    # The CLI spells the choices out so `moeplace --help` need not import the solvers; this
    # keeps that list equal to the registry's.
    from moeplace.cli import main

    opt = next(p for p in main.commands["solve"].params if p.name == "method")
    assert tuple(opt.type.choices) == METHODS


def test_auto_takes_dp_only_for_requests_dp_serves(tiny):
    # Small and without replicas: the proven optimum.
    assert solve_with_report(tiny, 3, engine="exflow")[1].method == "dp"
    # The static engines' objective is the search's alone.
    assert solve_with_report(tiny, 3)[1].method == "search"
    # A migration term dp does not have: the search, which does, instead of a refusal.
    cur = contiguous(3, 6, 3)
    plc, rep = solve_with_report(tiny, 3, weights=Weights(migration=1.0), current=cur,
                                 time_limit=5)
    assert rep.method == "search" and rep.details["start"] == "current"
    assert rep.objective["migration_fraction"] == pytest.approx(score(
        tiny, plc, Weights(migration=1.0), cur).migration_fraction)
    assert solve_with_report(tiny, Cluster(3, 1, 3), time_limit=5)[1].method == "search"

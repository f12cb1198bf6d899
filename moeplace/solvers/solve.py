"""The solver front door: pick a method for a cluster, run it, and report objective, bound and gap."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplace._limits import check_memory
from moeplace.errors import InfeasibleError, InputError
from moeplace.models import KNOWN, guess_model
from moeplace.placement import Placement, contiguous, random_placement, round_robin
from moeplace.solvers.baselines import eplb, eplb_distinct
from moeplace.solvers.bounds import lower_bound
from moeplace.solvers.dp import MAX_STATES, num_states, solve_dp
from moeplace.solvers.exact import solve_cpsat, solve_pulp
from moeplace.solvers.groups import expand_groups, group_span, group_stats
from moeplace.solvers.objective import STATIC_ENGINES, Weights, check_engine, score
from moeplace.solvers.search import search
from moeplace.solvers.static import static_search, term_scales
from moeplace.traces import RoutingStats

METHODS = ("auto", "search", "dp", "cpsat", "ilp-cbc", "ilp-highs", "moetuner", "eplb",
           "eplb-distinct", "contiguous", "round_robin", "random")
BASELINES = ("contiguous", "round_robin", "random", "eplb", "eplb-distinct")


def default_groups(stats: RoutingStats, model_shape: str | None = None) -> int | None:
    """The model's expert groups (``n_group``) for EPLB: from the statistics' metadata, else
    from a known model named by ``model_shape`` or the trace; ``None`` when unknown (EPLB then
    runs with 1 group, as vLLM and SGLang do for models without groups)."""
    g = stats.meta.extra.get("n_group")
    if isinstance(g, int) and g > 0:
        return g
    for name in (model_shape, stats.meta.model):
        key = guess_model(name)
        if key is not None and KNOWN[key].num_experts == stats.num_experts:
            return KNOWN[key].n_group
    return None


@dataclass(frozen=True)
class Cluster:
    """GPUs, nodes, and redundant expert copies per layer."""

    num_gpus: int
    num_nodes: int = 1
    replicas: int = 0


@dataclass
class SolveReport:
    """How a placement was found and how good it provably is."""

    method: str
    status: str
    objective: dict[str, float]
    bound: dict[str, float]
    gap: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "status": self.status, "objective": self.objective,
                "bound": self.bound, "gap": self.gap, "seconds": self.seconds,
                "details": self.details}


def check_request(stats: RoutingStats, cluster: Cluster, time_limit: float,
                  current: Placement | None = None) -> None:
    """One-line errors for requests no placement can satisfy."""
    N, G, M, R = stats.num_experts, cluster.num_gpus, cluster.num_nodes, cluster.replicas
    if G < 1 or M < 1:
        raise InputError("solve", "--gpus", f"{G} GPUs in {M} nodes", "give positive counts")
    if G % M:
        raise InfeasibleError(f"{G} GPUs do not split evenly into {M} nodes (use --nodes dividing "
                              "--gpus)")
    if R < 0:
        raise InputError("solve", "--replicas", f"{R} < 0", "give a count >= 0")
    if G > N + R:
        raise InfeasibleError(f"{G} GPUs but only {N + R} expert slots per layer: some GPU would "
                              "be empty (add --replicas or use fewer GPUs)")
    if (N + R) % G:
        raise InfeasibleError(f"{N} experts + {R} replicas = {N + R} slots do not split evenly "
                              f"over {G} GPUs (choose --replicas so (N + R) % G == 0)")
    if R and (N + R) // G > N:
        raise InfeasibleError("more slots per GPU than distinct experts")
    if not time_limit > 0:
        raise InputError("solve", "--time-limit", f"{time_limit} is not positive",
                         "give a time limit in seconds > 0")
    # The search, bounds and scoring keep a few float copies of the [L, N, N] pair counts;
    # refuse up front (with the estimate) rather than fail in the middle of a solve.
    L = stats.num_layers
    pairs = (stats.transitions is not None) + (stats.coactivation is not None)
    check_memory(4 * pairs * L * N * N * 8, f"solving {L} layers x {N} experts",
                 stats.meta.source or "solve", "num_experts")
    if current is not None and (current.num_layers, current.num_experts) != (
            stats.num_layers, stats.num_experts):
        raise InputError(current.source, "phy2log", f"current placement is {current.num_layers} "
                         f"layers x {current.num_experts} experts, statistics are "
                         f"{stats.num_layers} x {stats.num_experts}",
                         "pass the placement that serves this model now")
    if current is not None and current.num_gpus != G:
        raise InputError(current.source, "num_gpus", f"{current.num_gpus} GPUs, asked for {G}",
                         "compare placements on one cluster")


# Runs ``restarts`` searches from seeds seed, seed+1, ... somewhere else (e.g. Ray tasks, see
# moeplace.service.fleet) and returns their ``(placement, report)`` results in seed order.
RestartRunner = Callable[[RoutingStats, Placement, int, int, dict[str, Any]], list[Any]]


def _multi_start(stats: RoutingStats, start: Placement, restarts: int | None,
                 runner: RestartRunner | None = None, **kw: Any) -> tuple[Placement, Any]:
    """Run the search from several seeds in parallel processes (or through ``runner``) and
    keep the best.

    One restart by default: on 2 cores two parallel restarts of the DeepSeek-V3-shape search
    found the same objective (3.938 vs 3.938) and, sharing the cores, ran out of time sooner;
    more restarts pay off on machines with more cores.
    """
    cores = os.cpu_count() or 1
    if restarts is None:
        restarts = 1
    seed = kw.pop("seed", 0)
    if runner is not None:
        results = runner(stats, start, restarts, seed, kw)
    elif restarts <= 1:
        plc, rep = search(stats, start, seed=seed, **kw)
        rep.restarts = 1
        return plc, rep
    # fork: spawn would re-run the caller's __main__, which breaks in REPLs and piped scripts.
    # Solver threads have finished by now (CP-SAT joins its workers before returning).
    elif "fork" in multiprocessing.get_all_start_methods():
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(restarts, cores), mp_context=ctx) as pool:
                futures = [pool.submit(search, stats, start, seed=seed + i, **kw)
                           for i in range(restarts)]
                results = [f.result() for f in futures]
        except BrokenProcessPool:
            results = [search(stats, start, seed=seed + i, **kw) for i in range(restarts)]
    else:
        results = [search(stats, start, seed=seed + i, **kw) for i in range(restarts)]
    weights = kw.get("weights", Weights())
    values = [score(stats, p, weights, kw.get("current")).total for p, _ in results]
    best = int(np.argmin(values))  # ties go to the lowest seed: deterministic
    plc, rep = results[best]
    rep.restarts = restarts
    return plc, rep


def baseline(method: str, stats: RoutingStats, c: Cluster, seed: int = 0,
             num_groups: int | None = None, deadline: float | None = None) -> Placement:
    """A baseline placement (contiguous, round_robin, random, eplb, eplb-distinct) without
    solving or bounds; ``num_groups`` defaults to the model's (``default_groups``)."""
    L, N = stats.load.shape
    if method == "contiguous":
        return contiguous(L, N, c.num_gpus, c.num_nodes, replicas=c.replicas)
    if method == "round_robin":
        if c.replicas:
            raise InputError("solve", "--method", "round_robin has no replica rule",
                             "use contiguous, eplb or search with --replicas")
        return round_robin(L, N, c.num_gpus, c.num_nodes)
    if method == "random":
        return random_placement(L, N, c.num_gpus, c.num_nodes, c.replicas, seed=seed)
    if num_groups is None:
        num_groups = default_groups(stats)
    if method == "eplb-distinct":
        return eplb_distinct(stats.load, c.num_gpus, c.num_nodes, c.replicas, num_groups=num_groups,
                             deadline=deadline)
    return eplb(stats.load, c.num_gpus, c.num_nodes, c.replicas, num_groups=num_groups,
                deadline=deadline)


def solve_with_report(stats: RoutingStats, cluster: Cluster | int, *, method: str = "auto",
                      weights: Weights = Weights(), time_limit: float = 60.0,
                      balance_slack: float = 0.0, current: Placement | None = None,
                      seed: int = 0, num_groups: int | None = None,
                      restarts: int | None = None,
                      respect_groups: int | None = None,
                      restart_runner: RestartRunner | None = None,
                      engine: str = "sglang"
                      ) -> tuple[Placement, SolveReport]:
    """Solve and return the placement with its report (objective, bound, gap, time).

    ``engine`` picks the traffic objective (``objective.ENGINES``): the serving engines' static
    home with DeepEP dispatch (``sglang``, ``vllm``, ``trtllm``: distinct remote GPUs and nodes
    per token) or ``exflow`` (cross-layer pairs). ``search`` optimises either; the exact methods
    and ``moetuner`` optimise the cross-layer objective, so their report is for ``exflow``.

    ``restart_runner`` runs the search's restarts elsewhere (``moeplace.service.fleet``'s Ray
    runner); the best result is kept with ties to the lowest seed either way.

    ``respect_groups=n_group`` only moves whole routing groups (DeepSeek's group-limited
    routing), so the placement can be applied to a checkpoint; see ``solvers.groups``.
    """
    c = Cluster(cluster) if isinstance(cluster, int) else cluster
    if method not in METHODS:
        raise InputError("solve", "--method", f"unknown method {method!r}", f"use one of {METHODS}")
    check_request(stats, c, time_limit, current)
    check_engine(engine)
    if respect_groups:
        return _solve_groups(stats, c, respect_groups, method=method, weights=weights,
                             time_limit=time_limit, balance_slack=balance_slack,
                             current=current, seed=seed, restarts=restarts, engine=engine)
    t0 = time.perf_counter()
    deadline = time.monotonic() + time_limit
    N = stats.num_experts
    if method == "auto":
        small = c.replicas == 0 and num_states(N, c.num_gpus) <= MAX_STATES
        method = "dp" if small and engine not in STATIC_ENGINES else "search"
    if method not in ("search", *BASELINES):
        engine = "exflow"  # what the exact methods and MoETuner optimise
    details: dict[str, Any] = {}
    status = "heuristic"
    bound_total: float | None = None
    if method in BASELINES:
        plc = baseline(method, stats, c, seed, num_groups, deadline)
        status = "baseline"
    elif method == "search":
        # The search keeps copies of one expert on distinct GPUs, so it starts from the
        # rule-respecting EPLB.
        start = baseline("eplb-distinct", stats, c, seed, num_groups, deadline)
        if (current is not None and weights.migration > 0 and current.num_replicas == c.replicas
                and current.num_nodes == c.num_nodes and not current.colocated):
            start = current  # moving away from what serves now must pay for itself
        # Keep a tenth of the budget (at most 5 s) for scoring and bounds after the search.
        budget = time_limit - (time.perf_counter() - t0) - _reserve(time_limit)
        budget = max(budget, 0.05 * time_limit)
        if engine in STATIC_ENGINES and c.replicas == 0 and stats.has_samples:
            plc, srep = static_search(stats, start, traffic=weights.traffic, node=weights.node,
                                      migration=weights.migration, current=current,
                                      balance_slack=balance_slack, time_limit=budget)
            details.update(swaps=srep.swaps, kl_passes=srep.kl_passes,
                           repaired_layers=srep.repaired_layers, stopped=srep.stopped,
                           load_scenarios=srep.scenarios, sampled_tokens=len(stats.token_sample))
            stopped = srep.stopped
        else:
            sw = weights
            if engine in STATIC_ENGINES:
                # Without a token sample (statistics from counts) or with replicas, the static
                # objective's stand-in is the within-layer pair spread (co-activation), if known.
                sw = Weights(load=weights.load, traffic=0.0, node=0.0,
                             migration=weights.migration,
                             coact=(weights.traffic + weights.node
                                    if stats.coactivation is not None else 0.0))
                details["objective_proxy"] = "co-activation pairs" if sw.coact else "balance only"
            plc, rep = _multi_start(stats, start, restarts, weights=sw,
                                    balance_slack=balance_slack, time_limit=budget,
                                    current=current, seed=seed, runner=restart_runner)
            details.update(sweeps=rep.sweeps, swaps=rep.swaps, relabels=rep.relabels,
                           assignments=rep.assignments, stopped=rep.stopped,
                           restarts=rep.restarts)
            stopped = rep.stopped
        details["start"] = "current" if start is current else "eplb-distinct"
        status = "time limit" if stopped == "time limit" else "local optimum"
    else:
        if c.replicas:
            raise InputError("solve", "--replicas", f"--method {method} places each expert once",
                             "use --method search (or auto) with replicas")
        if weights.coact and method not in ("dp", "moetuner", "cpsat"):
            raise InputError("solve", "--weights", f"--method {method} has no co-activation term",
                             "use --method dp, cpsat or search with coact=")
        if current is not None and weights.migration:
            raise InputError("solve", "--current", f"--method {method} has no migration term",
                             "use --method search with --current")
        if method == "moetuner":
            from moeplace.solvers.exact import ExactResult
            from moeplace.solvers.moetuner import solve_moetuner

            plc_mt, st_mt = solve_moetuner(stats, c.num_gpus, c.num_nodes, weights=weights,
                                           time_limit=max(time_limit - _reserve(time_limit),
                                                          0.1))
            res = ExactResult(plc_mt, st_mt, None, None, time.perf_counter() - t0)
        elif method == "dp":
            res = solve_dp(stats, c.num_gpus, c.num_nodes, weights=weights)
        else:
            # Warm start: the better of the default search and a loosely balanced one, from at
            # most a fifth of the budget; the exact model gets the rest (building included)
            # and returns nothing worse than this start.
            eplb_start = baseline("eplb-distinct", stats, c, seed, num_groups, deadline)
            hint_budget = min(10.0, 0.2 * time_limit)
            hints = [search(stats, eplb_start, weights=weights, balance_slack=slack,
                            time_limit=hint_budget / 2)[0] for slack in (0.0, 1.0)]
            hint = min(hints, key=lambda h: score(stats, h, weights).total)
            left = time_limit - (time.perf_counter() - t0) - _reserve(time_limit)
            if method == "cpsat":
                res = solve_cpsat(stats, c.num_gpus, c.num_nodes, weights=weights,
                                  time_limit=max(left, 0.1), hint=hint)
            else:
                res = solve_pulp(stats, c.num_gpus, c.num_nodes, backend=method[4:],
                                 weights=weights, time_limit=max(left, 0.1), hint=hint)
            details.update(start="search", placement_from=res.source,
                           proved="optimal" if res.status == "optimal" else (
                               "lower bound" if res.bound is not None else "nothing"))
        if res.placement is None:
            raise InfeasibleError(f"{method} found no placement within {time_limit:g} s "
                                  f"(status {res.status}); raise --time-limit or use search")
        plc, status, bound_total = res.placement, res.status, res.bound
    obj = score(stats, plc, weights, current, engine)
    bound = engine_bound(stats, c, weights, engine)
    if bound_total is not None and bound_total > bound["total"]:
        bound["total"] = bound_total
    gap = max(0.0, (obj.total - bound["total"]) / max(obj.total, 1e-12))
    details["engine"] = engine
    plc.info = {**plc.info, "method": method, "status": status, "engine": engine}
    _label_layers(plc, stats)
    report = SolveReport(method, status, obj.as_dict(), bound, gap, time.perf_counter() - t0,
                         details)
    return plc, report


def engine_bound(stats: RoutingStats, c: Cluster, weights: Weights, engine: str
                 ) -> dict[str, float]:
    """Lower bounds on each term and the total of ``engine``'s objective."""
    lb = lower_bound(stats, c.num_gpus, c.num_nodes, c.replicas, weights)
    bound = lb.as_dict()
    if engine in STATIC_ENGINES:
        # A token's k experts fill at least ceil(k / slots) GPUs and ceil(k / node slots) nodes;
        # with replicas a token may find all its experts on one GPU.
        k = max(stats.meta.top_k, 1)
        S = (stats.num_experts + c.replicas) // c.num_gpus
        n = c.num_gpus // c.num_nodes
        dg, dn = (-(-k // S), -(-k // (S * n))) if c.replicas == 0 else (1, 1)
        sg, sn = term_scales(stats, c.num_gpus, c.num_nodes)
        bound["traffic_static"] = dg * (1 - 1 / c.num_gpus)
        bound["traffic_static_remote_nodes"] = dn * (1 - 1 / c.num_nodes)
        bound["total"] = (weights.load * lb.load_imbalance_mean + weights.traffic * dg * sg
                          + weights.node * dn * sn + weights.coact * lb.coactivation_spread)
    return bound


def _reserve(time_limit: float) -> float:
    """Seconds of a command's budget kept for bounds and scoring after the solver."""
    return min(5.0, 0.1 * time_limit)


def _label_layers(plc: Placement, stats: RoutingStats) -> None:
    """Carry the statistics' hidden-layer ids, which appliers and exports need."""
    ids = tuple(stats.meta.moe_layer_ids)
    if len(ids) == plc.num_layers:
        plc.moe_layer_ids = ids
    if stats.meta.model:
        plc.info.setdefault("model", stats.meta.model)
    if stats.meta.num_hidden_layers:
        plc.info.setdefault("num_hidden_layers", stats.meta.num_hidden_layers)


def _solve_groups(stats: RoutingStats, c: Cluster, n_group: int, *, current: Placement | None,
                  weights: Weights, **kw: Any) -> tuple[Placement, SolveReport]:
    """Solve over groups as super-experts, expand, and report at expert level."""
    t0 = time.perf_counter()
    span = group_span(stats.num_experts, c.num_gpus, c.num_nodes, n_group, c.replicas)
    if current is not None and weights.migration:
        raise InputError("solve", "--current", "group-respecting solves have no migration term",
                         "drop migration= from --weights")
    gplc, inner = solve_with_report(group_stats(stats, n_group),
                                   Cluster(c.num_gpus // span, c.num_nodes), weights=weights, **kw)
    plc = expand_groups(gplc, n_group, stats.num_experts, c.num_gpus, c.num_nodes, stats.load)
    engine = inner.details.get("engine", "exflow")
    obj = score(stats, plc, weights, current, engine)
    bound = engine_bound(stats, Cluster(c.num_gpus, c.num_nodes), weights, engine)
    details = {**inner.details, "respect_groups": n_group, "group_span_gpus": span,
               "group_status": inner.status, "group_bound": inner.bound["total"]}
    if span == 1 and inner.bound["total"] > bound["total"]:
        # With whole groups per GPU the expert-level objective equals the group-level one, so
        # the group problem's bound holds for every group-respecting placement.
        details["note"] = "bound is over group-respecting placements"
        bound["total"] = inner.bound["total"]
    gap = max(0.0, (obj.total - bound["total"]) / max(obj.total, 1e-12))
    plc.info = {**plc.info, "method": inner.method, "status": inner.status,
                "respect_groups": n_group}
    _label_layers(plc, stats)
    return plc, SolveReport(inner.method, inner.status, obj.as_dict(), bound, gap,
                            time.perf_counter() - t0, details)


def solve(stats: RoutingStats, cluster: Cluster | int, **kw: Any) -> Placement:
    """Best placement found for ``stats`` on ``cluster`` (see ``solve_with_report``).

    Serving stacks call this with statistics they collected; the report is attached as
    ``placement.info["report"]``.
    """
    plc, rep = solve_with_report(stats, cluster, **kw)
    plc.info["report"] = rep.as_dict()
    return plc


def pareto(stats: RoutingStats, cluster: Cluster, slacks: tuple[float, ...] = (
        0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5), **kw: Any) -> list[dict[str, float]]:
    """Traffic-versus-balance frontier: search under increasingly loose balance caps."""
    rows = []
    for s in slacks:
        plc, rep = solve_with_report(stats, cluster, method="search", balance_slack=s, **kw)
        rows.append({"balance_slack": s, "load_imbalance_mean": rep.objective["load_imbalance_mean"],
                     "cross_gpu_pair_fraction": rep.objective["cross_gpu_pair_fraction"],
                     "cross_node_pair_fraction": rep.objective["cross_node_pair_fraction"],
                     "seconds": rep.seconds, "placement": plc})
    # Keep only non-dominated points (no other point is at least as good on both axes).
    def axes(r: dict[str, Any]) -> tuple[float, float]:
        return r["load_imbalance_mean"], r["cross_gpu_pair_fraction"] + r["cross_node_pair_fraction"]

    keep = [r for r in rows if not any(
        o is not r and all(a <= b + 1e-12 for a, b in zip(axes(o), axes(r), strict=True))
        and axes(o) != axes(r) for o in rows)]
    return keep


__all__ = ["BASELINES", "METHODS", "Cluster", "SolveReport", "baseline", "check_request",
           "default_groups", "pareto", "solve", "solve_with_report"]

"""The search as a method: from EPLB with distinct copies (or the placement serving now), with
restarts from several seeds in processes or through a runner (Ray), the best kept (for the
static engines' search, per layer).

Kept apart from ``search`` (the algorithm) so the method's wiring and the algorithm change
independently.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers.baselines import (
    balanced_placement,
    baseline,
    default_groups,
    eplb_distinct,
    eplb_where_distinct,
)
from moeplace.solvers.cost import decode_start_cost, expert_cost
from moeplace.solvers.objective import ENGINES, STATIC_ENGINES, Weights, score
from moeplace.solvers.registry import (
    Cluster,
    MethodResult,
    RestartRunner,
    SolveOptions,
    Solver,
    register,
)
from moeplace.solvers.robust import give_back, too_few_requests
from moeplace.solvers.search import SearchReport, search
from moeplace.solvers.static import StaticReport, combine_restarts, restart_layers, static_search
from moeplace.traces import RoutingStats


def restart_seconds(time_limit: float, restarts: int, workers: int) -> float:
    """Each restart's time limit when ``restarts`` run on ``workers`` at a time, so that all
    of them end within ``time_limit`` (the waves run one after another)."""
    workers = max(1, min(restarts, workers))
    return time_limit / -(-restarts // workers)


def run_restarts(fn: Callable[..., Any], stats: RoutingStats, start: Placement, restarts: int,
                 seed: int, runner: RestartRunner | None, kw: dict[str, Any]) -> list[Any]:
    """``fn(stats, start, seed=seed + i, **kw)`` for ``i < restarts``, in parallel processes (or
    through ``runner``), each within its share of ``kw["time_limit"]``; results in seed order."""
    if runner is not None:
        return list(runner(fn, stats, start, restarts, seed, kw))
    if restarts <= 1:
        return [fn(stats, start, seed=seed, **kw)]
    cores = os.cpu_count() or 1

    def share(workers: int) -> dict[str, Any]:
        if "time_limit" not in kw:
            return kw
        return {**kw, "time_limit": restart_seconds(kw["time_limit"], restarts, workers)}

    # fork: spawn would re-run the caller's __main__, which breaks in REPLs and piped scripts.
    # Solver threads have finished by now (CP-SAT joins its workers before returning).
    if "fork" in multiprocessing.get_all_start_methods():
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(restarts, cores), mp_context=ctx) as pool:
                futures = [pool.submit(fn, stats, start, seed=seed + i, **share(cores))
                           for i in range(restarts)]
                return [f.result() for f in futures]
        except BrokenProcessPool:
            pass
    return [fn(stats, start, seed=seed + i, **share(1)) for i in range(restarts)]


def multi_start(stats: RoutingStats, start: Placement, restarts: int | None,
                runner: RestartRunner | None = None, **kw: Any) -> tuple[Placement, SearchReport]:
    """Run the search from several seeds in parallel processes (or through ``runner``) and
    keep the best (ties to the lowest seed).

    One restart by default: on 2 cores two parallel restarts of the DeepSeek-V3-shape search
    found the same objective (3.938 vs 3.938) and, sharing the cores, ran out of time sooner;
    more restarts pay off on machines with more cores.
    """
    restarts = 1 if restarts is None else restarts
    seed = kw.pop("seed", 0)
    results = run_restarts(search, stats, start, restarts, seed, runner, kw)
    weights = kw.get("weights", Weights())
    values = [score(stats, p, weights, kw.get("current")).total for p, _ in results]
    best = int(np.argmin(values))  # ties go to the lowest seed: deterministic
    plc, rep = results[best]
    rep.restarts = restarts
    return plc, rep


def static_restart(stats: RoutingStats, start: Placement, *, seed: int, first_seed: int,
                   num_restarts: int, **kw: Any) -> tuple[Placement, StaticReport]:
    """Restart ``seed - first_seed`` of ``num_restarts`` of the static search: its share of the
    layers, from a seeded perturbation when it repeats layers (``static.restart_layers``)."""
    layers, seeded = restart_layers(seed - first_seed, num_restarts, start.num_layers)
    return static_search(stats, start, seed=seed if seeded else None, layers=layers, **kw)


def static_multi_start(stats: RoutingStats, start: Placement, restarts: int,
                       runner: RestartRunner | None, seed: int, **kw: Any
                       ) -> tuple[Placement, StaticReport, dict[str, Any]]:
    """The static search as ``restarts`` tasks (the layers split among them, then seeded
    repeats), per layer the best candidate (``static.combine_restarts``); a report summed over
    the restarts and what they gave. One restart is the plain search."""
    if (restarts <= 1 and runner is None) or too_few_requests(stats, kw.get("balance_slack", 0.0)):
        # Too few requests to check balance on: the search returns the start, nothing to share.
        plc, rep = static_search(stats, start, **kw)
        return plc, rep, {}
    results = run_restarts(static_restart, stats, start, restarts, seed, runner,
                           {**kw, "first_seed": seed, "num_restarts": restarts})
    reports = [r for _, r in results]
    combine_kw = {k: v for k, v in kw.items() if k not in ("time_limit", "deadline")}
    plc, owner, steady = combine_restarts(stats, start, reports, **combine_kw)
    rep = StaticReport(
        swaps=sum(r.swaps for r in reports), kl_passes=sum(r.kl_passes for r in reports),
        repaired_layers=sum(r.repaired_layers for r in reports),
        layers_given_back=int((owner < 0).sum()),
        balance_first_layers=int(steady.sum()), scenarios=reports[0].scenarios,
        stopped=("time limit" if any(r.stopped == "time limit" for r in reports)
                 else reports[0].stopped))
    return plc, rep, dict(restarts=restarts,
                          layers_from_restart=[None if o < 0 else seed + int(o) for o in owner])


@register
class SearchSolver(Solver):
    """The layer-sweep search (``moeplace.solvers.search``): every term, replicas included."""

    name = "search"
    replicas = True
    coact = True
    migration = True
    engines = ENGINES
    costs = True
    rank = 10

    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        w, current = options.weights, options.current
        static = options.engine in STATIC_ENGINES
        decode = options.phase == "decode"
        speeds = None if options.gpu_speeds is None else np.asarray(options.gpu_speeds, float)
        if speeds is not None and not (static and cluster.replicas == 0 and stats.has_samples):
            raise InputError("solve", "--gpu-speeds", "only the static engines' search without "
                             "replicas (from a trace) weighs GPU speeds",
                             "use --engine sglang/vllm/trtllm, a trace and no --replicas")
        # What one expert costs its GPU: tokens (prefill) or expected activations per step.
        cost = expert_cost(stats, options.phase, options.tokens_per_step)
        # The search keeps copies of one expert on distinct GPUs, so it starts from the
        # rule-respecting EPLB, on the phase's cost; on unequal GPUs from a packing for them.
        # The start is what a method out of time returns, so no deadline cuts it short (a
        # slice of a short budget once did, on a busy machine: exit 2 for eight small layers).
        if speeds is not None:
            start = balanced_placement(cost, cluster.num_gpus, cluster.num_nodes, speeds)
        elif decode:
            start = eplb_distinct(decode_start_cost(cost, stats.load), cluster.num_gpus,
                                  cluster.num_nodes, cluster.replicas,
                                  num_groups=options.num_groups)
        elif static and cluster.replicas:
            # The static engines are held to EPLB's balance on new traffic: start from the
            # stacks' EPLB itself wherever its layers allow.
            groups = default_groups(stats) if options.num_groups is None else options.num_groups
            start = eplb_where_distinct(stats.load, cluster.num_gpus, cluster.num_nodes,
                                        cluster.replicas, groups)
        else:
            start = baseline("eplb-distinct", stats, cluster, options.seed, options.num_groups)
        if (current is not None and w.migration > 0 and current.num_replicas == cluster.replicas
                and current.num_nodes == cluster.num_nodes and not current.colocated):
            start = current  # moving away from what serves now must pay for itself
        origin = "current" if start is current else (
            "balanced for speeds" if speeds is not None else
            "eplb where distinct" if static and cluster.replicas and not decode
            else "eplb-distinct")
        budget = options.budget(0.05 * options.time_limit)
        if static and cluster.replicas == 0 and stats.has_samples:
            plc, srep, more = static_multi_start(
                stats, start, options.restarts or 1, options.restart_runner, options.seed,
                traffic=w.traffic, node=w.node, load=w.load, migration=w.migration,
                current=current, balance_slack=options.balance_slack, time_limit=budget,
                tokens_per_step=options.tokens_per_step if decode else None, gpu_speeds=speeds)
            details: dict[str, Any] = dict(
                swaps=srep.swaps, kl_passes=srep.kl_passes, repaired_layers=srep.repaired_layers,
                layers_kept_from_start=srep.layers_given_back,
                balance_first_layers=srep.balance_first_layers, stopped=srep.stopped,
                load_scenarios=srep.scenarios, sampled_tokens=len(stats.token_sample),
                start=origin, **more)
            status = "time limit" if srep.stopped == "time limit" else "local optimum"
            return plc, MethodResult(status, None, details, balance_checked=True)
        if static and too_few_requests(stats, options.balance_slack):
            # give_back would return the start whatever the search found: do not search.
            return start, MethodResult("local optimum", None, dict(
                start=origin, layers_kept_from_start=start.num_layers,
                stopped="too few requests to check balance on new traffic"), balance_checked=True)
        if static:
            # Without a token sample (statistics from counts) or with replicas, the static
            # objective's stand-in is the within-layer pair spread (co-activation), if known.
            w = Weights(load=w.load, traffic=0.0, node=0.0, migration=w.migration,
                        coact=(w.traffic + w.node if stats.coactivation is not None else 0.0))
        if decode:  # the layer sweeps balance whatever load they are given
            stats = replace(stats, load=cost)
        plc, rep = multi_start(stats, start, options.restarts, options.restart_runner,
                               weights=w, balance_slack=options.balance_slack,
                               time_limit=budget, current=current, seed=options.seed)
        # This search weighs balance on the fitted load only: for the static engines the
        # held-back request buckets decide which of its layers keep their balance on new
        # traffic, against the start (the layout the co-activation sweep kept copies apart in).
        back = 0
        if static:
            plc, back = give_back(stats, plc, start, options.balance_slack,
                                  options.tokens_per_step if decode else None, speeds)
        details = dict(sweeps=rep.sweeps, swaps=rep.swaps, relabels=rep.relabels,
                       assignments=rep.assignments, stopped=rep.stopped, restarts=rep.restarts,
                       start=origin, layers_kept_from_start=back)
        if static:
            details["objective_proxy"] = "co-activation pairs" if w.coact else "balance only"
        status = "time limit" if rep.stopped == "time limit" else "local optimum"
        # The cross-layer (exflow) search is held to EPLB's held-back balance afterwards, by
        # solve_with_report (solvers.heldout), as every method that does not check it itself.
        return plc, MethodResult(status, None, details, balance_checked=static)

"""The solver front door: pick a method for a cluster, run it, and report objective, bound and gap."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

# The methods register themselves when their modules load: these imports fill the table.
import moeplace.solvers.exact
import moeplace.solvers.moetuner
import moeplace.solvers.search_solver  # noqa: F401
from moeplace._limits import check_memory
from moeplace.errors import InfeasibleError, InputError
from moeplace.placement import Placement
from moeplace.solvers.baselines import baseline, default_groups
from moeplace.solvers.bounds import distinct_bound, lower_bound
from moeplace.solvers.cost import expert_cost, speed_load_bound, unequal_speeds
from moeplace.solvers.dispatch import check_kernel, default_kernel
from moeplace.solvers.dp import MAX_STATES, num_states
from moeplace.solvers.groups import expand_groups, group_span, group_stats
from moeplace.solvers.heldout import BASELINE, BY_METHOD, HeldOut, hold_balance, measure, reference_name
from moeplace.solvers.kernel_bounds import copy_bound, placement_copies, priced_bound
from moeplace.solvers.objective import STATIC_ENGINES, Weights, check_engine, score
from moeplace.solvers.registry import (
    Cluster,
    MethodResult,
    RestartRunner,
    SolveOptions,
    Solver,
    check_supported,
    get,
    names,
    reserve_seconds,
)
from moeplace.traces import RoutingStats
from moeplace.traces._kernels import count_into

# The built-in methods as registered ("auto" picks dp or search), and the baselines among them.
METHODS = ("auto", *names())
BASELINES = names(baseline=True)


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
    # Balance on the held-back request buckets against EPLB, and any per-layer fallback
    # (``solvers.heldout.HeldOut.as_dict``); ``status`` and ``gap`` above are the returned
    # placement's, ``heldout["method_objective"]``/``["method_gap"]`` the method's own.
    heldout: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "status": self.status, "objective": self.objective,
               "bound": self.bound, "gap": self.gap, "seconds": self.seconds,
               "details": self.details}
        if self.heldout is not None:
            out["heldout"] = self.heldout
        return out


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
    # The static search's swap tables: about eight [scenarios, N, N] float arrays per round.
    scenarios = 0 if stats.load_buckets is None else 1 + stats.load_buckets.shape[0] // 2
    check_memory(4 * pairs * L * N * N * 8 + 8 * scenarios * N * N * 8,
                 f"solving {L} layers x {N} experts", stats.meta.source or "solve",
                 "num_experts")
    if current is not None and (current.num_layers, current.num_experts) != (
            stats.num_layers, stats.num_experts):
        raise InputError(current.source, "phy2log", f"current placement is {current.num_layers} "
                         f"layers x {current.num_experts} experts, statistics are "
                         f"{stats.num_layers} x {stats.num_experts}",
                         "pass the placement that serves this model now")
    if current is not None and current.num_gpus != G:
        raise InputError(current.source, "num_gpus", f"{current.num_gpus} GPUs, asked for {G}",
                         "compare placements on one cluster")


def solve_with_report(stats: RoutingStats, cluster: Cluster | int, *, method: str = "auto",
                      weights: Weights = Weights(), time_limit: float = 60.0,
                      balance_slack: float = 0.0, current: Placement | None = None,
                      seed: int = 0, num_groups: int | None = None,
                      restarts: int | None = None,
                      respect_groups: int | None = None,
                      restart_runner: RestartRunner | None = None,
                      engine: str = "sglang", phase: str = "prefill",
                      tokens_per_step: int = 4096,
                      gpu_speeds: Sequence[float] | np.ndarray | None = None,
                      kernel: str | None = None, sim: tuple[Any, Any] | None = None
                      ) -> tuple[Placement, SolveReport]:
    """Solve and return the placement with its report (objective, bound, gap, time).

    ``method`` is ``"auto"`` (dp when its state space is small and it serves the request:
    no replicas, no migration term; else search) or a registered method
    (``registry.names()``). ``restart_runner`` runs the search's restarts elsewhere
    (``moeplace.service.fleet``'s Ray runner); the best result is kept with ties to the lowest
    seed either way.

    ``engine`` picks the traffic objective (``objective.ENGINES``): the serving engines' static
    home with DeepEP dispatch (``sglang``, ``vllm``, ``trtllm``: distinct remote GPUs and nodes
    per token) or ``exflow`` (cross-layer pairs). ``search`` optimises either; the exact methods
    and ``moetuner`` optimise the cross-layer objective, so their report is for ``exflow``.

    ``phase="decode"`` balances the expected active experts per step of ``tokens_per_step``
    tokens (memory-bound decode) instead of tokens; ``gpu_speeds`` (one factor per GPU) balances
    GPU time, load / speed. Both are ``search``'s (``Solver.costs``).

    ``respect_groups=n_group`` only moves whole routing groups (DeepSeek's group-limited
    routing), so the placement can be applied to a checkpoint; see ``solvers.groups``.

    ``kernel`` (``dispatch.KERNELS``; default: the engine and phase's, ``dispatch.
    default_kernel``) is the dispatch kernel whose copies the report counts and bounds
    (``solvers.kernel_bounds``: ``nvlink_copies_per_token``, ``rdma_copies_per_token``,
    ``copies_per_token`` in ``objective`` and ``bound``); with ``sim = (Hardware, ModelShape)``
    the bound adds the priced ``dispatch_us`` and ``combine_us``. The weights are used as given
    (the command line zeroes the traffic weights under deepep-ll).
    """
    num_gpus = cluster.num_gpus if isinstance(cluster, Cluster) else int(cluster)
    options = SolveOptions(weights=weights, time_limit=time_limit, balance_slack=balance_slack,
                           current=current, seed=seed, num_groups=num_groups, restarts=restarts,
                           restart_runner=restart_runner, engine=engine, phase=phase,
                           tokens_per_step=tokens_per_step,
                           gpu_speeds=_speeds(gpu_speeds, num_gpus), kernel=kernel, sim=sim)
    return solve_with_options(stats, cluster, options, method=method,
                              respect_groups=respect_groups)


def solve_with_options(stats: RoutingStats, cluster: Cluster | int, options: SolveOptions, *,
                       method: str = "auto", respect_groups: int | None = None
                       ) -> tuple[Placement, SolveReport]:
    """``solve_with_report`` with the method's options already gathered (the deadline is set
    here, when the solve starts)."""
    c = Cluster(cluster) if isinstance(cluster, int) else cluster
    if method != "auto" and method not in names():
        raise InputError("solve", "--method", f"unknown method {method!r}",
                         f"use one of {('auto', *names())}")
    check_request(stats, c, options.time_limit, options.current)
    check_engine(options.engine)
    if options.kernel is not None:
        check_kernel(options.kernel, "--dispatch")
    if respect_groups:
        return _solve_groups(stats, c, respect_groups, method, options)
    t0 = time.perf_counter()
    options = options.started()
    if method == "auto":
        small = c.replicas == 0 and num_states(stats.num_experts, c.num_gpus) <= MAX_STATES
        method = ("dp" if small and options.engine in get("dp").engines
                  and _serves(get("dp"), c, options) else "search")
    solver = get(method)
    check_supported(solver, c, options)
    if not solver.baseline and options.engine not in solver.engines:
        options = replace(options, engine=solver.engines[0])  # what the method optimises
    plc, res = solver.solve(stats, c, options)
    engine = options.engine
    own = plc
    plc, held = _hold_balance(stats, c, options, solver, plc, res)
    obj = score(stats, plc, options.weights, options.current, engine, options.phase,
                options.tokens_per_step, _array(options.gpu_speeds))
    bound = engine_bound(stats, c, options, engine)
    if solver.exact and res.bound is not None and res.bound > bound["total"]:
        bound["total"] = res.bound
    gap = max(0.0, (obj.total - bound["total"]) / max(obj.total, 1e-12))
    # The method's proof and status are about its own placement on the fitted problem: keep
    # that objective and gap beside the returned placement's.
    own_total = obj.total if plc is own else score(
        stats, own, options.weights, options.current, engine, options.phase,
        options.tokens_per_step, _array(options.gpu_speeds)).total
    held.method_objective = own_total
    held.method_gap = max(0.0, (own_total - bound["total"]) / max(own_total, 1e-12))
    # A copy: a method may hand back its start, which can be the caller's current placement.
    plc = replace(plc, info={**plc.info, "method": method, "status": res.status,
                             "engine": engine})
    _label_layers(plc, stats)
    report = SolveReport(method, res.status, {**obj.as_dict(), **kernel_terms(
        stats, plc, _kernel(options, engine))}, bound, gap, time.perf_counter() - t0,
        {**res.details, "engine": engine}, held.as_dict())
    return plc, report


def _hold_balance(stats: RoutingStats, c: Cluster, options: SolveOptions, solver: Solver,
                  plc: Placement, res: MethodResult) -> tuple[Placement, HeldOut]:
    """Every method's placement held to EPLB's balance on the held-back request buckets
    (``solvers.heldout``): measured for baselines and for methods that checked it
    themselves, layers falling back to EPLB's layout for the others."""
    name = reference_name(c.replicas)
    # Without a deadline: EPLB is fast, and the check must not fail a solve that succeeded.
    ref = baseline(name, stats, c, num_groups=options.num_groups)
    decode = options.tokens_per_step if options.phase == "decode" else None
    speeds = _array(options.gpu_speeds)
    if solver.baseline or res.balance_checked:
        held = measure(stats, plc, ref, name, BASELINE if solver.baseline else BY_METHOD,
                       decode, speeds)
        if res.balance_checked:
            held.num_fallback_layers = int(res.details.get("layers_kept_from_start", 0)
                                           + res.details.get("balance_first_layers", 0))
        return plc, held
    # The balance-first layouts get what the method left of its budget and a share of the
    # reserve (bounds and scoring take the rest).
    reserve = reserve_seconds(options.time_limit)
    seconds = max(0.3 * reserve, options.seconds_left() - reserve)
    return hold_balance(stats, plc, ref, name, balance_slack=options.balance_slack,
                        weights=options.weights, current=options.current,
                        tokens_per_step=decode, speeds=speeds, seconds=seconds)


def _speeds(speeds: Sequence[float] | np.ndarray | None, num_gpus: int
            ) -> tuple[float, ...] | None:
    """Validated speed factors, or None when all are equal (the speed-blind path, exactly)."""
    sp = unequal_speeds(speeds, num_gpus)
    return None if sp is None else tuple(float(x) for x in sp)


def _array(speeds: tuple[float, ...] | None) -> np.ndarray | None:
    return None if speeds is None else np.asarray(speeds, float)


def engine_bound(stats: RoutingStats, c: Cluster, options: SolveOptions, engine: str
                 ) -> dict[str, Any]:
    """Lower bounds on each term and the total of ``engine``'s objective (the balance term on
    the phase's cost and the GPUs' speeds), and on what the dispatch kernel pays
    (``dispatch``: ``nvlink_copies_per_token``, ``rdma_copies_per_token``, ``copies_per_token``;
    with ``options.sim``, ``dispatch_us`` and ``combine_us``; ``solvers.kernel_bounds``)."""
    weights = options.weights
    # The bounds' flow and eigenvalue refinements share the time the solve kept for itself.
    seconds = min(3.0, 0.6 * reserve_seconds(options.time_limit))
    lb = lower_bound(stats, c.num_gpus, c.num_nodes, c.replicas, weights, time_limit=seconds / 2)
    kernel = _kernel(options, engine)
    bound: dict[str, Any] = {**lb.as_dict(), "engine": engine, "phase": options.phase,
                             "dispatch": kernel}
    S = (stats.num_experts + c.replicas) // c.num_gpus
    balance = lb.load_imbalance_mean
    if options.phase != "prefill" or options.gpu_speeds is not None:
        cost = expert_cost(stats, options.phase, options.tokens_per_step)
        sp = _array(options.gpu_speeds)
        # speed_load_bound holds for real-valued costs (the integer-count refinements of
        # lower_bound do not); with replicas only the trivial bound is known.
        sp = np.ones(c.num_gpus) if sp is None else sp
        balance = float(speed_load_bound(cost, sp, S).mean()) if c.replicas == 0 else 1.0
        if options.phase == "decode":
            bound["active_experts_imbalance"] = balance
        else:
            bound["load_imbalance_mean"] = balance
        bound["total"] += weights.load * (balance - lb.load_imbalance_mean)
    sample = stats.token_sample
    has_sample = sample is not None and len(sample) > 0
    distinct = None
    if c.replicas == 0 and has_sample:
        # The static terms and the kernel's copies are measured on the token sample, so its
        # pair counts bound a token's distinct GPUs and nodes, per layer.
        assert sample is not None
        L, N = stats.load.shape
        co = np.zeros((L, N, N), np.int64)
        count_into(sample, np.zeros((L, N), np.int64), None, co)
        distinct = distinct_bound(co, len(sample), _fewest_experts(sample), c.num_gpus,
                                  c.num_nodes, S, time_limit=seconds / 2)
    if engine in STATIC_ENGINES:
        # A token's k experts fill at least ceil(k / slots) GPUs and ceil(k / node slots) nodes;
        # with replicas a token may find all its experts on one GPU.
        k = max(stats.meta.top_k, 1)
        n = c.num_gpus // c.num_nodes
        dg, dn = (-(-k // S), -(-k // (S * n))) if c.replicas == 0 else (1, 1)
        rg, rn = dg * (1 - 1 / c.num_gpus), dn * (1 - 1 / c.num_nodes)
        if distinct is not None:
            rg = max(rg, (1 - 1 / c.num_gpus) * float(distinct[0].mean()))
            if c.num_nodes > 1:
                rn = max(rn, (1 - 1 / c.num_nodes) * float(distinct[1].mean()))
        bound["traffic_static"] = rg
        bound["traffic_static_remote_nodes"] = rn
        # The same normalisation as objective.score: traffic_static / k, remote nodes over
        # min(k, M - 1).
        bound["total"] = (weights.load * balance + weights.traffic * rg / k
                          + (weights.node * rn / min(k, c.num_nodes - 1)
                             if c.num_nodes > 1 else 0.0)
                          + weights.coact * lb.coactivation_spread)
    if has_sample:
        assert sample is not None
        copies = copy_bound(sample, stats.num_experts, kernel, c.num_gpus, c.num_nodes,
                            c.replicas, distinct)
        bound.update(copies.as_dict())
        if options.sim is not None:
            hw, shape = options.sim
            bound["dispatch_us"], bound["combine_us"] = priced_bound(
                copies, hw, shape.hidden_size, options.tokens_per_step, c.num_gpus, c.num_nodes)
    return bound


def _kernel(options: SolveOptions, engine: str) -> str:
    """The dispatch kernel of a solve: the one asked for, else the engine and phase's."""
    return options.kernel or default_kernel(engine, options.phase)


def _fewest_experts(sample: np.ndarray) -> int:
    """The fewest distinct experts any sampled token has in a layer (its top-k, unless a
    router repeated an expert), the k the distinct-GPU bounds may assume."""
    srt = np.sort(sample, axis=2)
    return int((1 + (srt[:, :, 1:] != srt[:, :, :-1]).sum(axis=2)).min())


def kernel_terms(stats: RoutingStats, placement: Placement, kernel: str) -> dict[str, Any]:
    """What ``placement`` pays under ``kernel`` per token and MoE layer on the token sample,
    homes uniform (``kernel_bounds.placement_copies``, the quantities ``engine_bound``
    bounds); only ``dispatch`` without a sample."""
    out: dict[str, Any] = {"dispatch": kernel}
    sample = stats.token_sample
    if sample is None or len(sample) == 0:
        return out
    nv, net = placement_copies(sample, placement, kernel)
    out.update(nvlink_copies_per_token=float(nv.mean()), rdma_copies_per_token=float(net.mean()),
               copies_per_token=float((nv + net).mean()))
    return out


def _serves(solver: Solver, c: Cluster, options: SolveOptions) -> bool:
    """Whether ``solver`` declares everything the request needs (auto falls back otherwise)."""
    try:
        check_supported(solver, c, options)
    except InputError:
        return False
    return True


def _label_layers(plc: Placement, stats: RoutingStats) -> None:
    """Carry the statistics' hidden-layer ids, which appliers and exports need."""
    ids = tuple(stats.meta.moe_layer_ids)
    if len(ids) == plc.num_layers:
        plc.moe_layer_ids = ids
    if stats.meta.model:
        plc.info.setdefault("model", stats.meta.model)
    if stats.meta.num_hidden_layers:
        plc.info.setdefault("num_hidden_layers", stats.meta.num_hidden_layers)


def _solve_groups(stats: RoutingStats, c: Cluster, n_group: int, method: str,
                  options: SolveOptions) -> tuple[Placement, SolveReport]:
    """Solve over groups as super-experts, expand, and report at expert level."""
    t0 = time.perf_counter()
    span = group_span(stats.num_experts, c.num_gpus, c.num_nodes, n_group, c.replicas)
    current, weights = options.current, options.weights
    if current is not None and weights.migration:
        raise InputError("solve", "--current", "group-respecting solves have no migration term",
                         "drop migration= from --weights")
    if options.gpu_speeds is not None:
        raise InputError("solve", "--gpu-speeds", "group-respecting solves place groups on "
                         "equal GPUs", "drop --gpu-speeds or --respect-groups")
    # The group problem has its own experts and groups: no current placement, n_group or
    # restart runner carries over to it.
    inner_options = replace(options, current=None, num_groups=None, restart_runner=None,
                            deadline=None)
    gplc, inner = solve_with_options(group_stats(stats, n_group),
                                     Cluster(c.num_gpus // span, c.num_nodes), inner_options,
                                     method=method)
    plc = expand_groups(gplc, n_group, stats.num_experts, c.num_gpus, c.num_nodes, stats.load)
    engine = inner.details.get("engine", options.engine)
    obj = score(stats, plc, weights, current, engine, options.phase, options.tokens_per_step,
                _array(options.gpu_speeds))
    bound = engine_bound(stats, Cluster(c.num_gpus, c.num_nodes), options, engine)
    details = {**inner.details, "respect_groups": n_group, "group_span_gpus": span,
               "group_status": inner.status, "group_bound": inner.bound["total"]}
    if span == 1 and inner.bound["total"] > bound["total"]:
        # With whole groups per GPU the expert-level objective equals the group-level one, so
        # the group problem's bound holds for every group-respecting placement.
        details["note"] = "bound is over group-respecting placements"
        bound["total"] = inner.bound["total"]
    gap = max(0.0, (obj.total - bound["total"]) / max(obj.total, 1e-12))
    plc.info = {**plc.info, "method": inner.method, "status": inner.status,
                "respect_groups": n_group, "engine": engine}
    _label_layers(plc, stats)
    # The held-back check ran on the group problem (groups as super-experts).
    held = None if inner.heldout is None else {**inner.heldout, "level": "groups"}
    objective = {**obj.as_dict(), **kernel_terms(stats, plc, _kernel(options, engine))}
    return plc, SolveReport(inner.method, inner.status, objective, bound, gap,
                            time.perf_counter() - t0, details, held)


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


__all__ = ["BASELINES", "METHODS", "Cluster", "SolveOptions", "SolveReport", "baseline",
           "check_request", "default_groups", "pareto", "solve", "solve_with_options",
           "solve_with_report"]

"""Exact placement models for small instances: the weighted objective as a MILP (PuLP: CBC, HiGHS)
and as a CP-SAT model, warm-started, with status, incumbent, bound and gap reported.

Variables: x[l,e,g] (expert e of layer l on GPU g), M_l (max GPU load of layer l), z[l,a,b,g]
(a at l and b at l+1 both on g) and zn[l,a,b,m] (both on node m), only for pairs that occur.
Objective: ``load/L * sum_l M_l/mean_l + traffic * (1 - sum T z / T_tot) + node * (1 - sum T zn
/ T_tot)``, the same as ``objective.score`` for placements without replicas.
"""

from __future__ import annotations

import itertools
import math
import time
from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from moeplace._interrupts import on_interrupt
from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers._exact_common import (
    ExactResult,
    canonical_gpu,
    check_split,
    keep_better,
    method_result,
    placement_from,
)
from moeplace.solvers._stoppable import STOP_GRACE_S, OutOfTime, check_deadline, run_stoppable
from moeplace.solvers.baselines import baseline
from moeplace.solvers.milp import solve_milp
from moeplace.solvers.objective import Weights, score
from moeplace.solvers.registry import Cluster, MethodResult, SolveOptions, Solver, register
from moeplace.solvers.search import search
from moeplace.traces import RoutingStats

BACKENDS = ("cpsat", "cbc", "highs")


def _pairs(stats: RoutingStats) -> list[tuple[int, int, int, float]]:
    if stats.transitions is None:
        return []
    l, a, b = np.nonzero(stats.transitions)
    t = stats.transitions
    return [(int(x), int(y), int(z), float(t[x, y, z])) for x, y, z in zip(l, a, b, strict=True)]



def min_max_partition(load: np.ndarray, G: int, time_limit: float, workers: int = 1
                      ) -> tuple[np.ndarray, int, bool]:
    """Split one layer's experts into G groups of N/G minimising the heaviest group's load.

    Returns (group of each expert, that load, proven optimal). Groups are numbered by their
    smallest expert (symmetry cut); the greedy heaviest-to-lightest split is the warm start.
    """
    from ortools.sat.python import cp_model

    N = load.shape[0]
    S = N // G
    hint = np.zeros(N, np.int64)
    cl = np.zeros(G)
    room = np.full(G, S)
    for e in np.argsort(-load, kind="stable"):
        c = min((c for c in range(G) if room[c]), key=lambda c: cl[c])
        hint[e], cl[c], room[c] = c, cl[c] + load[e], room[c] - 1
    relabel = np.empty(G, np.int64)
    relabel[np.argsort([np.flatnonzero(hint == c).min() for c in range(G)])] = np.arange(G)
    hint = relabel[hint]
    m = cp_model.CpModel()
    x = [[m.new_bool_var("") for _ in range(G)] for _ in range(N)]
    for e in range(N):
        m.add_exactly_one(x[e])
        for c in range(e + 1, G):
            m.add(x[e][c] == 0)
        for c in range(G):
            m.add_hint(x[e][c], int(hint[e] == c))
    for c in range(G):
        m.add(sum(x[e][c] for e in range(N)) == S)
    top = m.new_int_var(0, int(load.sum()), "")
    for c in range(G):
        m.add(top >= sum(int(load[e]) * x[e][c] for e in range(N)))
    m.minimize(top)
    solver = cp_model.CpSolver()
    # Python keeps SIGINT: Ctrl-C stops the search through stop_search (see _stoppable).
    solver.parameters.catch_sigint_signal = False
    solver.parameters.max_time_in_seconds = max(time_limit, 0.05)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    with on_interrupt(stop=solver.stop_search):  # short, but a signal need not wait for it
        st = solver.solve(m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, int(max(load[hint == c].sum() for c in range(G))), False
    groups = np.array([next(c for c in range(G) if solver.value(x[e][c])) for e in range(N)])
    return groups, int(solver.objective_value), st == cp_model.OPTIMAL


def _min_max_load(load: np.ndarray, G: int, time_limit: float) -> int:
    """Proven per-layer minimum of the heaviest GPU's load (0 when not proven in time): a valid
    floor for that layer's max-load variable."""
    _, value, proven = min_max_partition(load, G, time_limit)
    return value if proven else 0


# The partition-chain model is built when it has at most this many arc variables (Mixtral's
# shape: 105 partitions, 105 * 105 * 31 = 341,775) and GPUs few enough to enumerate matchings.
MAX_CHAIN_ARCS = 500_000
MAX_CHAIN_GPUS = 6


def _partitions(items: tuple[int, ...], S: int) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Every split of ``items`` into blocks of S, blocks ordered by their smallest item."""
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, S - 1):
        left = tuple(e for e in rest if e not in others)
        for tail in _partitions(left, S):
            yield ((first, *others), *tail)


def _num_partitions(num_experts: int, num_gpus: int) -> int:
    S = num_experts // num_gpus
    return math.factorial(num_experts) // (math.factorial(S) ** num_gpus * math.factorial(num_gpus))


def chain_size(num_layers: int, num_experts: int, num_gpus: int) -> int:
    """Arc variables of the partition-chain model: (unordered partitions)^2 per layer pair."""
    return _num_partitions(num_experts, num_gpus) ** 2 * max(num_layers - 1, 1)


def chain_applies(num_layers: int, num_experts: int, num_gpus: int, num_nodes: int,
                  weights: Weights) -> bool:
    """Whether the partition-chain model is exact (no node term) and small enough to build:
    its arcs, and the [P, P, G!, G] matching costs of one layer pair (at most 1 GiB)."""
    if (num_nodes > 1 and weights.node) or num_gpus > MAX_CHAIN_GPUS:
        return False
    P = _num_partitions(num_experts, num_gpus)
    return (chain_size(num_layers, num_experts, num_gpus) <= MAX_CHAIN_ARCS
            and P * P * math.factorial(num_gpus) * num_gpus * 8 <= 1 << 30)



def _cpsat_solve(solver, model, deadline: float):  # type: ignore[no-untyped-def]
    """Solve with what is left of the budget, stoppable by Ctrl-C (returns None when the
    budget was gone before the search could start)."""
    left = deadline - time.monotonic()
    if left <= 0.05:
        return None
    solver.parameters.max_time_in_seconds = float(left)
    status = run_stoppable(lambda: solver.solve(model), solver.stop_search,
                           deadline + STOP_GRACE_S, "cpsat")
    return status


def _finish_cpsat(stats: RoutingStats, solver, status, plc_fn, weights: Weights, const: float,
                  n_terms: int, scale: float, t0: float, hint: Placement | None) -> ExactResult:
    """Common tail of both CP-SAT models: decode, score exactly, and bound (``n_terms``: most
    objective terms nonzero at once, each off by at most half a unit after scaling). A warm
    start that scores better than what CP-SAT returns (it may drop a partial hint, or run out
    of time) is kept."""
    from ortools.sat.python import cp_model

    if status is None:
        return keep_better(stats, ExactResult(None, "time limit", None, None, 0.0), hint, weights,
                           "cpsat", t0)
    name = solver.status_name(status).lower()
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        name = "time limit" if name == "unknown" else name
        return keep_better(stats, ExactResult(None, name, None, None, 0.0), hint, weights,
                           "cpsat", t0)
    # Rounding each coefficient moves the scaled objective by at most 0.5/scale per term.
    slack = 0.5 * n_terms / scale
    bound = solver.best_objective_bound / scale + const - slack
    return keep_better(stats, ExactResult(plc_fn(), name, None, bound, 0.0), hint, weights,
                       "cpsat", t0)


def _solve_cpsat_chain(stats: RoutingStats, G: int, *, weights: Weights, deadline: float,
                       hint: Placement | None, scale: float) -> ExactResult:
    """CP-SAT over one unordered partition per layer, consecutive layers linked by a flow.

    On one node a layer's load term depends only on how its experts are grouped, and the
    traffic between two layers only on the best matching of their groups onto GPUs (a GPU keeps
    its group of layer l and takes the matched group of layer l+1). ``X[l,p]`` picks layer l's
    partition, ``Y[l,p,q]`` the arc from p to q, whose cost is that matching's cross-GPU pairs.
    GPU labels never appear, so the G!-fold relabelling symmetry that stalls the expert-level
    model is gone, and the flow's LP relaxation is a shortest path, hence integral.
    """
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    L, N = stats.load.shape
    S = N // G
    blocks = list(itertools.combinations(range(N), S))
    index = {b: k for k, b in enumerate(blocks)}
    parts = np.array([[index[b] for b in p] for p in _partitions(tuple(range(N)), S)])  # [P, G]
    P = len(parts)
    member = np.zeros((len(blocks), N), np.int64)
    for k, b in enumerate(blocks):
        member[k, list(b)] = 1
    perms = np.array(list(itertools.permutations(range(G))))  # [G!, G]
    load = stats.load.astype(np.float64)
    mean = load.sum(axis=1) / G
    m = cp_model.CpModel()
    X = [[m.new_bool_var("") for _ in range(P)] for _ in range(L)]
    obj_terms: list[tuple[object, float]] = []
    const = 0.0
    coact = None
    if weights.coact and stats.coactivation is not None:
        coact = stats.coactivation.astype(np.float64)
        coact[:, np.arange(N), np.arange(N)] = 0.0
        tot_c = coact.sum()
        if tot_c > 0:
            const += weights.coact  # spread = 1 - (pairs kept on one GPU) / all pairs
        else:
            coact = None
    for l in range(L):
        check_deadline(deadline)
        m.add_exactly_one(X[l])
        cost = np.zeros(P)
        if mean[l] > 0 and weights.load:
            cost += weights.load * (load[l] @ member.T)[parts].max(axis=1) / (L * mean[l])
        if coact is not None:
            within = np.einsum("ka,ab,kb->k", member, coact[l], member)  # pairs inside a block
            cost -= weights.coact * within[parts].sum(axis=1) / tot_c
        obj_terms += [(X[l][i], cost[i]) for i in np.flatnonzero(cost)]
    trans = stats.transitions
    tot = float(trans.sum()) if trans is not None else 0.0
    Y: list[np.ndarray] = []
    best_perm: list[np.ndarray] = []
    for l in range(L - 1):
        check_deadline(deadline)
        Yl = np.array([[m.new_bool_var("") for _ in range(P)] for _ in range(P)], dtype=object)
        Y.append(Yl)
        for i in range(P):
            m.add(sum(Yl[i]) == X[l][i])
            m.add(sum(Yl[:, i]) == X[l + 1][i])
        kept = np.zeros((P, P))
        arg = np.zeros((P, P), np.int64)
        if tot > 0 and weights.traffic:
            w = member @ trans[l].astype(np.float64) @ member.T  # pairs kept: block a then b
            # kept[p, q, s] = sum_g w[parts[p, g], parts[q, perm_s(g)]]
            allk = w[parts[:, None, None, :], parts[None, :, perms]].sum(axis=-1)
            arg = allk.argmax(axis=2)
            kept = allk.max(axis=2)
            const += weights.traffic * float(trans[l].sum()) / tot
            for i, j in zip(*np.nonzero(kept), strict=True):
                obj_terms.append((Yl[i, j], -weights.traffic * kept[i, j] / tot))
        best_perm.append(arg)
    m.minimize(sum(round(coef * scale) * v for v, coef in obj_terms))
    if hint is not None:
        pid = {tuple(sorted(p)): i for i, p in enumerate(map(tuple, parts))}
        chosen = [pid[tuple(sorted(index[tuple(sorted(int(e) for e in row[g * S:(g + 1) * S]))]
                                   for g in range(G)))] for row in hint.phy2log]
        for l in range(L):
            for i in range(P):
                m.add_hint(X[l][i], int(i == chosen[l]))
        for l in range(L - 1):
            check_deadline(deadline)
            for i in range(P):
                for j in range(P):
                    m.add_hint(Y[l][i, j], int((i, j) == (chosen[l], chosen[l + 1])))
    solver = cp_model.CpSolver()
    # Python keeps SIGINT: Ctrl-C stops the search through stop_search (see _stoppable).
    solver.parameters.catch_sigint_signal = False
    # The LP is integral, so one worker running the full linear relaxation closes the gap
    # fastest: on the Mixtral trace it proves the optimum in about 20 s, where two portfolio
    # workers at the default linearisation still had a 0.5% gap after 120 s.
    solver.parameters.num_workers = 1
    solver.parameters.linearization_level = 2
    solver.parameters.random_seed = 0
    status = _cpsat_solve(solver, m, deadline)

    def decode() -> Placement:
        # GPU g keeps block g of layer 0's partition and follows the arcs' matchings from there.
        p = next(i for i in range(P) if solver.value(X[0][i]))
        held = parts[p].copy()  # block index on each GPU
        rows = [np.concatenate([blocks[k] for k in held])]
        for l in range(L - 1):
            q = next(j for j in range(P) if solver.value(Y[l][p, j]))
            # Block g of p continues to block perm(g) of q; GPUs follow their blocks.
            perm = perms[best_perm[l][p, q]]
            pos = {int(k): g for g, k in enumerate(parts[p])}
            nxt = np.empty(G, np.int64)
            for g in range(G):
                nxt[g] = parts[q][perm[pos[int(held[g])]]]
            held, p = nxt, q
            rows.append(np.concatenate([blocks[k] for k in held]))
        return Placement(np.array(rows, np.int64), G, 1, N, info={"method": "cpsat"})

    # A solution sets one X per layer and one Y per layer pair: 2L - 1 rounded terms at most.
    return _finish_cpsat(stats, solver, status, decode, weights, const, 2 * L - 1, scale, t0,
                         hint)


def solve_cpsat(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, *,
                weights: Weights = Weights(), time_limit: float = 60.0,
                hint: Placement | None = None, workers: int = 2,
                scale: float = 1e9, formulation: str = "auto") -> ExactResult:
    """Solve with OR-Tools CP-SAT (integer-scaled objective; reported values are exact).

    ``formulation``: ``"chain"`` (the partition-chain model: one node or no node term, small
    instances), ``"experts"`` (x[l,e,g] with pair variables), or ``"auto"``: the chain whenever
    ``chain_applies``. ``workers`` applies to the expert-level model; the chain model runs one
    worker, which proves its integral LP fastest.
    """

    check_split(stats, num_gpus, num_nodes)
    L, N = stats.load.shape
    chain_ok = chain_applies(L, N, num_gpus, num_nodes, weights)
    if formulation == "chain" and not chain_ok:
        raise InputError("solve", "--method", "the partition-chain model needs one node (or "
                         f"node=0), at most {MAX_CHAIN_GPUS} GPUs and at most "
                         f"{MAX_CHAIN_ARCS:,} arcs", "use the expert formulation")
    t0 = time.perf_counter()
    # One budget: model building counts against the time limit too.
    deadline = time.monotonic() + time_limit
    if formulation == "chain" or (formulation == "auto" and chain_ok):
        try:
            res = _solve_cpsat_chain(stats, num_gpus, weights=weights, deadline=deadline,
                                     hint=hint, scale=scale)
        except OutOfTime:
            res = keep_better(stats, ExactResult(None, "time limit (model not built)", None,
                                                 None, 0.0), hint, weights, "cpsat", t0)
        if res.placement is not None and num_nodes > 1:
            res.placement = Placement(res.placement.phy2log, num_gpus, num_nodes, N,
                                      info=res.placement.info)
        return res
    if weights.coact:
        raise InputError("solve", "--weights", "the expert-level CP-SAT model has no "
                         "co-activation term (the partition-chain model, for small one-node "
                         "instances, has)", "use --method dp or search with coact=")
    try:
        return _solve_cpsat_experts(stats, num_gpus, num_nodes, weights=weights,
                                    deadline=deadline, hint=hint, workers=workers, scale=scale,
                                    t0=t0)
    except OutOfTime:
        return keep_better(stats, ExactResult(None, "time limit (model not built)", None, None,
                                              0.0), hint, weights, "cpsat", t0)


def _solve_cpsat_experts(stats: RoutingStats, num_gpus: int, num_nodes: int, *,
                         weights: Weights, deadline: float, hint: Placement | None,
                         workers: int, scale: float, t0: float) -> ExactResult:
    """The expert-level CP-SAT model (x[l,e,g] with pair variables)."""
    from ortools.sat.python import cp_model

    L, N = stats.load.shape
    G, M = num_gpus, num_nodes
    n, S = G // M, N // G
    m = cp_model.CpModel()
    x = {(l, e, g): m.new_bool_var(f"x{l}_{e}_{g}") for l in range(L) for e in range(N)
         for g in range(G)}
    for l in range(L):
        for e in range(N):
            m.add_exactly_one(x[l, e, g] for g in range(G))
        for g in range(G):
            m.add(sum(x[l, e, g] for e in range(N)) == S)
    if M == 1:
        # Relabel GPUs by their smallest layer-0 expert: expert e then sits on a GPU <= e.
        for e in range(N):
            for g in range(e + 1, G):
                m.add(x[0, e, g] == 0)
    else:
        m.add(x[0, 0, 0] == 1)  # node-preserving relabels can still bring any GPU to 0
    load = stats.load.astype(np.int64)
    mean = load.sum(axis=1) / G
    obj_terms = []
    const = 0.0
    Ms = []
    budget = deadline - time.monotonic()
    for l in range(L):
        check_deadline(deadline)
        # Valid floor: some GPU holds the heaviest expert plus S-1 others, none is below mean.
        floor = max(int(np.ceil(mean[l])), int(load[l].max() + np.sort(load[l])[: S - 1].sum()),
                    _min_max_load(load[l], G, min(1.0, budget / (4 * L))))
        Ml = m.new_int_var(min(floor, int(load[l].sum())), int(load[l].sum()), f"M{l}")
        Ms.append(Ml)
        for g in range(G):
            m.add(Ml >= sum(int(load[l, e]) * x[l, e, g] for e in range(N)))
        if mean[l] > 0 and weights.load:
            obj_terms.append((Ml, weights.load / (L * mean[l])))
    pairs = _pairs(stats)
    tot = sum(p[3] for p in pairs)
    if tot > 0 and (weights.traffic or (weights.node and M > 1)):
        zs: dict[tuple[int, int, int, int], object] = {}
        for i_pair, (l, a, b, c) in enumerate(pairs):
            if i_pair % 1024 == 0:
                check_deadline(deadline)
            if weights.traffic:
                const += weights.traffic * c / tot
                for g in range(G):
                    z = m.new_bool_var("")
                    m.add_implication(z, x[l, a, g])
                    m.add_implication(z, x[l + 1, b, g])
                    zs[l, a, b, g] = z
                    obj_terms.append((z, -weights.traffic * c / tot))
        # Valid cuts that tighten the relaxation: a GPU holds S experts of the next layer, so
        # one expert co-locates with at most S successors there (and symmetrically).
        succ: dict[tuple[int, int, int], list] = {}
        pred: dict[tuple[int, int, int], list] = {}
        for (l, a, b, g), z in zs.items():
            succ.setdefault((l, a, g), []).append(z)
            pred.setdefault((l, b, g), []).append(z)
        for (l, a, g), zl in succ.items():
            if len(zl) > S:
                m.add(sum(zl) <= S * x[l, a, g])
        for (l, b, g), zl in pred.items():
            if len(zl) > S:
                m.add(sum(zl) <= S * x[l + 1, b, g])
        for l, a, b, c in pairs:
            if weights.node and M > 1:
                const += weights.node * c / tot
                for node in range(M):
                    zn = m.new_bool_var("")
                    m.add(zn <= sum(x[l, a, g] for g in range(node * n, (node + 1) * n)))
                    m.add(zn <= sum(x[l + 1, b, g] for g in range(node * n, (node + 1) * n)))
                    obj_terms.append((zn, -weights.node * c / tot))
    m.minimize(sum(round(coef * scale) * v for v, coef in obj_terms))
    if hint is not None:
        gpu = canonical_gpu(hint)
        for (l, e, g), v in x.items():
            m.add_hint(v, int(gpu[l, e] == g))
    solver = cp_model.CpSolver()
    # Python keeps SIGINT: Ctrl-C stops the search through stop_search (see _stoppable).
    solver.parameters.catch_sigint_signal = False
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    status = _cpsat_solve(solver, m, deadline)

    def decode() -> Placement:
        xv = np.zeros((L, N, G))
        for (l, e, g), v in x.items():
            xv[l, e, g] = solver.value(v)
        return placement_from(xv, G, M, "cpsat")

    return _finish_cpsat(stats, solver, status, decode, weights, const, len(obj_terms), scale, t0,
                         hint)


def solve_pulp(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, *, backend: str = "cbc",
               weights: Weights = Weights(), time_limit: float = 60.0,
               hint: Placement | None = None) -> ExactResult:
    """Solve the MILP with CBC or HiGHS (see ``milp.solve_milp``; the name is historical: the
    model is built with numpy, not PuLP, so building fits in the time limit)."""
    return solve_milp(stats, num_gpus, num_nodes, backend=backend, weights=weights,
                      time_limit=time_limit, hint=hint)


# ---- the exact models as methods (see moeplace.solvers.registry) -----------------------------
def search_hint(stats: RoutingStats, cluster: Cluster, options: SolveOptions) -> Placement:
    """The exact models' warm start: the better of the default search and a loosely balanced
    one from EPLB (distinct copies), within at most a fifth of the budget (10 s at most)."""
    w = options.weights
    # No deadline for the start: it is what is returned when the budget runs out.
    start = baseline("eplb-distinct", stats, cluster, options.seed, options.num_groups)
    hint_budget = min(10.0, 0.2 * options.time_limit)
    hints = [search(stats, start, weights=w, balance_slack=slack, time_limit=hint_budget / 2)[0]
             for slack in (0.0, 1.0)]
    return min(hints, key=lambda h: score(stats, h, w).total)


class _WarmStarted(Solver):
    """An exact model given the search's warm start and the rest of the budget (building
    included); it returns nothing worse than that start."""

    exact = True

    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        hint = search_hint(stats, cluster, options)
        res = self.run(stats, cluster, options.weights, options.budget(0.1), hint)
        plc, out = method_result(res, self.name, options.time_limit)
        out.details.update(start="search", placement_from=res.source,
                           proved="optimal" if res.status == "optimal" else (
                               "lower bound" if res.bound is not None else "nothing"))
        return plc, out

    @abstractmethod
    def run(self, stats: RoutingStats, cluster: Cluster, weights: Weights, time_limit: float,
            hint: Placement) -> ExactResult:
        """The model's result within ``time_limit`` seconds from ``hint``."""


@register
class CPSatSolver(_WarmStarted):
    """OR-Tools CP-SAT (the partition-chain model when it applies, else the expert model)."""

    name = "cpsat"
    coact = True  # the partition-chain model has the term; the expert model refuses it
    rank = 30

    def run(self, stats: RoutingStats, cluster: Cluster, weights: Weights, time_limit: float,
            hint: Placement) -> ExactResult:
        return solve_cpsat(stats, cluster.num_gpus, cluster.num_nodes, weights=weights,
                           time_limit=time_limit, hint=hint)


class PulpSolver(_WarmStarted):
    """The placement MILP on one backend (``backend``)."""

    backend: ClassVar[str]

    def run(self, stats: RoutingStats, cluster: Cluster, weights: Weights, time_limit: float,
            hint: Placement) -> ExactResult:
        return solve_pulp(stats, cluster.num_gpus, cluster.num_nodes, backend=self.backend,
                          weights=weights, time_limit=time_limit, hint=hint)


@register
class CbcSolver(PulpSolver):
    """The MILP solved by CBC."""

    name = "ilp-cbc"
    backend = "cbc"
    rank = 40


@register
class HighsSolver(PulpSolver):
    """The MILP solved by HiGHS."""

    name = "ilp-highs"
    backend = "highs"
    rank = 41

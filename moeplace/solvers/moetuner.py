"""MoETuner's published two-stage method (arXiv 2502.06643), with CP-SAT in place of Gurobi.

Stage 1 (ILP1, per layer): partition the N experts into G clusters of exactly N/G experts (the
cardinality constraint the paper's printed model omits), minimising the heaviest cluster's
token load. Stage 2 (ILP2, across layers): give each layer's clusters GPUs so that the token
flow between a cluster at layer l and one at l+1, weighted by the link cost between their GPUs
(0 on one GPU, ``traffic`` across GPUs, plus ``node`` across nodes), is minimal. Stage 2 is
solved exactly as a chain with CP-SAT when G <= 8, else one linear assignment per layer in
sequence. Offered so users can compare; ``search`` optimises both stages jointly.
"""

from __future__ import annotations

import time

import numpy as np
from ortools.graph.python import linear_sum_assignment

from moeplace.placement import Placement
from moeplace.solvers._stoppable import STOP_GRACE_S, run_stoppable
from moeplace.solvers.exact import min_max_partition
from moeplace.solvers.objective import Weights
from moeplace.solvers.registry import Cluster, MethodResult, SolveOptions, Solver, register
from moeplace.traces import RoutingStats


def _cluster_layer(load: np.ndarray, G: int, time_limit: float) -> np.ndarray:
    """ILP1: ``[N]`` cluster of each expert, equal-size clusters, min max cluster load."""
    return min_max_partition(load, G, time_limit, workers=2)[0]


def _link_cost(G: int, M: int, w: Weights) -> np.ndarray:
    g = np.arange(G)
    n = G // M
    return w.traffic * (g[:, None] != g[None, :]) + w.node * (g[:, None] // n != g[None, :] // n)


def solve_moetuner(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, *,
                   weights: Weights = Weights(), time_limit: float = 60.0) -> tuple[Placement, str]:
    """Two-stage MoETuner placement and a status ("optimal stages" when both proved optimal)."""
    t0 = time.perf_counter()
    L, N = stats.load.shape
    G, M = num_gpus, num_nodes
    clusters = np.array([_cluster_layer(stats.load[l], G, time_limit / (2 * L)) for l in range(L)])
    B = _link_cost(G, M, weights)
    flows = []
    if stats.transitions is not None:
        for l in range(L - 1):
            F = np.zeros((G, G))
            np.add.at(F, (clusters[l][:, None], clusters[l + 1][None, :]), stats.transitions[l])
            flows.append(F)
    # Sequential stage 2: each layer's clusters to GPUs given the previous layer's GPUs.
    gpu_of = np.zeros((L, G), np.int64)
    gpu_of[0] = np.arange(G)
    for l in range(1, L):
        if not flows:
            gpu_of[l] = np.arange(G)
            continue
        F = flows[l - 1]  # [prev cluster, cluster]
        cost = np.array([[sum(F[p, c] * B[gpu_of[l - 1][p], g] for p in range(G))
                          for g in range(G)] for c in range(G)])
        lsa = linear_sum_assignment.SimpleLinearSumAssignment()
        scale = 1e6 / max(float(cost.max()), 1e-30)
        for c in range(G):
            for g in range(G):
                lsa.add_arc_with_cost(c, g, int(round(cost[c, g] * scale)))
        lsa.solve()
        gpu_of[l] = [lsa.right_mate(c) for c in range(G)]
    status = "stage 2 sequential"
    remaining = time_limit - (time.perf_counter() - t0)
    if flows and G <= 8 and remaining > 1:
        gpu_of, status = _chain_cpsat(flows, B, gpu_of, remaining)
    rows = []
    for l in range(L):
        gpu = gpu_of[l][clusters[l]]
        rows.append(np.concatenate([np.flatnonzero(gpu == g) for g in range(G)]))
    return Placement(np.array(rows), G, M, N, info={"method": "moetuner"}), status


def _chain_cpsat(flows: list[np.ndarray], B: np.ndarray, hint: np.ndarray, time_limit: float
                 ) -> tuple[np.ndarray, str]:
    """Stage 2 exactly: per layer a permutation of clusters onto GPUs, flow x link cost."""
    from ortools.sat.python import cp_model  # only this stage needs it: import when it runs

    L, G = len(flows) + 1, B.shape[0]
    m = cp_model.CpModel()
    y = [[[m.new_bool_var("") for _ in range(G)] for _ in range(G)] for _ in range(L)]
    for l in range(L):
        for c in range(G):
            m.add_exactly_one(y[l][c])
        for g in range(G):
            m.add_exactly_one(y[l][c][g] for c in range(G))
    for c in range(G):  # layer 0 fixed: relabelling GPUs consistently changes nothing
        m.add(y[0][c][c] == 1)
    scale = 1e6 / max(float(max(F.max() for F in flows) * B.max()), 1e-30)
    terms = []
    for l, F in enumerate(flows):
        for p in range(G):
            for c in range(G):
                if F[p, c] <= 0:
                    continue
                for g in range(G):
                    for h in range(G):
                        coef = int(round(F[p, c] * B[g, h] * scale))
                        if coef <= 0:
                            continue
                        z = m.new_bool_var("")
                        m.add_bool_or([y[l][p][g].Not(), y[l + 1][c][h].Not(), z])
                        terms.append(coef * z)
    m.minimize(sum(terms))
    for l in range(L):
        for c in range(G):
            for g in range(G):
                m.add_hint(y[l][c][g], int(hint[l][c] == g))
    solver = cp_model.CpSolver()
    # Python keeps SIGINT: Ctrl-C stops the search through stop_search (see _stoppable).
    solver.parameters.catch_sigint_signal = False
    solver.parameters.max_time_in_seconds = max(time_limit, 0.05)
    solver.parameters.num_workers = 2
    st = run_stoppable(lambda: solver.solve(m), solver.stop_search,
                       time.monotonic() + max(time_limit, 0.05) + STOP_GRACE_S)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, "stage 2 sequential"
    out = np.array([[next(g for g in range(G) if solver.value(y[l][c][g])) for c in range(G)]
                    for l in range(L)])
    return out, "stage 2 optimal" if st == cp_model.OPTIMAL else "stage 2 feasible"


@register
class MoETunerSolver(Solver):
    """MoETuner's two stages, for comparison (each expert placed once).

    It accepts a co-activation weight, as before the registry, but does not optimise that
    term; the report scores it like every other."""

    name = "moetuner"
    coact = True
    rank = 50

    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        plc, status = solve_moetuner(stats, cluster.num_gpus, cluster.num_nodes,
                                     weights=options.weights, time_limit=options.budget(0.1))
        return plc, MethodResult(status)

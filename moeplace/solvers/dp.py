"""Exact dynamic program over layers for small expert counts: the objective is a chain.

Each layer's balanced assignment (S experts on each of G GPUs) is one state; a layer's load
term depends on its state alone and the traffic terms on consecutive states only, so a Viterbi
pass over ``N! / (S!)^G`` states per layer finds the global optimum (Mixtral: 2,520 states).
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers._exact_common import ExactResult, method_result
from moeplace.solvers.objective import Weights, score
from moeplace.solvers.registry import Cluster, MethodResult, SolveOptions, Solver, register
from moeplace.traces import RoutingStats

MAX_STATES = 4000


def num_states(num_experts: int, num_gpus: int) -> int:
    S = num_experts // num_gpus
    return math.factorial(num_experts) // math.factorial(S) ** num_gpus


def _states(N: int, G: int) -> np.ndarray:
    """``[states, N]`` GPU of each expert, every balanced labelled assignment."""
    S = N // G
    out: list[list[int]] = []

    def rec(remaining: tuple[int, ...], g: int, cur: list[int]) -> None:
        if g == G:
            out.append(cur.copy())
            return
        for combo in itertools.combinations(remaining, S):
            for e in combo:
                cur[e] = g
            rest = tuple(e for e in remaining if e not in combo)
            rec(rest, g + 1, cur)

    rec(tuple(range(N)), 0, [0] * N)
    return np.array(out, dtype=np.int64)


def solve_dp(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, *,
             weights: Weights = Weights()) -> ExactResult:
    """Globally optimal placement without replicas when the state space is small."""
    t0 = time.perf_counter()
    L, N = stats.load.shape
    G, M = num_gpus, num_nodes
    if N % G or G % M:
        raise InputError("solve", "--gpus", f"{N} experts on {G} GPUs in {M} nodes is uneven",
                         "use counts that divide evenly")
    ns = num_states(N, G)
    if ns > MAX_STATES:
        raise InputError("solve", "--method", f"dp needs {ns:,} states per layer (max "
                         f"{MAX_STATES:,})", "use --method cpsat or search")
    st = _states(N, G)  # [K, N]
    K = len(st)
    onehot = np.zeros((K, N, G))
    onehot[np.arange(K)[:, None], np.arange(N)[None, :], st] = 1.0
    n = G // M
    node_onehot = onehot.reshape(K, N, M, n).sum(axis=3)
    load = stats.load.astype(np.float64)
    mean = load.sum(axis=1) / G
    gl = np.einsum("kng,ln->lkg", onehot, load)  # [L, K, G]
    with np.errstate(invalid="ignore", divide="ignore"):
        imb = np.where(mean[:, None] > 0, gl.max(axis=2) / np.where(mean > 0, mean, 1)[:, None], 1.0)
    cost = weights.load / L * imb  # [L, K]
    if weights.coact and stats.coactivation is not None:
        c = stats.coactivation.astype(np.float64).copy()
        c[:, np.arange(N), np.arange(N)] = 0.0
        tot_c = c.sum()
        if tot_c > 0:
            # per state: pairs whose experts sit on different GPUs
            same = np.einsum("kag,lab,kbg->lk", onehot, c, onehot)
            cost = cost + weights.coact * (c.sum(axis=(1, 2))[:, None] - same) / tot_c
    trans = stats.transitions
    tot = float(trans.sum()) if trans is not None else 0.0
    V = cost[0].copy()
    back = np.zeros((L, K), np.int64)
    for l in range(L - 1):
        step = np.zeros((K, K))
        if trans is not None and tot > 0:
            T = trans[l].astype(np.float64)
            pairs = T.sum()
            if weights.traffic:
                W = np.einsum("ab,kag->kbg", T, onehot).reshape(K, -1)  # [K, N*G]
                same = W @ onehot.reshape(K, -1).T
                step += weights.traffic * (pairs - same) / tot
            if weights.node and M > 1:
                Wn = np.einsum("ab,kam->kbm", T, node_onehot).reshape(K, -1)
                same_n = Wn @ node_onehot.reshape(K, -1).T
                step += weights.node * (pairs - same_n) / tot
        total = V[:, None] + step
        back[l + 1] = np.argmin(total, axis=0)
        V = total[back[l + 1], np.arange(K)] + cost[l + 1]
    best = [int(np.argmin(V))]
    for l in range(L - 1, 0, -1):
        best.append(int(back[l, best[-1]]))
    best.reverse()
    rows = [np.concatenate([np.flatnonzero(st[s] == g) for g in range(G)]) for s in best]
    plc = Placement(np.array(rows), G, M, N, info={"method": "dp"})
    obj = score(stats, plc, weights).total
    return ExactResult(plc, "optimal", obj, obj, time.perf_counter() - t0)


@register
class DPSolver(Solver):
    """The dynamic program: the proven optimum without replicas, for small state spaces."""

    name = "dp"
    coact = True
    exact = True
    rank = 20

    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        res = solve_dp(stats, cluster.num_gpus, cluster.num_nodes, weights=options.weights)
        return method_result(res, self.name, options.time_limit)

"""What the exact models share: their result type, the rule that none returns worse than its
warm start, and the GPU relabelling their symmetry cuts assume (kept apart from ``exact`` so the
MILP backends in ``milp`` need not import it back)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moeplace.errors import InfeasibleError, InputError
from moeplace.placement import Placement
from moeplace.solvers.objective import Weights, score
from moeplace.solvers.registry import MethodResult
from moeplace.traces import RoutingStats


@dataclass
class ExactResult:
    """Solver outcome: placement, status, objective (incumbent), bound, gap, seconds.

    ``status`` is ``"optimal"`` only when the solver proved it; ``bound`` (when known) is a
    proven lower bound. ``source`` says whether the placement is the solver's or the warm start
    it was given (kept because the solver found nothing better in time).
    """

    placement: Placement | None
    status: str
    objective: float | None
    bound: float | None
    seconds: float
    source: str = "solver"

    @property
    def proved(self) -> bool:
        """Whether the solver proved anything: optimality or a lower bound."""
        return self.status == "optimal" or self.bound is not None

    @property
    def gap(self) -> float | None:
        if self.objective is None or self.bound is None:
            return None
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


def check_split(stats: RoutingStats, G: int, M: int) -> None:
    N = stats.num_experts
    if N % G:
        raise InputError("solve", "--gpus", f"{N} experts do not split evenly over {G} GPUs",
                         "exact models place each expert once; use --replicas with --method search")
    if G % M:
        raise InputError("solve", "--nodes", f"{G} GPUs do not split into {M} nodes",
                         "use a node count that divides the GPU count")


def placement_from(x: np.ndarray, G: int, M: int, method: str) -> Placement:
    """``x [L, N, G]`` 0/1 to a Placement with each GPU's experts in ascending order."""
    L, N, _ = x.shape
    gpu = x.argmax(axis=2)
    rows = [np.concatenate([np.flatnonzero(gpu[l] == g) for g in range(G)]) for l in range(L)]
    return Placement(np.array(rows), G, M, N, info={"method": method})


def canonical_gpu(placement: Placement) -> np.ndarray:
    """``[L, N]`` GPU of each expert after the relabelling the models' symmetry cuts assume:
    one node: GPUs ordered by their smallest layer-0 expert; several: expert 0 of layer 0 on
    GPU 0 (its node swapped to node 0 and its GPU to the node's first)."""
    gpu = placement.expert_gpu()
    G, M = placement.num_gpus, placement.num_nodes
    n = G // M
    if M == 1:
        first = np.full(G, np.iinfo(np.int64).max)
        np.minimum.at(first, gpu[0], np.arange(gpu.shape[1]))
        rank = np.empty(G, np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(G)
        return rank[gpu]
    g0 = int(gpu[0, 0])
    perm = np.arange(G)
    node0, pos0 = divmod(g0, n)
    blocks = perm.reshape(M, n).copy()
    blocks[[0, node0]] = blocks[[node0, 0]]
    perm = blocks.reshape(-1)  # perm[new] = old
    inv = np.empty(G, np.int64)
    inv[perm] = np.arange(G)
    gpu = inv[gpu]
    within = np.arange(G)
    within[[0, pos0]] = within[[pos0, 0]]
    return within[gpu]


def keep_better(stats: RoutingStats, res: ExactResult, hint: Placement | None, weights: Weights,
                method: str, t0: float) -> ExactResult:
    """Score the solver's placement exactly and return the warm start instead whenever it
    scores better (or the solver has none): no exact method returns worse than its start."""
    obj = score(stats, res.placement, weights).total if res.placement is not None else None
    if hint is not None:
        hint_obj = score(stats, hint, weights).total
        if obj is None or hint_obj < obj - 1e-12:
            plc = Placement(hint.phy2log, hint.num_gpus, hint.num_nodes, hint.num_experts,
                            info={"method": method})
            bound = None if res.bound is None else min(res.bound, hint_obj)
            status = res.status if res.status != "optimal" else "feasible"
            return ExactResult(plc, status, hint_obj, bound, time.perf_counter() - t0,
                               "warm start")
    bound = None if res.bound is None or obj is None else min(res.bound, obj)
    return ExactResult(res.placement, res.status, obj, bound, time.perf_counter() - t0,
                       res.source)


def method_result(res: ExactResult, method: str, time_limit: float
                  ) -> tuple[Placement, MethodResult]:
    """An exact model's outcome as a method's: its placement, status and proven bound, or an
    ``InfeasibleError`` when it found none in time."""
    if res.placement is None:
        raise InfeasibleError(f"{method} found no placement within {time_limit:g} s "
                              f"(status {res.status}); raise --time-limit or use search")
    return res.placement, MethodResult(res.status, res.bound)

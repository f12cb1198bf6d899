"""Combinatorial lower bounds on the objective, reported next to every heuristic answer.

- Load: at layer l some GPU holds the heaviest expert (or, with R replicas, its largest
  possible share) plus S-1 others, and no GPU can be below the mean: per layer
  ``max(total / G, w_max / min(G, R + 1) + (sum of the S-1 smallest shares))`` over the mean.
- Traffic: a copy of expert a at layer l shares its GPU with S experts of layer l+1, so at
  most a's ``c_a * S`` heaviest successors can be co-located with it (``c_a`` copies,
  at most R + 1); the same holds column-wise; the smaller total bounds co-located pairs.
  At node level the window is ``c_a * S * n`` (n GPUs per node).
- Co-activation: an expert copy shares its GPU with S-1 others, so at most its ``c_a * (S-1)``
  heaviest within-layer partners are co-located.
"""

from __future__ import annotations

import numpy as np

from moeplace.solvers.objective import ObjectiveValue, Weights
from moeplace.traces import RoutingStats


def _top_sum(rows: np.ndarray, width: np.ndarray) -> float:
    """Sum over rows of each row's ``width[i]`` largest entries."""
    srt = -np.sort(-rows, axis=1)
    csum = np.concatenate([np.zeros((rows.shape[0], 1)), np.cumsum(srt, axis=1)], axis=1)
    w = np.clip(width, 0, rows.shape[1]).astype(np.int64)
    return float(csum[np.arange(rows.shape[0]), w].sum())


def load_bound(load: np.ndarray, num_gpus: int, slots_per_gpu: int, replicas: int) -> np.ndarray:
    """``[L]`` lower bound on max GPU load / mean GPU load."""
    L, _N = load.shape
    w = load.astype(np.float64)
    mean = w.sum(axis=1) / num_gpus
    max_copies = min(num_gpus, replicas + 1)
    top = w.max(axis=1) / max_copies
    if replicas == 0 and slots_per_gpu > 1:
        smallest = np.sort(w, axis=1)[:, : slots_per_gpu - 1].sum(axis=1)
        top = top + smallest
    lb = np.maximum(mean, top)
    return np.divide(lb, mean, out=np.ones(L), where=mean > 0)


def traffic_bound(transitions: np.ndarray, window: int, max_copies: int) -> float:
    """Lower bound on the fraction of pairs not co-located (GPU window = S, node = S * n)."""
    tot = float(transitions.sum())
    if tot == 0:
        return 0.0
    same = 0.0
    for t in transitions.astype(np.float64):
        width = np.full(t.shape[0], window * max_copies)
        same += min(_top_sum(t, width), _top_sum(t.T, width), float(t.sum()))
    return max(0.0, 1.0 - same / tot)


def lower_bound(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
                weights: Weights = Weights()) -> ObjectiveValue:
    """Lower bounds on each objective term and the weighted total, for any placement of
    ``stats`` on this cluster (migration is bounded by 0: staying put is always allowed)."""
    N = stats.num_experts
    S = (N + replicas) // num_gpus
    imb = float(load_bound(stats.load, num_gpus, S, replicas).mean())
    cg = cn = 0.0
    if stats.transitions is not None and stats.num_layers > 1:
        copies = min(num_gpus, replicas + 1)
        cg = traffic_bound(stats.transitions, S, copies)
        if num_nodes > 1:
            cn = traffic_bound(stats.transitions, S * (num_gpus // num_nodes), copies)
    co = 0.0
    if stats.coactivation is not None:
        # An expert copy shares its GPU with S-1 others, so at most its S-1 heaviest partners.
        c = stats.coactivation.astype(np.float64).copy()
        idx = np.arange(N)
        c[:, idx, idx] = 0.0
        tot = c.sum()
        if tot > 0:
            width = np.full(N, (S - 1) * min(num_gpus, replicas + 1))
            same = sum(_top_sum(cl, width) for cl in c)
            co = max(0.0, 1.0 - same / tot)
    total = weights.load * imb + weights.traffic * cg + weights.node * cn + weights.coact * co
    return ObjectiveValue(total, imb, cg, cn, 0.0, co)

"""Baseline placements: contiguous, round-robin, random, and DeepSeek's EPLB with replicas.

EPLB follows the algorithm described in docs (serving-formats.md): (1) expert groups, heaviest
first, to the lightest node with room (hierarchical policy, when groups divide evenly over
nodes); (2) each extra slot to the expert with the largest load per replica; (3) copies,
heaviest first, to the lightest GPU with a free slot. Unlike the original, step 3 never puts two
copies of one expert on one GPU (vLLM issue 18343).
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from moeplace.errors import InfeasibleError, TimeLimitError
from moeplace.placement import Placement, contiguous, random_placement, round_robin

__all__ = ["contiguous", "eplb", "random_placement", "replica_counts", "round_robin"]


def replica_counts(load: np.ndarray, num_slots: int, max_copies: int | None = None) -> np.ndarray:
    """``[N]`` copies per expert: each extra slot to the largest load per copy (EPLB step 2),
    never more than ``max_copies`` (the GPUs available) copies of one expert."""
    N = load.shape[0]
    cnt = np.ones(N, np.int64)
    w = load.astype(np.float64)
    cap = max_copies or num_slots
    if num_slots - N > N * (cap - 1):
        raise InfeasibleError(f"{num_slots} slots exceed {N} experts x {cap} GPUs")
    # A heap of (-load per copy, expert): the largest, ties to the lowest expert id.
    heap = [(-w[e], e) for e in range(N)] if num_slots > N and cap > 1 else []
    heapq.heapify(heap)
    for _ in range(num_slots - N):
        _, e = heapq.heappop(heap)
        cnt[e] += 1
        if cnt[e] < cap:
            heapq.heappush(heap, (-w[e] / cnt[e], e))
    return cnt


def _pack_copies(items: np.ndarray, weights: np.ndarray, num_bins: int, cap: int,
                 base: np.ndarray | None = None) -> list[list[int]]:
    """Copies heaviest first onto the lightest bin with room that lacks that expert (ties to
    the lowest bin). A heap of (load, bin) over bins with room finds it in O(log bins) where a
    scan of every bin made 200,000-expert layers quadratic."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    members: list[set[int]] = [set() for _ in range(num_bins)]
    load = np.zeros(num_bins) if base is None else base.astype(np.float64).copy()
    heap = [(float(load[b]), b) for b in range(num_bins)]
    heapq.heapify(heap)
    for i in np.argsort(-weights, kind="stable"):
        e = int(items[i])
        skipped = []
        while heap and e in members[heap[0][1]]:
            skipped.append(heapq.heappop(heap))
        if heap:
            _, b = heapq.heappop(heap)
        else:
            b = _make_room(bins, e, cap, load, weights, items)
            # _make_room moved an expert between bins: rebuild the sets and the heap.
            members = [set(x) for x in bins]
            heap = [(float(load[x]), x) for x in range(num_bins) if len(bins[x]) < cap and x != b]
            heapq.heapify(heap)
            skipped = []
        for item in skipped:
            heapq.heappush(heap, item)
        bins[b].append(e)
        members[b].add(e)
        load[b] += weights[i]
        if len(bins[b]) < cap:
            heapq.heappush(heap, (float(load[b]), b))
    return bins


def _make_room(bins: list[list[int]], e: int, cap: int, load: np.ndarray, weights: np.ndarray,
               items: np.ndarray) -> int:
    """Greedy got stuck (every bin with room already holds e): move some expert x from a bin
    without e into a bin with room that lacks x, freeing a place for e."""
    wmap = {int(it): float(w) for it, w in zip(items, weights, strict=False)}
    roomy = [b for b in range(len(bins)) if len(bins[b]) < cap]
    for b2 in sorted(range(len(bins)), key=lambda b: load[b]):
        if e in bins[b2]:
            continue
        for x in bins[b2]:
            for b in roomy:
                if x not in bins[b]:
                    bins[b2].remove(x)
                    bins[b].append(x)
                    load[b2] -= wmap.get(x, 0.0)
                    load[b] += wmap.get(x, 0.0)
                    return b2
    raise InfeasibleError("copies of one expert cannot all go to distinct GPUs")


def _eplb_layer(load: np.ndarray, num_gpus: int, num_nodes: int, num_slots: int,
                num_groups: int) -> list[list[int]]:
    N = load.shape[0]
    S = num_slots // num_gpus
    # Hierarchical only when each node's experts can fill its GPUs without two copies of one
    # expert on a GPU (N / nodes >= slots per GPU).
    hierarchical = (num_groups > 0 and num_groups % num_nodes == 0 and N % num_groups == 0
                    and N // num_nodes >= S)
    if not hierarchical:
        num_nodes_eff, groups = 1, [np.arange(N)]
    else:
        gsize = N // num_groups
        gload = load.reshape(num_groups, gsize).sum(axis=1)
        per_node = num_groups // num_nodes
        node_groups: list[list[int]] = [[] for _ in range(num_nodes)]
        nload = np.zeros(num_nodes)
        for gi in np.argsort(-gload, kind="stable"):
            n = min((n for n in range(num_nodes) if len(node_groups[n]) < per_node),
                    key=lambda n: (nload[n], n))
            node_groups[n].append(int(gi))
            nload[n] += gload[gi]
        num_nodes_eff = num_nodes
        groups = [np.concatenate([np.arange(g * gsize, (g + 1) * gsize) for g in ng])
                  for ng in node_groups]
    gpn = num_gpus // num_nodes_eff
    slots_node = num_slots // num_nodes_eff
    layout: list[list[int]] = []
    for experts in groups:
        cnt = replica_counts(load[experts], slots_node, max_copies=gpn)
        items = np.repeat(experts, cnt)
        w = np.repeat(load[experts] / cnt, cnt)
        layout += _pack_copies(items, w, gpn, S)
    return layout


def eplb(load: np.ndarray, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
         num_groups: int | None = None, deadline: float | None = None) -> Placement:
    """DeepSeek EPLB on per-layer loads ``[L, N]`` with ``replicas`` extra slots per layer.

    ``num_groups`` (DeepSeek expert groups) selects the hierarchical policy when it divides
    evenly over nodes; by default each node is a group (node-local balancing first).
    ``deadline`` (``time.monotonic()``) raises ``TimeLimitError`` between layers once passed.
    """
    L, N = load.shape
    P = N + replicas
    if P % num_gpus or num_gpus % num_nodes:
        raise InfeasibleError(f"{N} experts + {replicas} replicas do not split evenly over "
                              f"{num_gpus} GPUs in {num_nodes} nodes")
    if replicas and (P // num_gpus) > N:
        raise InfeasibleError("more slots per GPU than distinct experts")
    if num_groups is None:
        num_groups = num_nodes if (num_nodes > 1 and N % num_nodes == 0
                                   and (P // num_nodes) >= N // num_nodes) else 0
    # Replicas inside a node must fit its slots: fall back to global when a node's share of
    # slots cannot hold its groups' experts.
    if num_groups and (P // num_nodes) < N // num_nodes:
        num_groups = 0
    rows = []
    for l in range(L):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeLimitError(f"EPLB on {L} layers x {N} experts stopped at the time limit "
                                 f"after {l} layers (raise --time-limit)")
        rows.append([e for gpu in _eplb_layer(load[l], num_gpus, num_nodes, P, num_groups)
                     for e in gpu])
    return Placement(np.array(rows), num_gpus, num_nodes, N,
                     info={"method": "eplb", "num_groups": num_groups})

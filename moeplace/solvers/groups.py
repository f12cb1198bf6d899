"""Solve at the granularity of routing groups (DeepSeek ``n_group``), so a placement only moves
whole groups and a permuted checkpoint keeps group-limited routing unchanged.

Groups are contiguous expert-id ranges of ``N / n_group``. Either every GPU holds whole groups
(``S`` a multiple of the group size) or every group fills a run of whole GPUs (the group size a
multiple of ``S``); in both cases the groups are placed as super-experts on super-GPUs. When a
group spans several GPUs, its experts are then spread over them to balance load (any order
inside a group keeps the routing unchanged).
"""

from __future__ import annotations

import numpy as np

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.traces import RoutingStats


def group_span(num_experts: int, num_gpus: int, num_nodes: int, n_group: int,
               replicas: int = 0) -> int:
    """GPUs one group spans (1 when GPUs hold whole groups); one-line errors when the cluster
    cannot keep groups whole."""
    if n_group < 1 or num_experts % n_group:
        raise InputError("solve", "--respect-groups", f"{num_experts} experts do not split "
                         f"into {n_group} groups", "give the model's n_group")
    if replicas:
        raise InputError("solve", "--replicas", "group-respecting placements feed a permuted "
                         "checkpoint, which holds each expert once",
                         "drop --replicas, or solve without --respect-groups and use export")
    size, S = num_experts // n_group, num_experts // num_gpus
    if S % size and size % S:
        raise InputError("solve", "--respect-groups", f"groups of {size} experts and {S} "
                         "experts per GPU: one is not a multiple of the other",
                         "choose a GPU count that keeps groups whole")
    span = size // S if size > S else 1
    if (num_gpus // num_nodes) % span:
        raise InputError("solve", "--nodes", f"a group spans {span} GPUs, which does not "
                         "divide the GPUs per node", "choose nodes that hold whole groups")
    return span


def group_stats(stats: RoutingStats, n_group: int) -> RoutingStats:
    """Statistics of the groups as if each were one expert (pairs inside a group collapse)."""
    L, N = stats.load.shape
    size = N // n_group

    def fold(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return a.reshape(a.shape[0], n_group, size, n_group, size).sum(axis=(2, 4))

    meta = stats.meta.with_updates(num_experts=n_group)
    return RoutingStats(meta, stats.num_tokens, stats.load.reshape(L, n_group, size).sum(axis=2),
                        fold(stats.transitions), fold(stats.coactivation))


def expand_groups(groups: Placement, n_group: int, num_experts: int, num_gpus: int,
                  num_nodes: int, load: np.ndarray | None = None) -> Placement:
    """Expert-level placement from a group-level one: each group slot becomes its experts.

    With ``load [L, N]`` and groups wider than a GPU, each group's experts are dealt to its
    GPUs heaviest first, each to the least-loaded GPU with room (greedy balanced partition).
    """
    size = num_experts // n_group
    phy2log = (groups.phy2log[:, :, None] * size + np.arange(size)).reshape(groups.num_layers, -1)
    S = num_experts // num_gpus
    if load is not None and size > S:
        span = size // S
        for l in range(groups.num_layers):
            for start in range(0, num_experts, size):
                block = phy2log[l, start:start + size]
                gpu_load, room = np.zeros(span), np.full(span, S)
                bins: list[list[int]] = [[] for _ in range(span)]
                for e in block[np.argsort(-load[l, block], kind="stable")]:
                    g = int(np.argmin(np.where(room > 0, gpu_load, np.inf)))
                    bins[g].append(int(e))
                    gpu_load[g] += load[l, e]
                    room[g] -= 1
                phy2log[l, start:start + size] = np.concatenate([sorted(b) for b in bins])
    return Placement(phy2log, num_gpus, num_nodes, num_experts,
                     moe_layer_ids=groups.moe_layer_ids, info=dict(groups.info))

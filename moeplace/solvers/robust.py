"""Balance on traffic a placement was not fitted to: request buckets as load scenarios, and a
check on held-back buckets that gives layers back to the start where balance does not hold.

The statistics split the load by request into hashed buckets (``RoutingStats.load_buckets``),
each a different slice of the requests. A search fitted on the whole load can fill every GPU up
to the start's max while putting experts that rise and fall together on one GPU; on new
requests its max then moves up. Searches use the even buckets as scenarios; the odd ones, which
no search sees, judge the result (a search picks what happens to look good on the buckets it
sees, so those cannot judge it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.cost import active_per_step, decode_start_cost
from moeplace.solvers.evaluator import gpu_loads_from_stats, imbalance
from moeplace.traces import RoutingStats

# Held-back buckets needed to judge balance on new traffic: with fewer requests than this twice
# over, a search changes nothing unless --balance-slack accepts the risk.
MIN_HELD_BUCKETS = 8


def too_few_requests(stats: RoutingStats, balance_slack: float) -> bool:
    """Whether the statistics hold too few requests to check balance on new traffic (and the
    user left no slack to spend without that check)."""
    if balance_slack > 0:
        return False
    b = stats.load_buckets
    filled = 0 if b is None else int((b.sum(axis=(1, 2)) > 0).sum())
    held = filled // 2 if filled >= 4 else 0  # as bucket_scenarios splits them
    return held < MIN_HELD_BUCKETS


def bucket_scenarios(stats: RoutingStats, tokens_per_step: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fitted [L, N], train [L, H1, N], held [L, H2, N])``: the fitted load and the non-empty
    request buckets, even ones for searching, odd ones held back (none held back with fewer
    than four buckets). ``tokens_per_step`` (decode): each is the expected active experts per
    step of its own tokens (``cost.expert_cost``) plus its share of received copies
    (``cost.decode_start_cost``) instead of token counts."""
    k = max(stats.meta.top_k, 1)

    def cost(counts: np.ndarray) -> np.ndarray:  # counts [..., N] of (counts.sum / k) tokens
        if tokens_per_step is None:
            return counts.astype(np.float64)
        tokens = np.maximum(counts.sum(axis=-1, keepdims=True) / k, 1.0)
        # Active experts (weights read) and received copies (tokens) both cost a decode GPU.
        return decode_start_cost(active_per_step(counts, tokens, tokens_per_step), counts)

    L, N = stats.load.shape
    train = held = np.zeros((L, 0, N))
    if stats.load_buckets is not None:
        b = stats.load_buckets
        b = cost(np.moveaxis(b[b.sum(axis=(1, 2)) > 0], 0, 1))  # [L, H, N]
        train, held = (b[:, 0::2], b[:, 1::2]) if b.shape[1] >= 4 else (b, held)
    return cost(stats.load), train, held


def layer_imbalance(placement: Placement, scenarios: np.ndarray,
                    speeds: np.ndarray | None = None) -> np.ndarray:
    """``[L, H]`` each layer's (speed-aware) imbalance in each scenario ``[L, H, N]``, an
    expert's load split evenly over its copies."""
    L, H, _ = scenarios.shape
    if H == 0:
        return np.ones((L, 0))
    gl = np.stack([gpu_loads_from_stats(scenarios[:, h], placement) for h in range(H)], axis=1)
    return imbalance(gl, speeds)


def choose_robust(values: np.ndarray, excess: np.ndarray, budget: float) -> np.ndarray:
    """``choose_layers`` on ``excess [L, C, H]`` given per held-back bucket, with the budget
    lowered by one standard error of the chosen layers' summed excess over the buckets: the
    buckets estimate the excess on new requests, and a choice made on them is judged with
    their noise in mind (about one-sided 84% confidence that it holds)."""
    mean = excess.mean(axis=2)
    pick = choose_layers(values, mean, budget)
    H = excess.shape[2]
    if H < 2:
        return pick
    total = excess[np.arange(len(pick)), pick].sum(axis=0)  # [H]
    se = float(total.std(ddof=1) / np.sqrt(H))
    return choose_layers(values, mean, budget - se)


def choose_layers(values: np.ndarray, excess: np.ndarray, budget: float) -> np.ndarray:
    """Pick one candidate per layer (``values [L, C]`` objective, lower is better; ``excess
    [L, C]`` held-back imbalance above the reference's) minimising the summed value with the
    summed excess at most ``budget``; greedy on the multiple-choice knapsack: start from each
    layer's least-excess candidate, then take the upgrades that buy most value per unit of
    excess while the budget lasts. Returns the chosen column per layer."""
    L, C = values.shape
    pick = np.argmin(excess + 1e-12 * values, axis=1)
    used = float(excess[np.arange(L), pick].sum())
    while True:
        cur_v = values[np.arange(L), pick][:, None]
        cur_e = excess[np.arange(L), pick][:, None]
        dv = cur_v - values  # value gained by switching
        de = excess - cur_e  # excess added
        room = budget - used
        ok = (dv > 1e-9) & (de <= room + 1e-12)
        if not ok.any():
            return pick
        ratio = np.where(ok, dv / np.maximum(de, 1e-12), -np.inf)
        ratio[ok & (de <= 0)] = np.inf  # better and no less balanced: always take
        l, c = divmod(int(np.argmax(ratio)), C)
        used += float(de[l, c])
        pick[l] = c


def give_back(stats: RoutingStats, placement: Placement, start: Placement, balance_slack: float,
              tokens_per_step: int | None = None, speeds: np.ndarray | None = None
              ) -> tuple[Placement, int]:
    """``placement`` with the layers whose held-back imbalance exceeds ``start``'s replaced by
    ``start``'s, most excess first, until the mean excess over layers is at most
    ``balance_slack``; and how many layers went back. For searches that weigh balance only on
    the fitted load (the cross-layer search, replicas)."""
    _, _, held = bucket_scenarios(stats, tokens_per_step)
    if placement.phy2log.shape != start.phy2log.shape:
        return placement, 0
    if too_few_requests(stats, balance_slack):
        return start, placement.num_layers
    if held.shape[1] == 0:
        return placement, 0
    excess = layer_imbalance(placement, held, speeds) - layer_imbalance(start, held, speeds)
    values = np.zeros((len(excess), 2))
    values[:, 0] = -1.0  # any layer the search changed is worth keeping; the budget decides
    pick = choose_robust(values, np.stack([excess, np.zeros_like(excess)], axis=1),
                         balance_slack * len(excess))
    back = np.flatnonzero(pick == 1)
    if back.size == 0:
        return placement, 0
    phy = placement.phy2log.copy()
    phy[back] = start.phy2log[back]
    return replace(placement, phy2log=phy, info=dict(placement.info)), int(back.size)

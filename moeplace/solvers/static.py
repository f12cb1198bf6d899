"""The engines' (static home, DeepEP-style) objective: distinct GPUs and nodes per token, and a
swap search on it.

In SGLang, vLLM and TensorRT-LLM with attention data parallelism, a token lives on its home rank
and DeepEP sends it once to every distinct remote GPU that holds one of its k experts (NVLink)
and once to every distinct remote node (RDMA). With homes independent of routing (requests
round-robin over ranks), a token touching D GPUs in M' nodes costs ``D (1 - 1/G)`` remote GPUs
and ``M' (1 - 1/M)`` remote nodes on average, so the objective is the mean number of distinct
GPUs and nodes a token's experts occupy. Pairwise co-activation counts cannot give that number
(three experts on one GPU are one destination, not three pairs), so the search works on a
bounded sample of tokens' expert sets (``RoutingStats.token_sample``).

The swap delta is exact for one swap: moving expert a from GPU ga to gb changes, for each token
holding a but not b, ``[C[t, gb] == 0] - [C[t, ga] == 1]`` where ``C[t, g]`` counts the token's
experts on g; tokens holding both are unchanged by a swap of a and b. Summed with sparse counts
this is ``M[a, gb] + M[b, ga] + Q[a, b] + Q[b, a]`` (see ``_deltas``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.evaluator import imbalance
from moeplace.solvers.robust import bucket_scenarios, choose_robust, too_few_requests
from moeplace.traces import RoutingStats

SEARCH_TOKENS = 8192


def distinct_per_token(sets: np.ndarray, owner: np.ndarray, num_owners: int) -> np.ndarray:
    """Distinct owners (GPUs or nodes) among each token's experts: ``sets [T, k]`` expert ids,
    ``owner [N]`` the owner of each expert."""
    T = sets.shape[0]
    counts = np.bincount((np.arange(T)[:, None] * num_owners + owner[sets]).ravel(),
                         minlength=T * num_owners).reshape(T, num_owners)
    return (counts > 0).sum(axis=1)


def static_traffic(sets: np.ndarray, gpu_of: np.ndarray, num_gpus: int, num_nodes: int
                   ) -> tuple[float, float]:
    """Expected remote GPUs and remote nodes per token at one layer (homes uniform over GPUs)."""
    if sets.shape[0] == 0:
        return 0.0, 0.0
    n = num_gpus // num_nodes
    d = distinct_per_token(sets, gpu_of, num_gpus).mean()
    dn = distinct_per_token(sets, gpu_of // n, num_nodes).mean()
    return float(d * (1 - 1 / num_gpus)), float(dn * (1 - 1 / num_nodes))


def _owner_terms(sets: np.ndarray, owner: np.ndarray, num_owners: int, N: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``M [N, O]``: change of the summed distinct-owner count if all of expert a's tokens
    (those without the partner) moved to owner o; ``Q [N, N]``: correction for tokens holding
    both a and b (sum over such tokens of [a alone on its owner])."""
    T, k = sets.shape
    O = num_owners
    own = owner[sets]  # [T, k]
    counts = np.bincount((np.arange(T)[:, None] * O + own).ravel(),
                         minlength=T * O).reshape(T, O)
    empty = (counts == 0).astype(np.float64)  # [T, O]
    alone = (counts[np.arange(T)[:, None], own] == 1).astype(np.float64)  # [T, k]
    # A[a, o] = tokens holding a with no expert on o (one bincount over (expert, owner) keys).
    keys = (sets[:, :, None] * O + np.arange(O)[None, None, :]).ravel()
    A = np.bincount(keys, weights=np.broadcast_to(empty[:, None, :], (T, k, O)).ravel(),
                    minlength=N * O).reshape(N, O)
    u = np.bincount(sets.ravel(), weights=alone.ravel(), minlength=N)
    M = A - u[:, None]
    # Q[a, b] = tokens holding a and b where a is alone on its owner.
    i, j = np.nonzero(~np.eye(k, dtype=bool))
    Q = np.bincount((sets[:, i] * N + sets[:, j]).ravel(), weights=alone[:, i].ravel(),
                    minlength=N * N)
    return M, Q.reshape(N, N)


def _deltas(sets: np.ndarray, gpu_of: np.ndarray, G: int, n: int, N: int,
            wg: float, wn: float, mig: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """``[N, N]`` change of ``wg * sum distinct GPUs + wn * sum distinct nodes`` (+ ``coef`` per
    expert moved off its GPU in ``mig = (current map, coef)``) when experts a and b swap GPUs
    (exact for a single swap; 0 on the diagonal and for same-GPU pairs)."""
    ga = gpu_of
    M, Q = _owner_terms(sets, gpu_of, G, N)
    d = M[np.arange(N)[:, None], ga[None, :]]  # d[a, b] = M[a, g(b)]
    delta = wg * (d + d.T + Q + Q.T)
    same_gpu = ga[:, None] == ga[None, :]
    if wn and n < G:
        node = gpu_of // n
        Mn, Qn = _owner_terms(sets, node, G // n, N)
        dn = Mn[np.arange(N)[:, None], node[None, :]]
        dn = dn + dn.T + Qn + Qn.T
        dn[node[:, None] == node[None, :]] = 0.0
        delta = delta + wn * dn
    if mig is not None:
        cur, coef = mig
        away = (ga != cur).astype(np.float64)
        moved = (ga[None, :] != cur[:, None]).astype(np.float64)  # [a, b]: a away on b's GPU
        delta = delta + coef * (moved + moved.T - away[:, None] - away[None, :])
    delta[same_gpu] = 0.0
    return delta


def _scenario_gpu_loads(gpu_of: np.ndarray, loads: np.ndarray, G: int,
                        speeds: np.ndarray | None = None) -> np.ndarray:
    """``[B, G]`` GPU loads of each load scenario (divided by each GPU's speed: its time)."""
    B = loads.shape[0]
    out = np.empty((B, G))
    for b in range(B):
        out[b] = np.bincount(gpu_of, weights=loads[b], minlength=G)
    return out if speeds is None else out / speeds[None, :]


def _swap_loads(gpu_of: np.ndarray, loads: np.ndarray, G: int,
                speeds: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads after swapping each pair (a, b): ``(now, new_a, new_b, new_max)`` where
    ``now [B, N]`` is each expert's GPU load now, ``new_a [B, N, N]`` a's GPU load after
    swapping a and b (``new_b`` b's), and ``new_max [B, N, N]`` each scenario's max GPU load
    after the swap. With ``speeds`` every GPU load is its time (load / speed)."""
    gl = _scenario_gpu_loads(gpu_of, loads, G, speeds)  # [B, G]
    B = gl.shape[0]
    ga = gl[:, gpu_of]  # [B, N]
    diff = loads[:, None, :] - loads[:, :, None]  # [B, a, b] = w_b - w_a: a's GPU gains it
    if speeds is None:
        new_a = ga[:, :, None] + diff
        new_b = ga[:, None, :] - diff
    else:
        s = speeds[gpu_of]
        new_a = ga[:, :, None] + diff / s[None, :, None]
        new_b = ga[:, None, :] - diff / s[None, None, :]
    # Max over the GPUs the swap leaves alone: the largest of the top three not at ga or gb.
    top = np.argsort(-gl, axis=1)[:, :3]
    rest = np.full((B, len(gpu_of), len(gpu_of)), -np.inf)
    done = np.zeros_like(rest, dtype=bool)
    for r in range(top.shape[1]):
        idx = top[:, r]  # [B]
        hit = (gpu_of[None, :, None] != idx[:, None, None]) & (
            gpu_of[None, None, :] != idx[:, None, None]) & ~done
        rest = np.where(hit, gl[np.arange(B), idx][:, None, None], rest)
        done |= hit
    new_max = np.maximum(rest, np.maximum(new_a, new_b))
    return ga, new_a, new_b, new_max


@dataclass
class Balance:
    """One layer's balance limits and load term.

    ``loads [B, N]``: the fitted load (row 0), then request buckets. ``caps [B]``: every GPU's
    fitted load stays within ``caps[0]`` and the buckets' summed max GPU load within
    ``caps[1:].sum()``. ``weight``: objective cost of one unit of that summed max (the load
    term in the search's units; 0 leaves balance to the limits alone).
    """

    loads: np.ndarray
    caps: np.ndarray
    weight: float = 0.0
    speeds: np.ndarray | None = None  # per-GPU speed: limits and load term apply to load / speed

    def swaps(self, gpu_of: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
        """``[N, N]`` allowed swaps (a, b on different GPUs, within the limits) and the load
        term's change for each."""
        _, new_a, new_b, new_max = _swap_loads(gpu_of, self.loads, G, self.speeds)
        c = self.caps
        ok = (new_a[0] <= c[0] + 1e-9) & (new_b[0] <= c[0] + 1e-9)
        change = np.zeros(ok.shape)
        if self.loads.shape[0] > 1:
            summed = new_max[1:].sum(axis=0)
            ok &= summed <= c[1:].sum() + 1e-9
            if self.weight:
                now = _scenario_gpu_loads(gpu_of, self.loads[1:], G, self.speeds).max(
                    axis=1).sum()
                change = self.weight * (summed - now)
        return ok & (gpu_of[:, None] != gpu_of[None, :]), change

    def violation(self, gpu_of: np.ndarray, G: int) -> float:
        """How far a map is outside the limits (0 inside)."""
        gl = _scenario_gpu_loads(gpu_of, self.loads, G, self.speeds)
        v = float(np.maximum(gl[0] - self.caps[0], 0).sum())
        if self.loads.shape[0] > 1:
            v += max(float(gl[1:].max(axis=1).sum() - self.caps[1:].sum()), 0.0)
        return v

    def value(self, gpu_of: np.ndarray, G: int) -> float:
        """The load term of a map."""
        if not self.weight or self.loads.shape[0] < 2:
            return 0.0
        return self.weight * float(
            _scenario_gpu_loads(gpu_of, self.loads[1:], G, self.speeds).max(axis=1).sum())

    def loosened(self) -> Balance:
        """No limits, same load term (for a search that repairs afterwards)."""
        return Balance(self.loads, np.full_like(self.caps, np.inf), self.weight, self.speeds)


def layer_value(sets: np.ndarray, gpu_of: np.ndarray, G: int, n: int, wg: float, wn: float,
                mig: tuple[np.ndarray, float] | None = None, bal: Balance | None = None
                ) -> float:
    """``wg * sum distinct GPUs + wn * sum distinct nodes`` over the sampled tokens (+ moves,
    + the load term)."""
    v = wg * distinct_per_token(sets, gpu_of, G).sum() + (bal.value(gpu_of, G) if bal else 0.0)
    if wn and n < G:
        v += wn * distinct_per_token(sets, gpu_of // n, G // n).sum()
    if mig is not None:
        v += mig[1] * float((gpu_of != mig[0]).sum())
    return float(v)


def _traffic_deltas(sets: np.ndarray, gpu_of: np.ndarray, G: int, n: int, N: int,
                    wg: float, wn: float, mig: tuple[np.ndarray, float] | None) -> np.ndarray | float:
    """``_deltas``, or 0 for a balance-only search (no traffic or migration term to count)."""
    if not wg and not wn and mig is None:
        return 0.0
    return _deltas(sets, gpu_of, G, n, N, wg, wn, mig)


def layer_search(sets: np.ndarray, gpu_of: np.ndarray, num_gpus: int, num_nodes: int,
                 bal: Balance, *, wg: float = 1.0, wn: float = 1.0,
                 deadline: float | None = None, max_rounds: int = 10_000,
                 batch: int | None = None, mig: tuple[np.ndarray, float] | None = None
                 ) -> tuple[np.ndarray, int]:
    """Improve one layer's expert-to-GPU map (no replicas) on distinct GPUs/nodes per token.

    Swaps stay within ``bal``'s limits and pay its load term.
    Each round applies a batch of the best improving swaps on disjoint GPUs, keeps it only if
    the exact recount improved, else applies the single best swap. Returns the map and the
    number of swaps applied.
    """
    G, n = num_gpus, num_gpus // num_nodes
    N = gpu_of.shape[0]
    gpu_of = gpu_of.copy()
    batch = batch if batch is not None else max(1, G // 2)

    def value(g_of: np.ndarray) -> float:
        return layer_value(sets, g_of, G, n, wg, wn, mig, bal)

    cur = value(gpu_of)
    applied = 0
    for _ in range(max_rounds):
        if deadline is not None and time.monotonic() > deadline:
            break
        ok, change = bal.swaps(gpu_of, G)
        cand = np.where(ok, _traffic_deltas(sets, gpu_of, G, n, N, wg, wn, mig) + change,
                         np.inf)
        flat = np.flatnonzero(cand < -1e-9)
        if flat.size == 0:
            break
        order = flat[np.argsort(cand.ravel()[flat], kind="stable")]
        best = divmod(int(order[0]), N)
        # A batch of swaps on disjoint GPUs: per-GPU loads are independent, but the buckets'
        # summed maxima and the traffic (through shared tokens) are not: the batch is re-checked.
        used = np.zeros(G, bool)
        picks = []
        for idx in order[: 8 * batch * batch]:
            a, b = divmod(int(idx), N)
            if used[gpu_of[a]] or used[gpu_of[b]]:
                continue
            used[gpu_of[a]] = used[gpu_of[b]] = True
            picks.append((a, b))
            if len(picks) >= batch:
                break
        trial = gpu_of.copy()
        for a, b in picks:
            trial[a], trial[b] = gpu_of[b], gpu_of[a]
        v = value(trial) if len(picks) > 1 and bal.violation(trial, G) <= 1e-9 else np.inf
        if v < cur - 1e-9:
            gpu_of, cur = trial, v
            applied += len(picks)
        else:
            a, b = best
            gpu_of[a], gpu_of[b] = gpu_of[b], gpu_of[a]
            cur = value(gpu_of)
            applied += 1
    return gpu_of, applied


def kl_pass(sets: np.ndarray, gpu_of: np.ndarray, num_gpus: int, num_nodes: int,
            bal: Balance, *, wg: float = 1.0, wn: float = 1.0,
            deadline: float | None = None, steps: int | None = None,
            mig: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, float]:
    """One Kernighan-Lin pass: swap the best feasible unlocked pair even when it worsens the
    objective, lock both, and keep the best prefix; escapes the local optima of plain descent.
    Returns the map and the improvement (<= 0)."""
    G, n = num_gpus, num_gpus // num_nodes
    N = gpu_of.shape[0]
    gpu_of = gpu_of.copy()
    locked = np.zeros(N, bool)
    seq: list[tuple[int, int]] = []
    cum = best = 0.0
    best_len = 0
    for _ in range(steps if steps is not None else N // 2):
        if deadline is not None and time.monotonic() > deadline:
            break
        ok, change = bal.swaps(gpu_of, G)
        ok &= ~locked[:, None] & ~locked[None, :]
        cand = np.where(ok, _traffic_deltas(sets, gpu_of, G, n, N, wg, wn, mig) + change,
                         np.inf)
        i = int(np.argmin(cand))
        if not np.isfinite(cand.flat[i]):
            break
        a, b = divmod(i, N)
        cum += float(cand.flat[i])
        gpu_of[a], gpu_of[b] = gpu_of[b], gpu_of[a]
        locked[a] = locked[b] = True
        seq.append((a, b))
        if cum < best - 1e-9:
            best, best_len = cum, len(seq)
    for a, b in reversed(seq[best_len:]):
        gpu_of[a], gpu_of[b] = gpu_of[b], gpu_of[a]
    return gpu_of, best


def repair(sets: np.ndarray, gpu_of: np.ndarray, num_gpus: int, num_nodes: int,
           bal: Balance, *, wg: float = 1.0, wn: float = 1.0,
           deadline: float | None = None, max_steps: int = 10_000,
           mig: tuple[np.ndarray, float] | None = None) -> np.ndarray | None:
    """Swap experts until the map is within ``bal``'s limits, each time taking the swap that
    removes the most violation per unit of traffic added; None if it gets stuck."""
    G, n = num_gpus, num_gpus // num_nodes
    N = gpu_of.shape[0]
    gpu_of = gpu_of.copy()
    for _ in range(max_steps):
        loads, caps = bal.loads, bal.caps
        if bal.violation(gpu_of, G) <= 1e-9:
            return gpu_of
        if deadline is not None and time.monotonic() > deadline:
            return None
        delta = _deltas(sets, gpu_of, G, n, N, wg, wn, mig)
        ga, new_a, new_b, new_max = _swap_loads(gpu_of, loads, G, bal.speeds)
        c0 = caps[0]
        gain = (np.maximum(ga[0][:, None] - c0, 0) + np.maximum(ga[0][None, :] - c0, 0)
                - np.maximum(new_a[0] - c0, 0) - np.maximum(new_b[0] - c0, 0))
        if loads.shape[0] > 1:
            gl = _scenario_gpu_loads(gpu_of, loads, G, bal.speeds)
            over = max(float(gl[1:].max(axis=1).sum() - caps[1:].sum()), 0.0)
            gain = gain + over - np.maximum(new_max[1:].sum(axis=0) - caps[1:].sum(), 0)
        ok = (gain > 1e-9) & (gpu_of[:, None] != gpu_of[None, :])
        if not ok.any():
            return None
        # Least traffic added per unit of violation removed (a swap that also saves traffic wins).
        score = np.where(ok, delta / np.maximum(gain, 1e-12), np.inf)
        a, b = divmod(int(np.argmin(score)), N)
        gpu_of[a], gpu_of[b] = gpu_of[b], gpu_of[a]
    return None

def term_scales(stats: RoutingStats, num_gpus: int, num_nodes: int) -> tuple[float, float]:
    """Objective units of one distinct GPU and one distinct node of one token: the static
    terms are ``traffic_static / k`` and ``traffic_static_remote_nodes / min(k, M - 1)``, each
    in [0, 1] like the pair fractions, and a distinct GPU (node) is ``1 - 1/G`` (``1 - 1/M``)
    remote ones for a home uniform over GPUs."""
    k = max(stats.meta.top_k, 1)
    g = (1 - 1 / num_gpus) / k
    nd = (1 - 1 / num_nodes) / min(k, num_nodes - 1) if num_nodes > 1 else 0.0
    return g, nd


def static_terms(stats: RoutingStats, placement: Placement) -> tuple[float, float] | None:
    """``(traffic_static, traffic_static_remote_nodes)`` estimated on the token sample (homes
    uniform over GPUs; a replicated expert counts the copies' GPUs it may use as one: the
    first copy, which is where the evaluator's round-robin starts); None without a sample."""
    if stats.token_sample is None or len(stats.token_sample) == 0:
        return None
    G, M = placement.num_gpus, placement.num_nodes
    gpu = placement.expert_gpu() if placement.num_replicas == 0 else _first_copy_gpu(placement)
    rg = rn = 0.0
    for l in range(placement.num_layers):
        a, b = static_traffic(stats.token_sample[:, l, :], gpu[l], G, M)
        rg += a
        rn += b
    return rg / placement.num_layers, rn / placement.num_layers


def _first_copy_gpu(placement: Placement) -> np.ndarray:
    """``[L, N]`` GPU of each expert's first copy."""
    l2p = placement.log2phy()
    return l2p[:, :, 0] // placement.slots_per_gpu


@dataclass
class StaticReport:
    """What the static search did."""

    swaps: int = 0
    kl_passes: int = 0
    repaired_layers: int = 0
    layers_given_back: int = 0
    balance_first_layers: int = 0
    stopped: str = "converged"
    seconds: float = 0.0
    scenarios: int = 1
    # [L, N] expert-to-GPU maps of each layer's traffic and balance-first candidates
    traffic: np.ndarray | None = None
    steady: np.ndarray | None = None


def scenario_caps(stats: RoutingStats, reference: Placement, balance_slack: float,
                  tokens_per_step: int | None = None, speeds: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load scenarios ``[L, B, N]`` (the fitted load, then the even request buckets), their caps
    ``[L, B]`` (the reference placement's max GPU load in each scenario times
    ``1 + balance_slack``), and the held-back buckets ``[L, H, N]`` (``robust.bucket_scenarios``).

    Within the limits (``Balance.swaps``) a placement is no less balanced than the reference on the
    fitted traffic and, on average over the buckets, on a sixteenth of the requests: the mean
    of the buckets' max GPU loads estimates the max on new traffic of that size, which a cap on
    the fitted load alone does not control (a search filling every GPU up to the cap loses
    balance on new traffic). The search picks placements that happen to look good on the
    buckets it sees, so the held-back half judges the result.

    ``tokens_per_step`` (decode): every scenario is the expected active experts per step
    (``cost.expert_cost``) of its own tokens instead of the token load; ``speeds``: caps on
    load / speed (GPU time)."""
    fitted, train, held = bucket_scenarios(stats, tokens_per_step)
    load = np.concatenate([fitted[:, None, :], train], axis=1)
    gpu = reference.expert_gpu()
    G = reference.num_gpus
    caps = np.stack([_scenario_gpu_loads(gpu[l], load[l], G, speeds).max(axis=1)
                     for l in range(stats.num_layers)])
    return load, caps * (1 + balance_slack), held


def _bucket_imbalance(gpu_of: np.ndarray, loads: np.ndarray, G: int,
                      speeds: np.ndarray | None = None) -> np.ndarray:
    """``[B]`` the (speed-aware) imbalance of a layer's map in each scenario."""
    return imbalance(_scenario_gpu_loads(gpu_of, loads, G), speeds)


@dataclass
class _Layers:
    """What every layer's search reads: the token sample, each layer's balance limits and the
    held-back buckets, in the objective's per-layer units (sums over sampled tokens)."""

    sets: np.ndarray  # [T, L, k] sampled tokens' experts
    bal: list[Balance]
    held: np.ndarray  # [L, H, N] held-back request buckets
    cur: np.ndarray | None  # [L, N] GPU of each expert in the current placement (migration)
    coef: float  # one move's cost in a layer's units
    G: int
    M: int
    wg: float
    wn: float
    speeds: np.ndarray | None

    def mig(self, l: int) -> tuple[np.ndarray, float] | None:
        return None if self.cur is None else (self.cur[l], self.coef)

    def value(self, l: int, g: np.ndarray) -> float:
        """Layer ``l``'s objective (traffic, moves, load term) of map ``g``."""
        return layer_value(self.sets[:, l, :], g, self.G, self.G // self.M, self.wg, self.wn,
                           self.mig(l), self.bal[l])

    def choose(self, cands: list[np.ndarray], balance_slack: float) -> np.ndarray:
        """Per layer, the column of ``cands`` (``[L, N]`` maps; the first is the start) with
        the least summed value whose mean held-back imbalance over layers stays within
        ``balance_slack`` of the start's (``robust.choose_robust``)."""
        values, imb = self.scores(cands)
        L = len(self.bal)
        if imb.shape[2] == 0:  # no held-back buckets: the least value per layer
            return np.argmin(values, axis=1)
        return choose_robust(values, imb - imb[:, :1], balance_slack * L)

    def scores(self, cands: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``values [L, C]`` and held-back imbalances ``[L, C, H]`` of each candidate's layers,
        each distinct map scored once."""
        L, C, H = len(self.bal), len(cands), self.held.shape[1]
        values = np.empty((L, C))
        imb = np.empty((L, C, H))
        for l in range(L):
            seen: dict[bytes, int] = {}  # restarts leave most layers at the start: score once
            for c, cand in enumerate(cands):
                first = seen.setdefault(cand[l].tobytes(), c)
                if first < c:
                    values[l, c], imb[l, c] = values[l, first], imb[l, first]
                else:
                    values[l, c] = self.value(l, cand[l])
                    if H:
                        imb[l, c] = _bucket_imbalance(cand[l], self.held[l], self.G, self.speeds)
        return values, imb


def _layers(stats: RoutingStats, start: Placement, *, traffic: float, node: float, load: float,
            migration: float, current: Placement | None, balance_slack: float,
            tokens_per_step: int | None, gpu_speeds: np.ndarray | None) -> _Layers:
    G, M = start.num_gpus, start.num_nodes
    sg, sn = term_scales(stats, G, M)
    # The sample is ordered by priority, so its head is a uniform sample too: 8,192 tokens fix
    # each layer's distinct-GPU mean to about 1% and halve the work per swap round.
    sets_all = stats.token_sample[:SEARCH_TOKENS].astype(np.int64)
    loads, caps, held = scenario_caps(stats, start, balance_slack, tokens_per_step, gpu_speeds)
    cur = current.expert_gpu() if (current is not None and migration > 0
                                   and current.num_replicas == 0) else None
    L, N = start.num_layers, start.num_experts
    # Migration is (copies moved / slots) averaged over layers; in one layer's units (sums over
    # sampled tokens, per layer) one move costs migration * tokens / slots.
    coef = migration * len(sets_all) / N
    # The load term, load * mean over layers of the imbalance, in one layer's units (sums over
    # sampled tokens, as the traffic terms): the buckets' mean of max GPU load / mean GPU load.
    H = loads.shape[1] - 1
    bucket_mean = loads[:, 1:].sum(axis=2) / (G if gpu_speeds is None else gpu_speeds.sum())
    bal = [Balance(loads[l], caps[l], (load * len(sets_all) / H)
                   / max(float(bucket_mean[l].mean()), 1e-12) if H else 0.0, gpu_speeds)
           for l in range(L)]
    return _Layers(sets_all, bal, held, cur, coef, G, M, traffic * sg, node * sn, gpu_speeds)


def _kick(gpu_of: np.ndarray, bal: Balance, G: int, rng: np.random.Generator, moves: int
          ) -> np.ndarray:
    """``moves`` random swaps of experts on different GPUs that keep ``bal``'s limits: another
    starting point from which the descent reaches another local optimum."""
    g = gpu_of.copy()
    N = len(g)
    done = 0
    for _ in range(16 * moves):
        a, b = (int(x) for x in rng.integers(N, size=2))
        if g[a] == g[b]:
            continue
        g[a], g[b] = g[b], g[a]
        if bal.violation(g, G) > 1e-9:
            g[a], g[b] = g[b], g[a]
            continue
        done += 1
        if done >= moves:
            break
    return g


def static_search(stats: RoutingStats, start: Placement, *, traffic: float = 1.0,
                  node: float = 1.0, load: float = 1.0, migration: float = 0.0,
                  current: Placement | None = None, balance_slack: float = 0.0,
                  time_limit: float = 30.0, deadline: float | None = None,
                  tokens_per_step: int | None = None, gpu_speeds: np.ndarray | None = None,
                  seed: int | None = None, layers: Sequence[int] | None = None
                  ) -> tuple[Placement, StaticReport]:
    """Place each layer's experts (no replicas) to minimise distinct GPUs and nodes per token,
    within ``start``'s balance on every load scenario (see ``scenario_caps``).

    Per layer: a balance-first candidate (descent on the load term alone, from ``start``),
    and a traffic candidate, the better of descent from ``start`` under the limits and
    descent without them followed by ``repair`` (reaches clusterings the limited descent cannot
    walk to); time left goes to Kernighan-Lin passes on the traffic candidates. Last, the
    held-back request buckets judge balance: each layer keeps ``start``, its balance-first or
    its traffic candidate so that the mean held-back imbalance over layers is no worse than
    ``start``'s (+ ``balance_slack``) at the least traffic (``robust.choose_robust``). With
    too few requests for that check and no slack, ``start`` comes back unchanged.

    Without ``seed`` the search is deterministic. With one, each layer's limited descent
    starts from ``start`` moved by random swaps within its limits and the unlimited descent
    from a random permutation of it: other local optima. ``layers`` searches only those layers
    (the others keep ``start``'s), with the whole time limit shared among them. The report
    keeps both candidates of every layer (``traffic``, ``steady``) for ``combine_restarts``.
    """
    t0 = time.monotonic()
    end = t0 + time_limit if deadline is None else min(deadline, t0 + time_limit)
    rep = StaticReport()
    if stats.token_sample is None or len(stats.token_sample) == 0 or start.num_replicas:
        rep.stopped = "no token sample" if start.num_replicas == 0 else "replicas"
        return start, rep
    G, M = start.num_gpus, start.num_nodes
    if too_few_requests(stats, balance_slack):
        rep.stopped = "too few requests to check balance on new traffic"
        rep.layers_given_back = start.num_layers
        return start, rep
    ctx = _layers(stats, start, traffic=traffic, node=node, load=load, migration=migration,
                  current=current, balance_slack=balance_slack,
                  tokens_per_step=tokens_per_step, gpu_speeds=gpu_speeds)
    sets_all, bal, held, wg, wn, mig, val = (ctx.sets, ctx.bal, ctx.held, ctx.wg, ctx.wn,
                                             ctx.mig, ctx.value)
    rep.scenarios = bal[0].loads.shape[0] + held.shape[1]
    gpu = start.expert_gpu().copy()
    L, N = gpu.shape
    rng = None if seed is None else np.random.default_rng(seed)
    steady = gpu.copy()  # balance-first candidates
    todo = list(range(L)) if layers is None else sorted({int(x) for x in layers})

    for i, l in enumerate(todo):
        left = end - time.monotonic()
        if left <= 0:
            rep.stopped = "time limit"
            break
        # Half of this layer's share of the remaining time, so later layers keep theirs; each
        # candidate gets its own slice of it (one slow search must not starve the others).
        now = time.monotonic()
        share = 0.5 * left / (len(todo) - i)
        sets = sets_all[:, l, :]
        kw = dict(wg=wg, wn=wn, mig=mig(l))
        if bal[l].weight:
            steady[l], _ = layer_search(sets, gpu[l], G, M, bal[l], wg=0.0, wn=0.0,
                                        deadline=now + 0.2 * share)
        first, loose = gpu[l], gpu[l]
        if rng is not None:
            first = _kick(gpu[l], bal[l], G, rng, max(1, N // 4))
            loose = rng.permutation(gpu[l])
        a, na = layer_search(sets, first, G, M, bal[l], deadline=now + 0.5 * share, **kw)
        free, _ = layer_search(sets, loose, G, M, bal[l].loosened(), deadline=now + 0.7 * share,
                               **kw)
        kw["deadline"] = now + share
        b = repair(sets, free, G, M, bal[l], **kw)
        if b is not None:
            b, nb = layer_search(sets, b, G, M, bal[l], **kw)
            if val(l, b) < val(l, a) - 1e-9:
                a, na = b, nb
                rep.repaired_layers += 1
        gpu[l] = a
        rep.swaps += na
    # Kernighan-Lin passes round-robin over layers while time remains and any layer improves.
    improving = set(todo) if rep.stopped == "converged" else set()
    while improving and time.monotonic() < end:
        for l in sorted(improving):
            if time.monotonic() >= end:
                rep.stopped = "time limit"
                break
            sets = sets_all[:, l, :]
            kw = dict(wg=wg, wn=wn, deadline=end, mig=mig(l))
            g, gain = kl_pass(sets, gpu[l], G, M, bal[l], **kw)
            rep.kl_passes += 1
            if gain >= -1e-9:
                improving.discard(l)
                continue
            g, na = layer_search(sets, g, G, M, bal[l], **kw)
            gpu[l] = g
            rep.swaps += na
    if improving and rep.stopped == "converged":
        rep.stopped = "time limit"
    ref = start.expert_gpu()
    rep.traffic, rep.steady = gpu.copy(), steady
    if held.shape[1]:
        cands = [ref, steady, gpu]
        pick = ctx.choose(cands, balance_slack)
        gpu = np.stack([cands[c][l] for l, c in enumerate(pick)])
        rep.layers_given_back = int((pick == 0).sum())
        rep.balance_first_layers = int((pick == 1).sum())
    rep.seconds = time.monotonic() - t0
    return _by_gpu(gpu, G, M), rep


def _by_gpu(gpu: np.ndarray, G: int, M: int) -> Placement:
    """The placement of ``[L, N]`` expert-to-GPU maps: experts by GPU (stable: ascending ids
    within a GPU), S slots each."""
    return Placement(np.argsort(gpu, axis=1, kind="stable"), num_gpus=G, num_nodes=M,
                     num_experts=gpu.shape[1])


def restart_layers(restart: int, restarts: int, num_layers: int) -> tuple[list[int], bool]:
    """Which layers restart ``restart`` of ``restarts`` searches, and whether from a seed.

    Layers are independent in the static objective, so restarts first split the layers
    (restart i takes layers i, i + R, ... of R = min(restarts, L)), each searching its share
    with R times the time per layer of one search over all of them; restarts beyond the
    number of layers search one layer again from a random perturbation (seeded)."""
    R = min(restarts, num_layers)
    return list(range(restart % R, num_layers, R)), restart >= R


def combine_restarts(stats: RoutingStats, start: Placement, reports: list[StaticReport], *,
                     traffic: float = 1.0, node: float = 1.0, load: float = 1.0,
                     migration: float = 0.0, current: Placement | None = None,
                     balance_slack: float = 0.0, tokens_per_step: int | None = None,
                     gpu_speeds: np.ndarray | None = None
                     ) -> tuple[Placement, np.ndarray, np.ndarray]:
    """One placement from the candidates of several ``static_search`` runs (restarts, in seed
    order, each reporting ``traffic`` and ``steady`` maps): per layer the candidate chosen as
    in ``static_search`` (least summed value within the held-back balance budget,
    ``_Layers.choose``) among ``start`` and every run's candidates for that layer; ties go to
    the earliest column (``start``, then the lowest seed). Returns the placement, per layer the
    restart it came from (-1: ``start``) and whether it is that restart's balance-first map."""
    L = start.num_layers
    runs = [r for r in reports if r.traffic is not None and r.steady is not None]
    if not runs:
        return start, np.full(L, -1), np.zeros(L, bool)
    ctx = _layers(stats, start, traffic=traffic, node=node, load=load, migration=migration,
                  current=current, balance_slack=balance_slack,
                  tokens_per_step=tokens_per_step, gpu_speeds=gpu_speeds)
    owner = [-1]
    cands = [start.expert_gpu()]
    for i, r in enumerate(reports):
        if r.traffic is not None and r.steady is not None:
            cands += [r.steady, r.traffic]
            owner += [i, i]
    pick = ctx.choose(cands, balance_slack)
    gpu = np.stack([cands[c][l] for l, c in enumerate(pick)])
    return (_by_gpu(gpu, start.num_gpus, start.num_nodes), np.array([owner[c] for c in pick]),
            (pick % 2 == 1))

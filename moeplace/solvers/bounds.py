"""Lower bounds on the objective, reported next to every heuristic answer.

Every bound holds for every placement of the statistics on the cluster (replica copies of an
expert split its load evenly, as ``evaluator.gpu_loads_from_stats`` does; copies may even share
a GPU). Tests compare each one against enumeration of all placements on tiny instances.

- Load (per layer, max GPU load over the mean). Without replicas: the mean (rounded up to a
  whole count when loads are counts), and the scheduling bounds with exactly S items per GPU:
  among the ``j*G + 1`` heaviest experts some GPU holds ``j + 1``, at least the ``j + 1``
  lightest of them, plus ``S - j - 1`` others (at least the lightest experts); where these
  stay below the greedy split, CP-SAT's proven optimum (``exact.min_max_partition``) within
  a quarter of the time limit. With replicas:
  the smallest cap ``T`` for which the copies each expert needs (``ceil(w / (T - (S-1) m))``
  with ``m`` the lightest possible copy) fit into the ``N + R`` slots, found by bisection.
- Cross-layer pairs (GPU and node level), per consecutive layer pair: each copy of expert a
  shares its GPU with S experts of the next layer, and each copy of b with S of the previous,
  while the copies beyond one per expert number at most R. The most pair weight that can be
  co-located under these degree limits is a bipartite b-matching, solved exactly as a min-cost
  flow (integral, so this is the LP relaxation's value); the node level uses windows of
  ``S * gpus_per_node`` and at most ``min(M, R + 1)`` node copies.
- Without replicas, two tighter bounds per layer pair: the eigenvalue (Donath-Hoffman) bound
  with each layer's ones projected out and an optimised diagonal shift
  (``spectral_colocated``), strongest for few large parts (nodes); and their Lagrangian
  decomposition, flow(t - X) + eigenvalue(X) optimised over the split X
  (``decomposed_colocated``), which beats both for 8 GPUs.
- Co-activation spread: the same flow on the layer's pair graph with degree ``S - 1`` per copy
  (the bipartite double cover; the LP has a symmetric optimum so nothing is lost), and the
  eigenvalue bound.
- ``distinct_bound`` / ``static_bound``: a token's distinct GPUs (nodes) are at least a convex
  function of its co-located pairs (``distinct_floor``), whose mean the co-activation bounds
  cap; and at least ceil(k / S). ``kernel_bounds`` turns them into each dispatch kernel's copies.

Order and time: flows for every term first (fast; a pair reached after the deadline gets the
per-expert "heaviest partners" bound: each row and each column alone, whole extra copies given
greedily, the smaller of flow and this when both run), then eigenvalue and decomposition steps
round by round over the pairs, node level first, until the time limit. Every intermediate
value is a valid bound, so stopping anywhere is safe.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from moeplace.errors import InputError
from moeplace.solvers.objective import ObjectiveValue, Weights
from moeplace.traces import RoutingStats

DEFAULT_TIME_LIMIT = 3.0


def _top_sum(rows: np.ndarray, width: np.ndarray) -> float:
    """Sum over rows of each row's ``width[i]`` largest entries."""
    srt = -np.sort(-rows, axis=1)
    csum = np.concatenate([np.zeros((rows.shape[0], 1)), np.cumsum(srt, axis=1)], axis=1)
    w = np.clip(width, 0, rows.shape[1]).astype(np.int64)
    return float(csum[np.arange(rows.shape[0]), w].sum())


# ---- load ------------------------------------------------------------------------------------
def _load_bound_plain(w: np.ndarray, G: int, S: int) -> float:
    """Lower bound on one layer's max GPU load, each expert once, exactly S per GPU."""
    N = w.shape[0]
    total = float(w.sum())
    lb = total / G
    if np.all(w == np.round(w)):
        lb = max(lb, math.ceil(total / G - 1e-9))  # whole counts: some GPU gets the rest
    desc = np.sort(w)[::-1]
    asc = desc[::-1]
    small = np.concatenate([[0.0], np.cumsum(asc)])
    for j in range(S):
        top = j * G + 1  # among these, some GPU holds j + 1
        if top > N:
            break
        part = float(desc[top - j - 1:top].sum())  # the j + 1 lightest of them
        lb = max(lb, part + float(small[S - j - 1]))
    return lb


def _load_bound_replicas(w: np.ndarray, G: int, S: int, R: int) -> float:
    """Lower bound on one layer's max GPU load with R extra copies (even split over copies).

    A GPU holding a copy of e also holds S - 1 other copies, each at least ``m``, the lightest
    expert's load over its most copies (R + 1), so a cap T needs ``c_e >= w_e / (T - (S-1) m)``
    copies of e; the smallest T whose needs fit in N + R slots bounds the max (bisection).
    """
    N = w.shape[0]
    mean = float(w.sum()) / G
    if mean <= 0:
        return 0.0
    m = float(w.min()) / (R + 1)
    pad = (S - 1) * m

    def fits(cap: float) -> bool:
        room = cap - pad
        if room <= 0:
            return False
        need = np.maximum(1.0, np.ceil(w / room - 1e-12))
        return bool(need.max() <= R + 1 and need.sum() <= N + R)

    lo, hi = mean, max(mean, float(w.max()) + pad)
    if fits(lo):
        return lo
    for _ in range(60):  # lo never fits, hi always does
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo


def _greedy_max(w: np.ndarray, G: int, S: int) -> float:
    """Heaviest GPU of the heaviest-first greedy split (an upper bound on the optimum)."""
    loads = np.zeros(G)
    room = np.full(G, S)
    for e in np.argsort(-w, kind="stable"):
        g = int(np.argmin(np.where(room > 0, loads, np.inf)))
        loads[g] += w[e]
        room[g] -= 1
    return float(loads.max())


def load_bound(load: np.ndarray, num_gpus: int, slots_per_gpu: int, replicas: int,
               deadline: float | None = None) -> np.ndarray:
    """``[L]`` lower bound on max GPU load / mean GPU load.

    Without replicas and with whole-count loads, a layer whose scheduling bound is below the
    greedy split's load is solved exactly (``exact.min_max_partition``, CP-SAT) while
    ``deadline`` allows, and the optimum is used when proven.
    """
    w = load.astype(np.float64)
    out = np.ones(w.shape[0])
    whole = bool(np.all(w == np.round(w)))
    for layer, row in enumerate(w):
        mean = float(row.sum()) / num_gpus
        if mean <= 0:
            continue
        if replicas == 0:
            top = _load_bound_plain(row, num_gpus, slots_per_gpu)
            left = -1.0 if deadline is None else deadline - time.monotonic()
            if (whole and left > 0.01 and num_gpus > 1
                    and top < _greedy_max(row, num_gpus, slots_per_gpu) - 0.5):
                from moeplace.solvers.exact import min_max_partition

                _groups, value, proven = min_max_partition(load[layer].astype(np.int64),
                                                           num_gpus, min(0.2, left))
                if proven:
                    top = max(top, float(value))
        else:
            top = _load_bound_replicas(row, num_gpus, slots_per_gpu, replicas)
        out[layer] = max(1.0, top / mean)
    return out


# ---- co-located pair weight --------------------------------------------------------------------
def _int_costs(t: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer arc weights for the flow and the factor back; rounded up, so still a bound."""
    if np.all(t == np.round(t)) and t.max(initial=0) < 2**40:
        return t.astype(np.int64), 1.0
    scale = 2.0**30 / max(float(t.max(initial=0)), 1e-300)
    return np.ceil(t * scale).astype(np.int64), 1.0 / scale


def colocated_flow(t: np.ndarray, degree: int, extra: int, max_copies: int) -> float:
    """Most weight of pairs (a, b) that can be co-located, with t ``[A, B]`` >= 0.

    Each of a's copies is co-located with at most ``degree`` experts of the other side (and
    likewise for b); each expert has 1 to ``max_copies`` copies and the copies beyond the first
    number at most ``extra`` per side. A bipartite b-matching, solved exactly as a min-cost
    flow: source -> a (capacity ``degree``, plus up to ``degree * (max_copies - 1)`` through a
    shared hub of capacity ``degree * extra``) -> b (capacity 1 per pair) -> sink, mirrored.
    """
    return _flow(t, degree, extra, max_copies)[0]


def _flow(t: np.ndarray, degree: int, extra: int, max_copies: int
          ) -> tuple[float, np.ndarray]:
    """``colocated_flow``'s value and its pairs (0/1 ``[A, B]``); t may have entries <= 0,
    which no pair uses (the limits are upper limits, so this stays an upper bound)."""
    from ortools.graph.python import min_cost_flow

    A, B = t.shape
    x = np.zeros((A, B))
    a_idx, b_idx = np.nonzero(t > 0)
    if a_idx.size == 0:
        return 0.0, x
    cost, back = _int_costs(t[a_idx, b_idx])
    extra_cap = degree * extra if max_copies > 1 else 0
    more = degree * (max_copies - 1)
    src, sink, hub_a, hub_b = A + B, A + B + 1, A + B + 2, A + B + 3
    total = degree * A + extra_cap
    ar_a, ar_b = np.arange(A), A + np.arange(B)
    tails = np.concatenate([a_idx, np.full(A, src), np.full(A, hub_a), ar_b, ar_b,
                            [src, hub_b, src]])
    heads = np.concatenate([A + b_idx, ar_a, ar_a, np.full(B, sink), np.full(B, hub_b),
                            [hub_a, sink, sink]])
    caps = np.concatenate([np.ones(a_idx.size), np.full(A, degree), np.full(A, more),
                           np.full(B, degree), np.full(B, more),
                           [extra_cap, extra_cap, total]]).astype(np.int64)
    costs = np.concatenate([-cost, np.zeros(2 * A + 2 * B + 3, np.int64)])
    f = min_cost_flow.SimpleMinCostFlow()
    f.add_arcs_with_capacity_and_unit_cost(tails.astype(np.int32), heads.astype(np.int32),
                                           caps, costs)
    f.set_node_supply(src, int(total))
    f.set_node_supply(sink, -int(total))
    status = f.solve()
    if status != f.OPTIMAL:  # pragma: no cover - feasible by the bypass arc; costs fit int64
        # Still a valid bound: every pair with positive weight co-located.
        return float(np.clip(t, 0, None).sum()), (t > 0).astype(np.float64)
    x[a_idx, b_idx] = f.flows(np.arange(a_idx.size))
    return -float(f.optimal_cost()) * back, x


def _copy_widths(t: np.ndarray, degree: int, extra: int, max_copies: int) -> float:
    """Rows alone: each row's heaviest ``degree`` partners per copy, the extra copies given
    to the rows that gain most (greedy is optimal: each row's gains only shrink)."""
    srt = -np.sort(-t, axis=1)
    A, B = t.shape
    pad = np.zeros((A, degree * max_copies))
    k = min(B, pad.shape[1])
    pad[:, :k] = srt[:, :k]
    blocks = pad.reshape(A, max_copies, degree).sum(axis=2)  # gain of each copy, decreasing
    base = float(blocks[:, 0].sum())
    if max_copies > 1 and extra > 0:
        gains = np.sort(blocks[:, 1:].ravel())[::-1]
        base += float(gains[:extra].sum())
    return base


def colocated_greedy(t: np.ndarray, degree: int, extra: int, max_copies: int) -> float:
    """The weaker, fast bound: the smaller of the rows-alone and columns-alone bounds."""
    return min(_copy_widths(t, degree, extra, max_copies),
               _copy_widths(t.T, degree, extra, max_copies), float(t.sum()))


def _colocated(t: np.ndarray, degree: int, extra: int, max_copies: int,
               deadline: float | None) -> float:
    if degree <= 0:
        return 0.0
    if deadline is not None and time.monotonic() > deadline:
        return colocated_greedy(t, degree, extra, max_copies)
    # The flow lets copies be fractional; the greedy bound's whole copies are sometimes tighter.
    return min(colocated_flow(t, degree, extra, max_copies),
               colocated_greedy(t, degree, extra, max_copies))


SPECTRAL_ITERS = 40
SPECTRAL_PROBE = 3  # layer pairs tried before a stage that never beats the flow is dropped
DECOMP_ITERS = 20  # decomposition steps per layer pair and round
DECOMP_STEP = 0.25  # first step, in units of the pair weight per expert (tuned on DeepSeek)
MAX_ROUNDS = 10


def _center(x: np.ndarray, blocks: int) -> np.ndarray:
    """``P x P`` with P removing the mean of each of ``blocks`` equal index blocks."""
    n = x.shape[0] // blocks
    y = x.reshape(blocks, n, blocks, n)
    y = y - y.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=3, keepdims=True)
    return y.reshape(x.shape)


def spectral_colocated(w: np.ndarray, parts: int, blocks: int, deadline: float | None = None,
                       iters: int = SPECTRAL_ITERS, start: np.ndarray | None = None,
                       step_offset: int = 0) -> tuple[float, np.ndarray]:
    """Eigenvalue (Donath-Hoffman) bound on ``max sum_p z_p' w z_p`` over splits of the n
    indices into ``parts`` disjoint parts that each take ``n / (blocks * parts)`` indices of
    every one of the ``blocks`` equal index blocks (z_p: a part's 0/1 indicator).

    For any diagonal D the sum grows by exactly trace(D) (each index in one part); the
    normalised indicators are orthonormal, span the all-ones vector and are orthogonal to
    each block's ones minus the mean, so with e the normalised ones and P the projector
    removing each block's mean, the sum is at most
    ``m (e'(w + D)e + top (parts - 1) eigenvalues of P(w + D)P) - trace(D)``, m = n / parts.
    Every D gives a valid bound; a normalised subgradient descent on D (from 0) tightens it
    until ``iters`` steps or the deadline; returns the best value seen and its D (``start``:
    the D to begin from, e.g. the previous layer pair's; ``step_offset``: steps already taken,
    when continuing from an earlier call's D).
    """
    n = w.shape[0]
    if parts <= 1:
        return float(w.sum()), np.zeros(n)
    m = n / parts
    base = float(w.sum()) / n
    pw = _center(w, blocks)
    d = np.zeros(n) if start is None else start.copy()
    best, best_d = math.inf, d.copy()
    scale = max(float(np.abs(w).sum()) / n, 1e-12)
    for it in range(iters):
        x = pw + _center(np.diag(d), blocks)
        vals, vecs = np.linalg.eigh(x)
        top = vals[-(parts - 1):]
        val = m * (base + d.sum() / n + float(top.sum())) - float(d.sum())
        if val < best:
            best, best_d = val, d.copy()
        if deadline is not None and time.monotonic() > deadline:
            break
        grad = m * ((vecs[:, -(parts - 1):] ** 2).sum(axis=1) + 1.0 / n) - 1.0
        norm = float(np.linalg.norm(grad))
        if norm < 1e-12:
            break
        d -= (0.5 * scale / math.sqrt(it + 1 + step_offset)) * grad / norm
    return best, best_d


def _bipartite(t: np.ndarray) -> np.ndarray:
    """Symmetric ``[2N, 2N]`` matrix whose form on [x; y] is x' t y."""
    A, B = t.shape
    w = np.zeros((A + B, A + B))
    w[:A, A:] = t / 2
    w[A:, :A] = t.T / 2
    return w


def _pairs_colocated(t: np.ndarray, window: int, max_copies: int, extra: int,
                     deadline: float | None) -> np.ndarray:
    return np.array([_colocated(tl, window, extra, max_copies, deadline) for tl in t])


def decomposed_colocated(t: np.ndarray, parts: int, degree: int, deadline: float | None,
                         iters: int, state: tuple[np.ndarray, np.ndarray, int]
                         ) -> tuple[float, tuple[np.ndarray, np.ndarray, int]]:
    """Flow and eigenvalue bounds combined on one layer pair (Lagrangian decomposition).

    For any split ``t = (t - X) + X`` the co-located weight is at most the flow bound of
    ``t - X`` plus the eigenvalue bound of ``X`` (each part's best placement is at least as
    good as the shared one's), and the sum is convex in ``(X, D)``: a normalised subgradient
    descent on both, from ``state = (X, D, steps taken)``, for ``iters`` steps or until the
    deadline. Returns the best value seen and the state to continue from.
    """
    X, d, done = state
    X, d = X.copy(), d.copy()
    A = t.shape[0]
    n = 2 * A
    m = n / parts
    best = math.inf
    scale = max(float(t.sum()) / A, 1e-12)
    for it in range(done, done + iters):
        fval, xs = _flow(t - X, degree, 0, 1)
        mat = _center(_bipartite(X), 2) + _center(np.diag(d), 2)
        vals, vecs = np.linalg.eigh(mat)
        v = vecs[:, -(parts - 1):]
        sval = m * (float(X.sum()) / n + d.sum() / n + float(vals[-(parts - 1):].sum())) \
            - float(d.sum())
        best = min(best, fval + sval)
        if deadline is not None and time.monotonic() > deadline:
            return best, (X, d, it + 1)
        gx = m * (1.0 / n + v[:A] @ v[A:].T) - xs
        gd = m * ((v ** 2).sum(axis=1) + 1.0 / n) - 1.0
        norm = math.sqrt(float((gx ** 2).sum() + (gd ** 2).sum()))
        if norm < 1e-12:
            return best, (X, d, it + 1)
        step = DECOMP_STEP * scale / math.sqrt(it + 1) / norm
        X -= step * gx
        d -= step * gd
    return best, (X, d, done + iters)


def _refine_spectral(stages: list[tuple[np.ndarray, np.ndarray, int, bool, int]],
                     deadline: float | None) -> None:
    """Lower each stage's ``same`` (co-located weight bound per layer or layer pair) while
    time lasts. A stage is ``(same, matrices, parts, bipartite, degree)``.

    First a short eigenvalue pass over every pair (most of its gain: ~20 steps reach ~90% of
    300 steps' improvement), dropped for a stage whose first pairs never beat the flow (many
    small parts); then, round after round, more steps of the flow + eigenvalue decomposition
    on layer pairs (from whichever bound was tighter) and of the eigenvalue bound on
    within-layer graphs.
    """
    first = SPECTRAL_ITERS // 2
    # One expert per GPU: each layer pair is an assignment problem, which the flow solves.
    stages = [st for st in stages if st[2] > 1 and not (st[3] and st[4] == 1)]
    ds: list[list[np.ndarray | None]] = [[None] * len(st[1]) for st in stages]
    states: list[list[tuple[np.ndarray, np.ndarray, int] | None]] = [
        [None] * len(st[1]) for st in stages]
    for k, (same, mats, parts, bipartite, _deg) in enumerate(stages):
        prev_d, prev_w, gained = None, 1.0, False
        for i, tl in enumerate(mats):
            if deadline is not None and time.monotonic() > deadline:
                return
            if i == SPECTRAL_PROBE and not gained:
                break  # many small parts (e.g. 8 GPUs): the flow stays tighter
            if same[i] <= 0:
                continue
            w = _bipartite(tl) if bipartite else tl
            size = float(np.abs(w).sum())
            # Consecutive layer pairs look alike: start from the previous one's D.
            start = None if prev_d is None else prev_d * (size / max(prev_w, 1e-300))
            val, d = spectral_colocated(w, parts, 2 if bipartite else 1, deadline, first, start)
            prev_d, prev_w = d, size
            if val < same[i]:
                gained = True
                same[i] = val
                ds[k][i] = d
    for _round in range(MAX_ROUNDS):
        for k, (same, mats, parts, bipartite, deg) in enumerate(stages):
            for i, tl in enumerate(mats):
                if deadline is not None and time.monotonic() > deadline:
                    return
                if same[i] <= 0:
                    continue
                if not bipartite:
                    if ds[k][i] is not None:
                        val, ds[k][i] = spectral_colocated(tl, parts, 1, deadline, first,
                                                           ds[k][i], first)
                        same[i] = min(same[i], val)
                    continue
                st = states[k][i]
                if st is None:  # start from the tighter of the two bounds
                    d0 = ds[k][i]
                    st = ((tl.copy(), d0, first) if d0 is not None
                          else (np.zeros_like(tl), np.zeros(2 * tl.shape[0]), 0))
                val, states[k][i] = decomposed_colocated(tl, parts, deg, deadline,
                                                         DECOMP_ITERS, st)
                same[i] = min(same[i], val)


def traffic_bound(transitions: np.ndarray, window: int, max_copies: int, extra: int = 0,
                  deadline: float | None = None, parts: int = 0) -> float:
    """Lower bound on the fraction of pairs not co-located (GPU window = S, node = S * n).

    ``max_copies``: most GPUs (or nodes) one expert can be on; ``extra``: copies beyond one per
    expert, per layer (the replicas R); ``parts`` (G or M, placements without replicas only):
    also try the eigenvalue bound.
    """
    t = transitions.astype(np.float64)
    tot = float(t.sum())
    if tot == 0:
        return 0.0
    same = _pairs_colocated(t, window, max_copies, extra, deadline)
    if extra == 0 and parts > 1 and t.shape[1] == window * parts:
        _refine_spectral([(same, t, parts, True, window)], deadline)
    return max(0.0, 1.0 - float(same.sum()) / tot)


def coactivation_bound(coactivation: np.ndarray, slots_per_gpu: int, max_copies: int,
                       extra: int = 0, deadline: float | None = None, parts: int = 0) -> float:
    """Lower bound on the co-activation spread (share of within-layer pairs on no common GPU)."""
    c = _off_diagonal(coactivation)
    tot = float(c.sum())
    if tot == 0:
        return 0.0
    same = _pairs_colocated(c, slots_per_gpu - 1, max_copies, extra, deadline)
    if extra == 0 and parts > 1 and c.shape[1] == slots_per_gpu * parts:
        _refine_spectral([(same, c, parts, False, slots_per_gpu - 1)], deadline)
    return max(0.0, 1.0 - float(same.sum()) / tot)


def _off_diagonal(coactivation: np.ndarray) -> np.ndarray:
    c = coactivation.astype(np.float64).copy()
    idx = np.arange(c.shape[1])
    c[:, idx, idx] = 0.0
    return c


# ---- the objective ---------------------------------------------------------------------------
def lower_bound(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
                weights: Weights = Weights(), *,
                time_limit: float = DEFAULT_TIME_LIMIT) -> ObjectiveValue:
    """Lower bounds on each objective term and the weighted total, for any placement of
    ``stats`` on this cluster (migration is bounded by 0: staying put is always allowed).

    ``time_limit`` (seconds) caps the flow computations; layer pairs not reached in time, and
    terms whose weight is 0, use the faster, weaker bound, so the answer is always valid.
    """
    start = time.monotonic()
    deadline = start + max(time_limit, 0.0)
    G, M, R = num_gpus, num_nodes, replicas
    N = stats.num_experts
    S = (N + R) // G
    # Exact per-layer partitions get at most a quarter of the time (when the load is weighed).
    load_deadline = start + 0.25 * max(time_limit, 0.0) if weights.load > 0 else None
    imb = float(load_bound(stats.load, G, S, R, load_deadline).mean())
    copies = min(G, R + 1)

    def by(weight: float) -> float:
        # A term the objective does not weigh gets the fast bound: the time goes to the others.
        return deadline if weight > 0 else -math.inf

    # Flows first for every term (fast), then eigenvalue refinements while time lasts, node
    # level first: the flow is weakest for a few large parts (a bisection of each layer).
    cg = cn = co = 0.0
    terms: list[tuple[np.ndarray, np.ndarray, int, bool, int, float]] = []
    if stats.transitions is not None and stats.num_layers > 1:
        t = stats.transitions.astype(np.float64)
        tot = float(t.sum())
        if tot > 0:
            gpu_same = _pairs_colocated(t, S, copies, R, by(weights.traffic))
            if M > 1:
                node_same = _pairs_colocated(t, S * (G // M), min(M, R + 1), R, by(weights.node))
                terms.append((node_same, t, M, True, S * (G // M), weights.node))
            terms.append((gpu_same, t, G, True, S, weights.traffic))
    c = None
    if stats.coactivation is not None:
        c = _off_diagonal(stats.coactivation)
        if c.sum() > 0:
            co_same = _pairs_colocated(c, S - 1, copies, R, by(weights.coact))
            terms.append((co_same, c, G, False, S - 1, weights.coact))
    if R == 0 and N % G == 0 and G % M == 0:  # equal parts, as the eigenvalue bound assumes
        _refine_spectral([(same, mats, parts, bip, deg)
                          for same, mats, parts, bip, deg, weight in terms if weight > 0],
                         deadline)
    if stats.transitions is not None and stats.num_layers > 1:
        tot = float(stats.transitions.sum())
        if tot > 0:
            cg = max(0.0, 1.0 - float(gpu_same.sum()) / tot)
            if M > 1:
                cn = max(0.0, 1.0 - float(node_same.sum()) / tot)
    if c is not None and c.sum() > 0:
        co = max(0.0, 1.0 - float(co_same.sum()) / float(c.sum()))
    total = weights.load * imb + weights.traffic * cg + weights.node * cn + weights.coact * co
    return ObjectiveValue(total, imb, cg, cn, 0.0, co)


def distinct_floor(k: int, pairs: float) -> float:
    """Convex lower bound on the distinct groups of k items with ``pairs`` same-group pairs.

    ``d`` groups hold at least ``p(d)`` pairs (balanced sizes), so a token with P pairs spans
    at least ``min{d : p(d) <= P}`` groups; the lower convex hull through ``(p(d), d)`` is below
    that step function and convex, so by Jensen it also bounds the mean over tokens at the mean
    pair count.
    """
    if k <= 1:
        return float(k)
    pts = []
    for d in range(k, 0, -1):
        q, r = divmod(k, d)
        pts.append((r * (q + 1) * q / 2 + (d - r) * q * (q - 1) / 2, float(d)))
    hull: list[tuple[float, float]] = []
    for pt in pts:  # P increasing, d decreasing: keep the lower convex chain
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (pt[0] - x1) >= (pt[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(pt)
    if pairs >= hull[-1][0]:
        return 1.0
    for (x1, y1), (x2, y2) in itertools.pairwise(hull):
        if pairs <= x2:
            return y1 + (y2 - y1) * (max(pairs, x1) - x1) / (x2 - x1)
    return 1.0  # pragma: no cover


def distinct_bound(coactivation: np.ndarray, num_tokens: int, top_k: int, num_gpus: int,
                   num_nodes: int, slots_per_gpu: int, replicas: int = 0, *,
                   time_limit: float = DEFAULT_TIME_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """``([L], [L])`` lower bounds, per MoE layer, on the mean over tokens of the distinct GPUs
    and the distinct nodes holding a token's experts, for every placement without replicas
    (nodes: all ones on one node). ``top_k``: the fewest distinct experts a token has.

    The layer's co-located pairs are at most the co-activation flow bound (``coactivation``
    counts each unordered pair twice; its diagonal, the load, is ignored), so tokens average at
    most ``P`` co-located pairs, and ``distinct_floor(k, P)`` bounds their mean distinct GPUs
    (a token with more experts needs at least as many GPUs for the same pairs, so the fewest
    distinct experts is the safe k). Each token also needs ``ceil(k / S)`` GPUs at least.
    """
    if replicas:
        raise InputError("static_bound", "replicas", f"{replicas} replicas: the bound covers "
                         "placements with each expert once", "pass replicas=0")
    if coactivation.ndim != 3 or coactivation.shape[1] != coactivation.shape[2]:
        raise InputError("static_bound", "coactivation", f"shape {coactivation.shape} is not "
                         "[layers, experts, experts]", "pass RoutingStats.coactivation")
    L, N, _ = coactivation.shape
    G, M, S = num_gpus, num_nodes, slots_per_gpu
    if num_tokens <= 0 or L == 0:
        return np.zeros(L), np.zeros(L)
    if G < 1 or M < 1 or G % M or S * G != N:
        raise InputError("static_bound", "num_gpus", f"{G} GPUs x {S} slots in {M} nodes do "
                         f"not hold {N} experts once each", "pass S = N / G and M dividing G")
    deadline = time.monotonic() + max(time_limit, 0.0)
    c = _off_diagonal(coactivation)
    k = top_k

    def mean_distinct(window: int) -> np.ndarray:
        per_layer = []
        for cl in c:
            same = min(_colocated(cl, window - 1, 0, 1, deadline),
                       spectral_colocated(cl, N // window, 1, deadline)[0])
            pairs = same / 2.0
            per_layer.append(max(distinct_floor(k, pairs / num_tokens), math.ceil(k / window)))
        return np.array(per_layer, np.float64)

    gpu = mean_distinct(S)
    node = mean_distinct(S * (G // M)) if M > 1 else np.ones(L)
    return gpu, node


def static_bound(coactivation: np.ndarray, num_tokens: int, top_k: int, num_gpus: int,
                 num_nodes: int, slots_per_gpu: int, replicas: int = 0, *,
                 time_limit: float = DEFAULT_TIME_LIMIT) -> tuple[float, float]:
    """Lower bounds on ``traffic_static`` and ``traffic_static_remote_nodes`` with a uniform
    home: ``(1 - 1/G) * mean distinct GPUs`` and ``(1 - 1/M) * mean distinct nodes`` holding a
    token's experts, over tokens and MoE layers, for every placement without replicas
    (``distinct_bound`` per layer, averaged: a token's D GPUs hold its home with chance D / G).
    """
    gpu, node = distinct_bound(coactivation, num_tokens, top_k, num_gpus, num_nodes,
                               slots_per_gpu, replicas, time_limit=time_limit)
    if num_tokens <= 0 or gpu.size == 0:
        return 0.0, 0.0
    M = num_nodes
    return ((1.0 - 1.0 / num_gpus) * float(gpu.mean()),
            (1.0 - 1.0 / M) * float(node.mean()) if M > 1 else 0.0)

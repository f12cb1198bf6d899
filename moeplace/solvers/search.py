"""Scalable placement search: layer sweeps of GPU relabelling and slot swaps against neighbour layers.

For layer l with its neighbours fixed, placing a copy of expert e on GPU g co-locates
``A[e, g]`` transition pairs (from layer l-1's copies on g and layer l+1's copies on g, each
neighbour weighted by the share of its tokens that copy serves), plus the node-level analogue.
Each sweep visits the layers (alternating direction) and (1) permutes whole GPUs of the layer by
an exact linear assignment (loads unchanged), then (2) applies batches of improving swaps of two
slots on different GPUs, keeping every GPU's load within the layer's cap and never putting two
copies of one expert on one GPU. The cap is the start placement's max GPU load times
``1 + balance_slack``, so the result is never less balanced than the start (e.g. EPLB).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from ortools.graph.python import linear_sum_assignment

from moeplace._limits import memory_cap
from moeplace._progress import Progress
from moeplace.placement import Placement
from moeplace.solvers.objective import Weights
from moeplace.traces import RoutingStats


@dataclass
class SearchReport:
    """What the search did."""

    sweeps: int = 0
    swaps: int = 0
    relabels: int = 0
    assignments: int = 0
    restarts: int = 1
    seconds: float = 0.0
    stopped: str = "converged"
    history: list[float] = field(default_factory=list)


class _Layers:
    """Mutable per-layer state: slot contents, per-copy loads, GPU loads."""

    def __init__(self, stats: RoutingStats, start: Placement) -> None:
        self.L, self.P = start.phy2log.shape
        self.G, self.S = start.num_gpus, start.slots_per_gpu
        self.n = start.gpus_per_node
        self.N = start.num_experts
        self.phy = start.phy2log.copy()
        self.load = stats.load.astype(np.float64)
        self.cnt = start.logcnt()

    def copy_w(self, l: int) -> np.ndarray:
        e = self.phy[l]
        return self.load[l, e] / self.cnt[l, e]

    def gpu_load(self, l: int) -> np.ndarray:
        return self.copy_w(l).reshape(self.G, self.S).sum(axis=1)

    def share(self, l: int) -> np.ndarray:
        """``[N, G]`` share of expert e's tokens served on GPU g at layer l."""
        out = np.zeros((self.N, self.G))
        np.add.at(out, (self.phy[l], np.arange(self.P) // self.S), 1.0)
        return out / self.cnt[l][:, None]


def _gain(st: _Layers, trans: np.ndarray | None, l: int, w: Weights, tot: float,
          cur_inc: np.ndarray | None, mig_unit: float) -> np.ndarray:
    """``[N, G]`` objective decrease from serving all of expert e's layer-l tokens on GPU g."""
    A = np.zeros((st.N, st.G))
    if trans is not None and tot > 0:
        if l > 0:
            A += trans[l - 1].T.astype(np.float64) @ st.share(l - 1)
        if l + 1 < st.L:
            A += trans[l].astype(np.float64) @ st.share(l + 1)
    gain = (w.traffic / tot) * A if tot > 0 else A
    if w.node and st.n < st.G and tot > 0:
        An = A.reshape(st.N, st.G // st.n, st.n).sum(axis=2)
        gain = gain + (w.node / tot) * np.repeat(An, st.n, axis=1)
    if cur_inc is not None and w.migration:
        gain = gain + mig_unit * cur_inc[l]
    return gain


def _relabel(st: _Layers, l: int, gain: np.ndarray) -> bool:
    """Permute whole GPUs of layer l to maximise co-location (loads move with their GPU)."""
    G, S = st.G, st.S
    e = st.phy[l].reshape(G, S)
    per_copy = gain[e] / st.cnt[l][e][:, :, None]  # [G(h), S, G(g)]
    value = per_copy.sum(axis=1)  # value[h, g] of moving group h to GPU g
    scale = 1e9 / max(float(np.abs(value).max()), 1e-30)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    cost = np.round(-value * scale).astype(np.int64)
    for h in range(G):
        for g in range(G):
            lsa.add_arc_with_cost(h, g, int(cost[h, g]))
    if lsa.solve() != lsa.OPTIMAL:
        return False
    target = np.array([lsa.right_mate(h) for h in range(G)])
    if (target == np.arange(G)).all():
        return False
    if value[np.arange(G), target].sum() <= value[np.arange(G), np.arange(G)].sum() + 1e-12:
        return False
    new = np.empty_like(e)
    new[target] = e
    st.phy[l] = new.reshape(-1)
    return True


def _assign_exact(st: _Layers, l: int, gain: np.ndarray, cap: float,
                  cz: np.ndarray | None = None) -> bool:
    """Re-place all copies of layer l by an exact slot assignment maximising co-location, then
    repair any GPU over the load cap; keep the result only if it is feasible and better."""
    S, P = st.S, st.P
    slot_gpu = np.arange(P) // S
    e = st.phy[l]
    if st.P != st.N:  # copies of one expert must land on distinct GPUs: not a plain assignment
        return False
    if 5 * 8 * P * P > memory_cap() // 2:  # five [P, P] arrays; the swap passes still run
        return False
    value = gain[e][:, slot_gpu]  # [copy, slot]
    before = value[np.arange(P), np.arange(P)].sum() + _coact_value(st, l, cz)
    scale = 1e9 / max(float(np.abs(value).max()), 1e-30)
    cost = np.round(-value * scale).astype(np.int64)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    tails = np.repeat(np.arange(P), P)
    heads = np.tile(np.arange(P), P)
    lsa.add_arcs_with_cost(tails, heads, cost.ravel())
    if lsa.solve() != lsa.OPTIMAL:
        return False
    mate = np.array([lsa.right_mate(i) for i in range(P)])
    old = st.phy[l].copy()
    new = np.empty_like(old)
    new[mate] = e
    st.phy[l] = new
    if not _repair(st, l, gain, cap):
        st.phy[l] = old
        return False
    e2 = st.phy[l]
    after = gain[e2, slot_gpu].sum() + _coact_value(st, l, cz)
    if after <= before + 1e-12:
        st.phy[l] = old
        return False
    return True


def _repair(st: _Layers, l: int, gain: np.ndarray, cap: float, max_steps: int = 10_000) -> bool:
    """Swap copies off overloaded GPUs, losing as little co-location as possible."""
    G, S, P = st.G, st.S, st.P
    slot_gpu = np.arange(P) // S
    for _ in range(max_steps):
        w = st.copy_w(l)
        gl = w.reshape(G, S).sum(axis=1)
        over = int(np.argmax(gl))
        if gl[over] <= cap + 1e-9:
            return True
        e = st.phy[l]
        c = gain[e][:, slot_gpu]  # value of copy p in slot q's GPU
        own = c[np.arange(P), np.arange(P)]
        ps = np.flatnonzero(slot_gpu == over)
        qs = np.flatnonzero(slot_gpu != over)
        d = w[ps][:, None] - w[qs][None, :]  # load leaving the overloaded GPU
        new_q = gl[slot_gpu[qs]][None, :] + d
        ok = (d > 1e-12) & (new_q <= cap + 1e-9)
        loss = (own[ps][:, None] + own[qs][None, :] - c[ps][:, qs] - c[qs][:, ps].T)
        score = np.where(ok, -loss + 1e-9 * np.minimum(d, gl[over] - cap), -np.inf)
        if not np.isfinite(score).any():
            return False
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        p, q = ps[i], qs[j]
        st.phy[l, p], st.phy[l, q] = st.phy[l, q], st.phy[l, p]
    return False


def _coact_value(st: _Layers, l: int, cz: np.ndarray | None) -> float:
    """Weighted co-located co-activation pairs at layer l (0 without a co-activation term)."""
    if cz is None:
        return 0.0
    sh = st.share(l)
    return float(np.einsum("ag,ab,bg->", sh, cz, sh) / 2)


def _swap_pass(st: _Layers, l: int, gain: np.ndarray, cap: float, w: Weights,
               mean_load: float, cz: np.ndarray | None = None, max_rounds: int = 200) -> int:
    """Batches of improving slot swaps at layer l; returns the number applied."""
    G, S, P = st.G, st.S, st.P
    slot_gpu = np.arange(P) // S
    done = 0
    load_coef = w.load / (st.L * mean_load) if mean_load > 0 else 0.0
    for _ in range(max_rounds):
        e = st.phy[l]
        c = gain[e] / st.cnt[l][e][:, None]  # [P, G] value of each copy on each GPU
        wcopy = st.copy_w(l)
        gl = wcopy.reshape(G, S).sum(axis=1)
        own = c[np.arange(P), slot_gpu]
        cg = c[:, slot_gpu]  # cg[p, q] = value of copy p on q's GPU
        delta = cg + cg.T - own[:, None] - own[None, :]  # gain of swapping p and q
        if cz is not None:
            # Within-layer pairs: K[p, g] = co-activation of p's expert with what GPU g holds.
            K = (cz[e] @ st.share(l)) / st.cnt[l][e][:, None]
            Kg = K[:, slot_gpu]
            Kown = K[np.arange(P), slot_gpu]
            delta = delta + Kg + Kg.T - Kown[:, None] - Kown[None, :] - 2 * cz[e][:, e] / (
                st.cnt[l][e][:, None] * st.cnt[l][e][None, :])
        diff = wcopy[None, :] - wcopy[:, None]  # load change on p's GPU when p<->q
        new_p = gl[slot_gpu][:, None] + diff
        new_q = gl[slot_gpu][None, :] - diff
        ok = (slot_gpu[:, None] != slot_gpu[None, :]) & (new_p <= cap + 1e-9) & (new_q <= cap + 1e-9)
        # No GPU may hold two copies of one expert after the swap.
        inc = np.zeros((st.N, G), bool)
        inc[e, slot_gpu] = True
        clash = inc[e][:, slot_gpu]  # clash[p, q]: p's expert already on q's GPU
        ok &= ~clash & ~clash.T
        ok &= e[:, None] != e[None, :]
        # Load term: penalise raising the layer's max GPU load.
        cur_max = gl.max()
        raise_max = np.maximum(np.maximum(new_p, new_q) - cur_max, 0.0)
        delta = delta - load_coef * raise_max
        delta = np.where(ok, delta, -np.inf)
        np.fill_diagonal(delta, -np.inf)
        flat = np.flatnonzero(delta > 1e-12)
        if flat.size == 0:
            break
        order = flat[np.argsort(-delta.ravel()[flat], kind="stable")]
        used = np.zeros(G, bool)
        applied = 0
        for idx in order[: 4 * G]:
            p, q = divmod(int(idx), P)
            gp, gq = slot_gpu[p], slot_gpu[q]
            if used[gp] or used[gq]:
                continue
            used[gp] = used[gq] = True
            st.phy[l, p], st.phy[l, q] = st.phy[l, q], st.phy[l, p]
            applied += 1
        done += applied
        if applied == 0:
            break
    return done


def search(stats: RoutingStats, start: Placement, *, weights: Weights = Weights(),
           balance_slack: float = 0.0, time_limit: float = 30.0, max_sweeps: int = 50,
           current: Placement | None = None, seed: int = 0,
           cap: np.ndarray | None = None,
           show_progress: bool | None = None) -> tuple[Placement, SearchReport]:
    """Improve ``start`` (same cluster, replica counts kept) on traffic and balance."""
    t0 = time.perf_counter()
    st = _Layers(stats, start)
    trans = stats.transitions
    tot = float(trans.sum()) if trans is not None else 0.0
    rep = SearchReport()
    if cap is None:
        cap = np.array([st.gpu_load(l).max() for l in range(st.L)]) * (1 + balance_slack)
    mean = st.load.sum(axis=1) / st.G
    cz_all = None
    if weights.coact and stats.coactivation is not None:
        c = stats.coactivation.astype(np.float64).copy()
        idx = np.arange(st.N)
        c[:, idx, idx] = 0.0
        # Objective units: a co-located pair counts twice in c (a,b and b,a).
        cz_all = c * (weights.coact / max(c.sum(), 1e-30)) * 2
    cur_inc = current.incidence().astype(np.float64) if current is not None else None
    mig_unit = weights.migration / st.phy.size
    rng = np.random.default_rng(seed)
    layers = np.arange(st.L)
    # Time-based bar: the search runs until it converges or its time limit.
    bar = Progress(round(time_limit, 1), "search", "s", enabled=show_progress)
    for sweep in range(max_sweeps):
        changed = 0
        order = layers if sweep % 2 == 0 else layers[::-1]
        if seed and sweep == 0:
            order = rng.permutation(st.L)
        for l in order:
            if time.perf_counter() - t0 > time_limit:
                rep.stopped = "time limit"
                break
            g = _gain(st, trans, int(l), weights, tot, cur_inc, mig_unit)
            if trans is not None and _relabel(st, int(l), g):
                rep.relabels += 1
                changed += 1
            cz = None if cz_all is None else cz_all[l]
            if trans is not None and _assign_exact(st, int(l), g, float(cap[l]), cz):
                rep.assignments += 1
                changed += 1
            n = _swap_pass(st, int(l), g, float(cap[l]), weights, float(mean[l]), cz)
            rep.swaps += n
            changed += n
            bar.set(round(min(time.perf_counter() - t0, time_limit), 1))
        bar.note(f"sweep {sweep + 1}, {rep.swaps} swaps")
        rep.sweeps = sweep + 1
        if rep.stopped == "time limit" or changed == 0:
            break
    bar.close()
    rep.seconds = time.perf_counter() - t0
    out = Placement(st.phy, start.num_gpus, start.num_nodes, start.num_experts,
                    moe_layer_ids=start.moe_layer_ids,
                    info={"method": "search", "sweeps": rep.sweeps, "swaps": rep.swaps,
                          "relabels": rep.relabels, "stopped": rep.stopped})
    return out, rep

"""Held-back balance for every method: the check the static search makes, applied after any
method and reported the same way for all.

The statistics split the load by request into hashed buckets (``robust.bucket_scenarios``); the
odd-numbered ones are never seen by a search, so they estimate each layer's balance on requests
the placement was not fitted to. A method that balances only the fitted load (the cross-layer
search, MoETuner's min-max clusters, the exact methods' load term) can fill every GPU up to the
fitted optimum while putting experts that rise and fall together on one GPU, and on new requests
lose to EPLB, whose greedy packing hedges. ``hold_balance`` therefore keeps a layer of the
method's placement only where that layer's held-back imbalance is at most EPLB's
(+ ``balance_slack``) less one standard error over the buckets, and the mean over layers
within EPLB's less one standard error (``robust.choose_robust``, the static search's rule).
The other layers take, as the static search's do, a balance-first layout (EPLB's layer after
descent on the even buckets' summed max GPU load alone), the method's layer repaired into the
static search's limits, or EPLB's layout, each under the same per-layer test; their GPUs are
permuted to co-locate as much cross-layer traffic with their neighbours as a permutation can
(it moves whole GPUs, so a layer's balance is unchanged). With too few requests to judge and
no slack every layer takes EPLB's layout, as the static search returns its start.

A method's proof (``status`` "optimal", its bound) is about the fitted problem; the report keeps
that objective (``method_objective``, ``method_gap``) next to the fallback, which is listed per
layer (``fallback_layers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from ortools.graph.python import linear_sum_assignment

from moeplace.placement import Placement
from moeplace.solvers.objective import Weights
from moeplace.solvers.robust import (
    bucket_scenarios,
    choose_robust,
    layer_imbalance,
    too_few_requests,
)
from moeplace.solvers.search import _gain, _Layers, _relabel
from moeplace.traces import RoutingStats

# How the held-back check went (``HeldOut.status``).
CHECKED = "checked"  # this module held the layers to the reference's held-back balance
BY_METHOD = "checked by the method"  # the method made the same check itself (static search)
BASELINE = "baseline"  # a reference layout: measured, never changed
TOO_FEW = "too few requests"  # every layer took the reference's layout
NO_BUCKETS = "no request buckets"  # statistics without a request split: nothing to judge with
NO_HELD = "no held-back buckets"  # slack given and fewer than four buckets: nothing to judge with
STATUSES = (CHECKED, BY_METHOD, BASELINE, TOO_FEW, NO_BUCKETS, NO_HELD)


@dataclass
class HeldOut:
    """Balance on the held-back request buckets, of the placement returned and of EPLB.

    Imbalances are means over layers of the mean over held-back buckets of max / mean GPU load
    (the phase's cost with ``--phase decode``, speed-aware with GPU speeds); None where no
    bucket is held back. ``method_load_imbalance_mean`` is the method's own placement before any
    fallback; ``fallback_layers`` are the layers that took the reference's layout here.
    """

    status: str
    reference: str
    held_buckets: int = 0
    load_imbalance_mean: float | None = None
    reference_load_imbalance_mean: float | None = None
    method_load_imbalance_mean: float | None = None
    fallback_layers: list[int] | None = field(default_factory=list)
    num_fallback_layers: int = 0
    method_objective: float | None = None
    method_gap: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reference": self.reference,
                "held_buckets": self.held_buckets,
                "load_imbalance_mean": self.load_imbalance_mean,
                "reference_load_imbalance_mean": self.reference_load_imbalance_mean,
                "method_load_imbalance_mean": self.method_load_imbalance_mean,
                "fallback_layers": self.fallback_layers,
                "num_fallback_layers": self.num_fallback_layers,
                "method_objective": self.method_objective, "method_gap": self.method_gap}


def reference_name(replicas: int) -> str:
    """The layout a layer falls back to: EPLB as the stacks run it, or with replicas EPLB with
    the copies of one expert on distinct GPUs (the layout the search keeps to)."""
    return "eplb" if replicas == 0 else "eplb-distinct"


def held_scenarios(stats: RoutingStats, tokens_per_step: int | None = None) -> np.ndarray:
    """``[L, H, N]`` the held-back request buckets (``robust.bucket_scenarios``)."""
    return bucket_scenarios(stats, tokens_per_step)[2]


def _mean(imb: np.ndarray) -> float | None:
    return None if imb.shape[1] == 0 else float(imb.mean())


def measure(stats: RoutingStats, placement: Placement, reference: Placement, ref_name: str,
            status: str, tokens_per_step: int | None = None,
            speeds: np.ndarray | None = None) -> HeldOut:
    """The held-back figures of ``placement`` and ``reference`` without changing either (for
    baselines and methods that made the check themselves)."""
    held = held_scenarios(stats, tokens_per_step) if stats.load_buckets is not None else None
    if held is None or held.shape[1] == 0:
        return HeldOut(status if held is not None else NO_BUCKETS, ref_name, 0, fallback_layers=None)
    mine = _mean(layer_imbalance(placement, held, speeds))
    return HeldOut(status, ref_name, held.shape[1], mine,
                   _mean(layer_imbalance(reference, held, speeds)), mine, fallback_layers=None)


def hold_balance(stats: RoutingStats, placement: Placement, reference: Placement, ref_name: str,
                 *, balance_slack: float = 0.0, weights: Weights = Weights(),
                 current: Placement | None = None, tokens_per_step: int | None = None,
                 speeds: np.ndarray | None = None, seconds: float = 1.0
                 ) -> tuple[Placement, HeldOut]:
    """``placement`` held to ``reference``'s balance on the held-back request buckets, layer by
    layer (see the module docstring). Each layer keeps the method's layout, a repaired one, a
    balance-first one or ``reference``'s, each allowed only where its held-back imbalance is at
    most ``reference``'s layer's (+ ``balance_slack``), so that the mean over layers is at
    most ``reference``'s (+ ``balance_slack``, less one standard error), at the most co-located
    cross-layer traffic with the method's neighbour layers (``robust.choose_robust``, the
    static search's rule; ``_balance_first`` builds the middle two within ``seconds``, without
    replicas). The layers not kept then have their GPUs permuted for co-location with their
    final neighbours."""
    if placement.phy2log.shape != reference.phy2log.shape or stats.load_buckets is None:
        out = measure(stats, placement, reference, ref_name, NO_BUCKETS, tokens_per_step, speeds)
        out.status = NO_BUCKETS if stats.load_buckets is None else "not comparable"
        return placement, out
    L = placement.num_layers
    held = held_scenarios(stats, tokens_per_step)
    H = held.shape[1]
    mine = layer_imbalance(placement, held, speeds)  # [L, H]
    ref = layer_imbalance(reference, held, speeds)
    rows = [reference.phy2log, placement.phy2log]  # candidates per layer: 0 reference, 1 method
    if too_few_requests(stats, balance_slack):
        pick, status = np.zeros(L, np.int64), TOO_FEW
    elif H == 0:
        pick, status = np.ones(L, np.int64), NO_HELD
    elif (_layer_margin(mine - ref) <= balance_slack + 1e-12).all() and _within(
            mine - ref, balance_slack * L):
        pick, status = np.ones(L, np.int64), CHECKED  # nothing would exceed: keep every layer
    else:
        gains = _neighbour_gains(stats, placement, weights, current)
        imbs = [ref, mine]
        if gains is None:  # nothing depends on where: any layer the method placed is worth keeping
            values = [np.zeros(L), -np.ones(L)]
        else:
            if speeds is None:  # with GPU speeds a permutation would change the layer's balance
                rows[0] = _permuted(reference, gains)
            values = [-_colocated(gains, r, placement) for r in rows]
            if placement.num_replicas == 0 and speeds is None:
                end = time.monotonic() + max(seconds, 0.0)
                for cand in _balance_first(stats, reference, rows[0], placement, gains,
                                           balance_slack, tokens_per_step, end):
                    rows.insert(-1, cand)
                    values.insert(-1, -_colocated(gains, cand, placement))
                    imbs.insert(-1, layer_imbalance(replace(reference, phy2log=cand), held, speeds))
        excess = np.stack([i - ref for i in imbs], axis=1)  # [L, C, H]
        # Per layer: a layout whose own held-back imbalance exceeds the reference's (+ slack)
        # is out, so no layer leans on another's margin (a margin on these small slices of
        # the requests need not carry over to new traffic as a whole); the summed excess is
        # then held within the budget as the static search holds it.
        # ... with one standard error over the buckets, as the budget's test has it.
        allowed = np.stack([_layer_margin(excess[:, c]) for c in range(excess.shape[1])],
                           axis=1) <= balance_slack + 1e-12
        allowed[:, 0] = True  # the reference itself
        out_of_reach = 1e30  # finite, so the greedy's ratios stay numbers
        vals = np.where(allowed, np.stack(values, axis=1), out_of_reach)
        pick = choose_robust(vals, np.where(allowed[:, :, None], excess, out_of_reach),
                             balance_slack * L)
        status = CHECKED
    kept = len(rows) - 1  # the method's column
    phy = np.stack([rows[c][l] for l, c in enumerate(pick)])
    back = np.flatnonzero((pick != kept) & ~(phy == placement.phy2log).all(axis=1))
    out = placement
    if back.size:
        out = replace(placement, phy2log=phy, info=dict(placement.info))
        if speeds is None:  # with GPU speeds a permutation would change the layer's balance
            out = _relabel_layers(stats, out, back, weights, current)
    final = layer_imbalance(out, held, speeds)
    return out, HeldOut(status, ref_name, H, _mean(final), _mean(ref), _mean(mine),
                        [int(l) for l in back], int(back.size))


def _layer_margin(excess: np.ndarray) -> np.ndarray:
    """``[L]`` each layer's mean excess over the buckets ``[L, H]`` plus one standard error."""
    H = excess.shape[1]
    se = excess.std(axis=1, ddof=1) / np.sqrt(H) if H > 1 else 0.0
    return excess.mean(axis=1) + se


def _within(excess: np.ndarray, budget: float) -> bool:
    """Whether the summed excess ``[L, H]`` over layers is within ``budget`` less one standard
    error over the buckets (``robust.choose_robust``'s test for one choice)."""
    total = excess.sum(axis=0)
    se = float(total.std(ddof=1) / np.sqrt(len(total))) if len(total) > 1 else 0.0
    return float(total.mean()) <= budget - se + 1e-12


def _neighbour_gains(stats: RoutingStats, placement: Placement, weights: Weights,
                     current: Placement | None) -> np.ndarray | None:
    """``[L, N, G]`` the search's co-location gain of expert e on GPU g at each layer, the
    neighbour layers as ``placement`` has them (None when no term depends on where)."""
    ctx = _gain_context(stats, placement, weights, current)
    if ctx is None:
        return None
    st, trans, tot, cur_inc, mig_unit = ctx
    return np.stack([_gain(st, trans, l, weights, tot, cur_inc, mig_unit) for l in range(st.L)])


def _gain_context(stats: RoutingStats, placement: Placement, weights: Weights,
                  current: Placement | None) -> tuple[Any, ...] | None:
    """``(layers, transitions, their total, current incidence, migration unit)`` for
    ``_gain``, or None when no term depends on where an expert is."""
    trans = stats.transitions
    migrating = current is not None and weights.migration > 0 and (
        current.phy2log.shape == placement.phy2log.shape)
    if (trans is None or not (weights.traffic or weights.node)) and not migrating:
        return None
    st = _Layers(stats, placement)
    tot = float(trans.sum()) if trans is not None else 0.0
    cur_inc = current.incidence().astype(np.float64) if migrating and current is not None else None
    return st, trans, tot, cur_inc, weights.migration / st.phy.size


def _colocated(gains: np.ndarray | None, phy: np.ndarray, like: Placement) -> np.ndarray:
    """``[L]`` summed gain of each layer's copies where ``phy`` puts them (higher is better)."""
    L, P = phy.shape
    if gains is None:
        return np.zeros(L)
    S = like.slots_per_gpu
    cnt = np.stack([np.bincount(r, minlength=like.num_experts) for r in phy])
    slot_gpu = np.arange(P) // S
    return np.array([float((gains[l][phy[l], slot_gpu] / cnt[l][phy[l]]).sum()) for l in range(L)])


def _permuted(reference: Placement, gains: np.ndarray) -> np.ndarray:
    """``reference``'s rows with each layer's GPUs permuted for the most co-location (each
    GPU keeps its copies, so every layer's balance is unchanged)."""
    G, S = reference.num_gpus, reference.slots_per_gpu
    rows = reference.phy2log.reshape(reference.num_layers, G, S)
    out = np.empty_like(rows)
    slot_gpu = np.arange(G * S) // S
    cnt = reference.logcnt()
    for l in range(reference.num_layers):
        # value[h, g]: gain of moving GPU h's copies to GPU g
        value = np.zeros((G, G))
        np.add.at(value, slot_gpu, gains[l][reference.phy2log[l]] / cnt[l][reference.phy2log[l]][:, None])
        out[l][_assignment(value)] = rows[l]
    return out.reshape(reference.phy2log.shape)


def _balance_first(stats: RoutingStats, reference: Placement, start: np.ndarray,
                   placement: Placement, gains: np.ndarray, balance_slack: float,
                   tokens_per_step: int | None, deadline: float
                   ) -> tuple[np.ndarray, ...]:
    """Two ``[L, N]`` candidates within the static search's limits (``static.Balance``: the
    fitted max GPU load and the summed max over the even request buckets within
    ``reference``'s, x (1 + slack); no replicas): the balance-first layout, each layer of
    ``start`` (``reference``'s rows permuted) after descent on the buckets' summed max alone,
    its GPUs then permuted for co-location; and each layer of ``placement`` repaired into the
    limits by the swaps that lose the least co-location per unit of excess removed. A layer
    left when time runs out, or whose repair gets stuck, keeps ``start``'s layout."""
    from moeplace.solvers.static import Balance, scenario_caps

    loads, caps, _ = scenario_caps(stats, reference, balance_slack, tokens_per_step)
    G = reference.num_gpus
    permuted = replace(reference, phy2log=start).expert_gpu().copy()  # [L, N]
    steady, repaired = permuted.copy(), permuted.copy()
    mine = placement.expert_gpu()
    bals = [Balance(loads[l], caps[l]) for l in range(permuted.shape[0])]
    # Balance-first layers for all layers before any repair: they make the room the others use.
    for l, bal in enumerate(bals):
        if time.monotonic() >= deadline:
            break
        steady[l] = _best_gpus(_steady(permuted[l], bal, G, deadline), gains[l], G)
    for l, bal in enumerate(bals):
        if time.monotonic() >= deadline:
            break
        fixed = _repair(mine[l], gains[l], bal, G, deadline)
        if fixed is not None:
            repaired[l] = fixed
    return tuple(np.argsort(c, axis=1, kind="stable") for c in (steady, repaired))


def _best_gpus(gpu_of: np.ndarray, A: np.ndarray, G: int) -> np.ndarray:
    """``gpu_of`` with its GPUs permuted for the most co-location (loads move along)."""
    value = np.zeros((G, G))
    np.add.at(value, gpu_of, A)
    return _assignment(value)[gpu_of]


def _steady(gpu_of: np.ndarray, bal: Any, G: int, deadline: float,
            max_steps: int = 10_000) -> np.ndarray:
    """Descent on balance alone (the static search's balance-first candidate): the swap that
    lowers the summed max GPU load over the even request buckets most, within the fitted
    cap, until none lowers it."""
    from moeplace.solvers.static import _scenario_gpu_loads, _swap_loads

    gpu_of = gpu_of.copy()
    loads, caps = bal.loads, bal.caps
    if loads.shape[0] < 2:
        return gpu_of
    N = len(gpu_of)
    for _ in range(max_steps):
        if time.monotonic() >= deadline:
            break
        _, new_a, new_b, new_max = _swap_loads(gpu_of, loads, G)
        gl = _scenario_gpu_loads(gpu_of, loads, G)  # [B, G]
        now = gl[1:].max(axis=1).sum()
        drop = now - new_max[1:].sum(axis=0)
        ok = ((new_a[0] <= caps[0] + 1e-9) & (new_b[0] <= caps[0] + 1e-9)
              & (gpu_of[:, None] != gpu_of[None, :]))
        drop = np.where(ok, drop, -np.inf)
        order = np.argsort(-drop, axis=None)[:8 * G]
        # A batch: the best swap, then the next best on GPUs not touched yet, each kept only if
        # the summed max (recounted) still drops and the fitted cap holds.
        used = np.zeros(G, bool)
        applied = 0
        for idx in order:
            a, b = divmod(int(idx), N)
            if not drop[a, b] > 1e-9:
                break
            ga, gb = gpu_of[a], gpu_of[b]
            if used[ga] or used[gb]:
                continue
            d = loads[:, b] - loads[:, a]  # [B] load a's GPU gains
            new = gl.copy()
            new[:, ga] += d
            new[:, gb] -= d
            total = new[1:].max(axis=1).sum()
            if total >= now - 1e-9 or new[0, ga] > caps[0] + 1e-9 or new[0, gb] > caps[0] + 1e-9:
                continue
            gpu_of[a], gpu_of[b] = gb, ga
            gl, now = new, total
            used[ga] = used[gb] = True
            applied += 1
        if not applied:
            break
    return gpu_of


def _swap_gain(gpu_of: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``[a, b]`` co-location gained by swapping experts a and b (-inf on one GPU)."""
    own = A[np.arange(len(gpu_of)), gpu_of]
    delta = A[:, gpu_of].T + A[:, gpu_of] - own[:, None] - own[None, :]
    delta[gpu_of[:, None] == gpu_of[None, :]] = -np.inf
    return delta


def _repair(gpu_of: np.ndarray, A: np.ndarray, bal: Any, G: int, deadline: float,
            max_steps: int = 10_000) -> np.ndarray | None:
    """``static.repair`` for the cross-layer gain: swap experts until the map is within
    ``bal``'s limits, each time the swap losing the least co-location per unit of violation
    removed; None if it gets stuck or time runs out."""
    from moeplace.solvers.static import _scenario_gpu_loads, _swap_loads

    gpu_of = gpu_of.copy()
    N = len(gpu_of)
    loads, caps = bal.loads, bal.caps
    for _ in range(max_steps):
        if bal.violation(gpu_of, G) <= 1e-9:
            return gpu_of
        if time.monotonic() >= deadline:
            return None
        ga, new_a, new_b, new_max = _swap_loads(gpu_of, loads, G)
        c0 = caps[0]
        removed = (np.maximum(ga[0][:, None] - c0, 0) + np.maximum(ga[0][None, :] - c0, 0)
                   - np.maximum(new_a[0] - c0, 0) - np.maximum(new_b[0] - c0, 0))
        if loads.shape[0] > 1:
            gl = _scenario_gpu_loads(gpu_of, loads, G)
            over = max(float(gl[1:].max(axis=1).sum() - caps[1:].sum()), 0.0)
            removed = removed + over - np.maximum(new_max[1:].sum(axis=0) - caps[1:].sum(), 0)
        ok = (removed > 1e-9) & (gpu_of[:, None] != gpu_of[None, :])
        if not ok.any():
            return None
        loss = -_swap_gain(gpu_of, A)
        score = np.where(ok, loss / np.maximum(removed, 1e-12), np.inf)
        a, b = divmod(int(np.argmin(score)), N)
        gpu_of[a], gpu_of[b] = gpu_of[b], gpu_of[a]
    return None


def _assignment(value: np.ndarray) -> np.ndarray:
    """``[G]`` the GPU each GPU's copies move to, maximising ``value[h, g]`` summed."""
    G = value.shape[0]
    scale = 1e9 / max(float(np.abs(value).max()), 1e-30)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    cost = np.round(-value * scale).astype(np.int64)
    lsa.add_arcs_with_cost(np.repeat(np.arange(G), G), np.tile(np.arange(G), G), cost.ravel())
    if lsa.solve() != lsa.OPTIMAL:
        return np.arange(G)
    return np.array([lsa.right_mate(h) for h in range(G)])


def _relabel_layers(stats: RoutingStats, placement: Placement, layers: np.ndarray,
                    weights: Weights, current: Placement | None, max_sweeps: int = 4) -> Placement:
    """Permute whole GPUs of ``layers`` (an exact assignment, loads unchanged) to co-locate
    transition pairs with the neighbour layers and, with a migration weight, stay where
    ``current`` has the experts; sweeps until no layer improves."""
    ctx = _gain_context(stats, placement, weights, current)
    if ctx is None:
        return placement
    st, trans, tot, cur_inc, mig_unit = ctx
    for _ in range(max_sweeps):
        changed = False
        for l in (int(x) for x in layers):
            gain = _gain(st, trans, l, weights, tot, cur_inc, mig_unit)
            changed |= _relabel(st, l, gain)
        if not changed:
            break
    return replace(placement, phy2log=st.phy, info=dict(placement.info))


def describe(heldout: dict[str, Any], num_layers: int) -> str:
    """One line for the CLI: the held-back balance against the reference and the fallback."""
    h = heldout
    ref = h["reference"]
    own = ""
    if h["num_fallback_layers"] and h.get("method_objective") is not None:
        own = (f"; the method's own placement, which its status and proof are about: objective "
               f"{h['method_objective']:.4f}, gap {h['method_gap']:.1%}")
    if h["status"] == TOO_FEW:
        return (f"held-back balance: too few requests to check it, so all {num_layers} layers "
                f"took {ref}'s layout (--balance-slack accepts the risk){own}")
    if h["load_imbalance_mean"] is None:
        return f"held-back balance: not checked ({h['status']})"
    text = (f"held-back balance ({h['held_buckets']} request buckets the method did not see): "
            f"load_imbalance_mean {h['load_imbalance_mean']:.3f} vs {ref} "
            f"{h['reference_load_imbalance_mean']:.3f}")
    if h["status"] == CHECKED:
        text += (f"; {h['num_fallback_layers']} of {num_layers} layers fell back to balance-first, "
                 f"repaired or {ref} layouts (the method's own "
                 f"{h['method_load_imbalance_mean']:.3f}){own}")
    elif h["status"] == BY_METHOD:
        text += (f"; {h['num_fallback_layers']} of {num_layers} layers kept the method's start "
                 "or balance-first layout")
    return text


__all__ = ["BASELINE", "BY_METHOD", "CHECKED", "NO_BUCKETS", "NO_HELD", "STATUSES", "TOO_FEW",
           "HeldOut", "describe", "held_scenarios", "hold_balance", "measure", "reference_name"]

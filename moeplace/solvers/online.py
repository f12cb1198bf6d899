"""moeplace's online rebalancing policy: what an engine calls at every EPLB step.

API (stable; the vLLM plug-in and the SGLang launcher call exactly this)::

    from moeplace.solvers.online import OnlinePolicy, Decision

    policy = OnlinePolicy(num_gpus, num_nodes=1, num_groups=1, *, expert_bytes=0,
                          hardware=None, allow_colocated_copies=False, phase="prefill",
                          **tuning)
    d = policy.step(load, current)
    # load:    [L, N] tokens routed to each logical expert since the previous call (what the
    #          engine measured in that interval; the policy keeps its own decayed history)
    # current: [L, P] int phy2log serving now (slot p on GPU p // (P // num_gpus)), or None
    #          for a first placement (P = tuning ``num_slots``, default N rounded up to G)
    d.rebalance      # bool: False means keep ``current`` (d.phy2log is then == current)
    d.phy2log        # [L, P] int64 map to serve from now on
    d.moved_copies   # (GPU, expert) pairs a GPU holds now and did not before (vLLM's count)
    d.reason         # one line: why it rebalanced or not
    d.expected_gain  # mean over layers of the predicted drop in max-GPU load / mean load
    d.stall_s        # estimated transfer stall (0 when expert_bytes is 0)
    d.cpu_s          # CPU seconds the decision took
    d.layers_changed # layers whose map changed

``phase`` (``"prefill"`` or ``"decode"``) is the instance the policy serves in a prefill-decode
disaggregated deployment; it sets ``policy.dispatch``, the phase's kernel
(``dispatch.default_kernel``: prefill ``deepep-normal``, decode ``deepep-ll``). The rule below
prices copies against GPU load only, which both kernels need balanced, so the kernel changes no
decision today; it is recorded for whatever prices dispatch.

``hardware`` is a ``moeplace.solvers.simulator.Hardware`` or a profile name (default
``h100-nvlink``). Tuning keys: ``num_slots``, ``decays``, ``z`` (one-sided confidence of the
gain test, default 1.64), ``history`` (intervals kept for the test, default 16),
``copy_cost_tokens`` (override the cost of one copied expert, in token-expert assignments of
GPU time), ``max_moves_per_layer``, ``guard`` (default True), ``guard_intervals`` (how many
of the last intervals the engine's default refits on, default 1), ``slack_sd`` (how many
standard errors of the estimate the default's refit must win by before the guard acts,
default 0.5), ``max_search_steps`` (greedy steps per layer, default min(GPUs, 16)), ``seed``.

How it decides (everything per layer, then summed):

1. *Load estimate.* Per-layer shares of the load are kept as exponentially decayed means
   under several decays (0 = the last interval alone, as the engines refit, up to long
   memories). Each call first scores every decay on the interval that just arrived (squared
   error of its prediction) and uses the decay with the lowest decayed error: stationary
   traffic selects a long memory (noise averages out), drifting traffic a short one.
2. *Moves from the current map.* A greedy local search on the estimate starting from
   ``current``: at each step the hottest GPU either swaps one copy with a copy elsewhere
   (2 copies moved) or a spare replica of a lightly loaded expert is re-targeted to an
   expert of the hottest GPU (1 copy moved). Slots not touched keep their expert, so copies
   that stay never move. Copies of one expert stay on distinct GPUs unless
   ``allow_colocated_copies``; with a hierarchical layout (``num_groups % num_nodes == 0``
   and several nodes, as the stacks' EPLB) an expert's copies stay inside its node.
3. *Which moves pay back.* One copied expert costs ``copy_cost_tokens`` token-expert
   assignments of GPU time: the transfer (expert bytes / link bandwidth) over the time one
   token spends in one expert (2 flops per bf16 parameter = expert bytes / sustained flops),
   so the ratio is ``bf16_flops * matmul_efficiency / link bandwidth`` whatever the expert
   size. A drop of the max GPU load counts for ``horizon`` intervals, the memory of the
   selected decay (1 / (1 - decay)): a gain lasts as long as the traffic it was fitted on.
   Per layer the prefix of the move sequence with the largest net gain is kept.
4. *When not to rebalance.* A layer's kept moves are applied only when their gain, measured
   on each of the recent intervals separately (max GPU load before minus after), has a mean
   whose one-sided lower confidence bound (mean - z * standard error) still pays the copies.
5. *Guard.* Where the engine's default (DeepSeek's EPLB refit on the last interval(s), as
   ``moeplace.solvers.baselines.eplb`` reproduces it) would leave a lower max on the
   estimate than the chosen map by more than the estimate's own statistical error
   (``slack_sd`` standard errors of a GPU's load, counts taken as Poisson over the intervals
   the decay averages: a refit that wins by less has fitted noise, which small intervals
   are mostly made of), the search continues until it is no worse, paying whatever moves
   that needs (the promise: never worse balance than the default would leave). The search
   never spends more copies in a layer than the default's refit would move there, nor more
   than ``max_search_steps`` steps; where it cannot reach the refit's balance within that
   (judged from the rate its steps closed the gap), the layer lands the refit itself, its
   GPUs renumbered so that as many copies as possible stay where they are
   (``relabel_gpus``: an assignment problem per layer; a fresh fit's GPU numbering is
   arbitrary) and slots preserved. The refit is computed by ``eplb_fast``, DeepSeek's
   algorithm vectorised over layers (exactly ``baselines.eplb``), and the greedy search is
   compiled with numba where installed (``_online_kernels``; vLLM depends on numba), so a
   step costs about what the engine's own default costs (benchmarks/bench_replay.py
   measures both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.solvers.baselines import eplb, eplb_where_distinct

__all__ = ["Decision", "OnlinePolicy", "moved_copies", "relabel_gpus", "transfer_stall"]

DEFAULT_DECAYS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
_SPARES = 32  # spare copies a re-target step considers
_PROBE_STEPS = 3  # greedy steps before the search judges whether it can reach the guard
_ERR_DECAY = 0.8  # memory of the per-decay prediction error (a few intervals)


@dataclass
class Decision:
    """What ``OnlinePolicy.step`` decided (see the module docstring)."""

    rebalance: bool
    phy2log: np.ndarray
    moved_copies: int
    reason: str
    expected_gain: float = 0.0
    stall_s: float = 0.0
    cpu_s: float = 0.0
    layers_changed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def moved_copies(old: np.ndarray, new: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` experts each GPU holds in ``new`` and not in ``old`` (vLLM's migration
    scheduler transfers exactly these)."""
    old, new = np.asarray(old), np.asarray(new)
    L, P = new.shape
    N = int(max(old.max(), new.max())) + 1
    gpu = np.arange(P) // (P // num_gpus)

    def inc(m: np.ndarray) -> np.ndarray:
        a = np.zeros((L, num_gpus, N), bool)
        a[np.arange(L)[:, None], gpu[None, :], m] = True
        return a

    return (inc(new) & ~inc(old)).sum(axis=2)


def transfer_stall(old: np.ndarray, new: np.ndarray, num_gpus: int, num_nodes: int,
                   expert_bytes: int, hardware: Any) -> float:
    """Seconds to land ``new`` from ``old``: every GPU receives its new copies in parallel,
    from a GPU of its node when one holds the expert (NVLink rate), else over the network
    (rate x efficiency); layers one after another. The stall is the slowest GPU's total."""
    if not expert_bytes:
        return 0.0
    old, new = np.asarray(old), np.asarray(new)
    L, P = new.shape
    S = P // num_gpus
    gpn = num_gpus // num_nodes
    N = int(max(old.max(), new.max())) + 1
    gpu = np.arange(P) // S
    held = np.zeros((L, num_gpus, N), bool)
    held[np.arange(L)[:, None], gpu[None, :], old] = True
    node_held = held.reshape(L, num_nodes, gpn, N).any(axis=2)  # [L, M, N]
    lr = np.arange(L)[:, None]
    fresh = ~held[lr, gpu[None, :], new]                     # [L, P] slot receives a new copy
    # two slots of one GPU receiving the same expert transfer it once
    first = np.ones((L, P), bool)
    per = new.reshape(L, num_gpus, S)
    for j in range(1, S):
        first.reshape(L, num_gpus, S)[:, :, j] = ~(per[:, :, :j] == per[:, :, j:j + 1]).any(axis=2)
    fresh &= first
    local = node_held[lr, (gpu // gpn)[None, :], new]
    t_local = expert_bytes / hardware.nvlink_bytes_per_s
    t_remote = expert_bytes / (hardware.network_bytes_per_s * hardware.network_efficiency)
    t = np.where(fresh, np.where(local, t_local, t_remote), 0.0)  # [L, P]
    per_gpu = t.reshape(L, num_gpus, S).sum(axis=(0, 2))
    return float(per_gpu.max())


def _hardware(hw: Any) -> Any:
    from moeplace.solvers.simulator import Hardware
    if hw is None:
        return Hardware.load("h100-nvlink")
    if isinstance(hw, str):
        return Hardware.load(hw)
    return hw


class OnlinePolicy:
    """moeplace's online rebalancing policy: keeps a decayed load history, starts from the
    current map, moves only the copies that pay back, and decides when not to rebalance at
    all. See the module docstring for the API and the rule."""

    def __init__(self, num_gpus: int, num_nodes: int = 1, num_groups: int = 1, *,
                 expert_bytes: int = 0, hardware: Any = None,
                 allow_colocated_copies: bool = False, phase: str = "prefill",
                 **tuning: Any) -> None:
        from moeplace.solvers.dispatch import PHASE_KERNEL, default_kernel

        if phase not in PHASE_KERNEL:
            raise InputError("online policy", "phase", f"{phase!r} is not a phase",
                             f"use one of {tuple(PHASE_KERNEL)}")
        self.phase = phase
        self.dispatch = default_kernel("sglang", phase)
        num_gpus, num_nodes = int(num_gpus), int(num_nodes)
        if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
            raise InputError("online policy", "num_nodes", f"{num_gpus} GPUs do not split into "
                             f"{num_nodes} nodes", "use a node count that divides the GPU count")
        known = {"num_slots", "decays", "z", "history", "copy_cost_tokens",
                 "max_moves_per_layer", "guard", "guard_intervals", "seed",
                 "max_search_steps", "slack_sd"}
        bad = sorted(set(tuning) - known)
        if bad:
            raise InputError("online policy", bad[0], "unknown tuning key",
                             f"use one of {sorted(known)}")
        self.num_gpus, self.num_nodes = num_gpus, num_nodes
        self.num_groups = max(1, int(num_groups or 1))
        self.expert_bytes = int(expert_bytes)
        self.hardware = _hardware(hardware)
        self.colocate = bool(allow_colocated_copies)
        self.num_slots = tuning.get("num_slots")
        self.decays = np.asarray(tuning.get("decays", DEFAULT_DECAYS), np.float64)
        if self.decays.ndim != 1 or not self.decays.size or not (
                (self.decays >= 0) & (self.decays < 1)).all():
            raise InputError("online policy", "decays", f"{tuning.get('decays')!r}: need "
                             "decays in [0, 1)", "pass memories such as (0.0, 0.5, 0.9)")
        self.z = float(tuning.get("z", 1.64))
        self.history = int(tuning.get("history", 16))
        self.max_moves = tuning.get("max_moves_per_layer")
        self.guard = bool(tuning.get("guard", True))
        self.guard_intervals = int(tuning.get("guard_intervals", 1))
        self.slack_sd = float(tuning.get("slack_sd", 0.5))
        self.max_steps = int(tuning.get("max_search_steps", min(num_gpus, 16)))
        hw = self.hardware
        link = (hw.nvlink_bytes_per_s if num_nodes == 1
                else hw.network_bytes_per_s * hw.network_efficiency)
        self.copy_cost = float(tuning.get("copy_cost_tokens",
                                          hw.bf16_flops * hw.matmul_efficiency / link))
        self.hierarchical = num_nodes > 1 and self.num_groups % num_nodes == 0
        # state
        self._mean: np.ndarray | None = None   # [D, L, N] decayed share means
        self._z: np.ndarray | None = None      # [D] bias-correction weights
        self._err: np.ndarray | None = None    # [D] decayed prediction error
        self._recent: list[np.ndarray] = []    # last ``history`` interval loads [L, N]
        self.steps = 0
        if num_gpus >= 16:
            # The compiled search loads at the engine's start-up, not in a rebalance (layers
            # of smaller clusters may not use it: step loads it when they do).
            from moeplace.solvers import _online_kernels

            _online_kernels.warm()

    # ---- history -------------------------------------------------------------------------
    def _observe(self, load: np.ndarray) -> None:
        tot = load.sum(axis=1, keepdims=True)
        share = np.where(tot > 0, load / np.where(tot > 0, tot, 1), 1.0 / load.shape[1])
        D = len(self.decays)
        if self._mean is None:
            self._mean = np.zeros((D, *load.shape))
            self._z = np.zeros(D)
            self._err = np.zeros(D)
        else:
            est = self._mean / np.maximum(self._z, 1e-300)[:, None, None]
            err = ((est - share[None]) ** 2).sum(axis=(1, 2))
            self._err = _ERR_DECAY * self._err + (1 - _ERR_DECAY) * err
        d = self.decays[:, None, None]
        self._mean = d * self._mean + (1 - d) * share[None]
        self._z = self.decays * self._z + (1 - self.decays)
        self._recent.append(load)
        del self._recent[:-max(2, self.history)]
        self.steps += 1

    def estimate(self) -> tuple[np.ndarray, float]:
        """``([L, N] predicted load of the next interval, decay used)``."""
        assert self._mean is not None and self._err is not None and self._z is not None
        # before two intervals no decay has been scored: take the middle memory
        i = int(np.argmin(self._err)) if self.steps > 1 else len(self.decays) // 2
        share = self._mean[i] / self._z[i]
        tot = self._recent[-1].sum(axis=1, keepdims=True)
        return share * tot, float(self.decays[i])

    # ---- the decision --------------------------------------------------------------------
    def step(self, load: np.ndarray, current: np.ndarray | None) -> Decision:
        """One EPLB step: observe ``load`` and decide on a map (see the module docstring)."""
        if current is not None:
            # Loaded once per process (cached after), before the decision's clock starts.
            from moeplace.solvers import _online_kernels

            _online_kernels.warm(np.shape(current)[-1] * self.num_gpus)
        t0 = time.process_time()
        load = np.asarray(load, np.float64)
        if load.ndim != 2 or not np.isfinite(load).all() or (load < 0).any():
            raise InputError("online policy", "load", f"shape {load.shape}: need finite "
                             "counts >= 0 of shape [layers, experts]", "pass the engine's load")
        L, N = load.shape
        if self._mean is not None and self._mean.shape[1:] != load.shape:
            raise InputError("online policy", "load", f"shape {load.shape} changed from "
                             f"{self._mean.shape[1:]}", "use one policy per model")
        self._observe(load)
        w, decay = self.estimate()
        horizon = float(np.clip(1.0 / (1.0 - decay), 1.0, 64.0))
        if current is None:
            return self._first(w, L, N, t0)
        cur = np.asarray(current)
        if cur.ndim != 2 or cur.shape[0] != L or cur.shape[1] % self.num_gpus or \
                cur.shape[1] < N or cur.min() < 0 or cur.max() >= N:
            raise InputError("online policy", "current", f"shape {cur.shape} is not a phy2log "
                             f"of {L} layers over {self.num_gpus} GPUs with experts < {N}",
                             "pass the map the engine serves now")
        cur = cur.astype(np.int64)
        P = cur.shape[1]
        if self.guard:
            refit, target = self._guard_target(L, N, P)
            refit_moves = moved_copies(cur, refit, self.num_gpus).sum(axis=1)
        else:
            refit, target, refit_moves = None, None, np.full(L, 1 << 30)
        if target is not None:
            # The estimate's own statistical error of a GPU's load (counts ~ Poisson, summed
            # over the intervals the decay effectively averages): a refit better by less than
            # this has fitted noise, not balance it will keep.
            n_eff = min(float(self.steps), (1 + decay) / (1 - decay))
            bar = target * (1 + self.slack_sd / np.sqrt(np.maximum(target * n_eff, 1.0)))
        new = cur.copy()
        gains = np.zeros(L)
        reasons = {"paid": 0, "not significant": 0, "guard": 0}
        recent = np.stack(self._recent)  # [K, L, N]
        max_moves = int(self.max_moves) if self.max_moves is not None else 2 * P
        for l in range(L):
            tgt = None if target is None else float(bar[l])
            # Never search past the copies the default's own refit would move in this layer:
            # beyond that, the refit itself is the cheaper way to its balance.
            budget = int(min(max_moves, refit_moves[l]))
            rows, copies, maxes = _search_layer(cur[l], w[l], self.num_gpus, P // self.num_gpus,
                                                self._node_size(), self.colocate, budget,
                                                self.copy_cost / horizon, tgt, self.max_steps)
            net = (maxes[0] - maxes) * horizon - self.copy_cost * copies
            k = int(np.argmax(net))
            forced = tgt is not None and maxes[k] > tgt * (1 + 1e-9)
            if forced:  # the first prefix no worse than the default's refit, if any
                ok = np.flatnonzero(maxes <= tgt * (1 + 1e-9))
                if ok.size:
                    k = int(ok[0])
                else:  # the search could not reach it within budget: land the refit,
                    # renumbered so that the copies it keeps in place stay
                    assert refit is not None and target is not None
                    land = relabel_gpus(refit[l:l + 1], cur[l:l + 1], self.num_gpus,
                                        self._node_size())
                    rows = [*rows, land[0]]
                    copies = np.append(copies, moved_copies(cur[l:l + 1], land,
                                                            self.num_gpus).sum())
                    maxes = np.append(maxes, target[l])
                    k = len(rows) - 1
            if k == 0:
                continue
            g = _realized_gain(cur[l], rows[k], recent[:, l], self.num_gpus)
            mean = float(g.mean())
            se = float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float(
                np.sqrt(max(maxes[0], 1.0)))  # one interval: Poisson error of the max
            need = self.copy_cost * copies[k] / horizon
            if forced or mean - self.z * se > need:
                new[l] = rows[k]
                m = w[l].sum() / self.num_gpus
                gains[l] = (maxes[0] - maxes[k]) / m if m > 0 else 0.0
                reasons["guard" if forced and not mean - self.z * se > need else "paid"] += 1
            else:
                reasons["not significant"] += 1
        changed = int((new != cur).any(axis=1).sum())
        moved = int(moved_copies(cur, new, self.num_gpus).sum()) if changed else 0
        stall = transfer_stall(cur, new, self.num_gpus, self.num_nodes, self.expert_bytes,
                               self.hardware) if changed else 0.0
        if changed:
            reason = (f"{changed} of {L} layers pay back their {moved} copies "
                      f"({reasons['guard']} to stay no worse than the default's refit)")
        elif reasons["not significant"]:
            reason = (f"no move pays back with confidence ({reasons['not significant']} layers "
                      "had a gain within noise of the copy cost)")
        else:
            reason = "no move pays back its copies on the estimated load"
        return Decision(bool(changed), new, moved, reason, float(gains.mean()), stall,
                        time.process_time() - t0, changed,
                        {"decay": decay, "horizon": horizon, "copy_cost_tokens": self.copy_cost})

    def _node_size(self) -> int | None:
        return self.num_gpus // self.num_nodes if self.hierarchical else None

    def _first(self, w: np.ndarray, L: int, N: int, t0: float) -> Decision:
        P = int(self.num_slots) if self.num_slots else -(-N // self.num_gpus) * self.num_gpus
        fit = eplb if self.colocate else eplb_where_distinct
        pl = fit(w, self.num_gpus, self.num_nodes, P - N, num_groups=self.num_groups)
        return Decision(True, pl.phy2log.astype(np.int64), 0, "first placement (EPLB on the "
                        "estimated load)", 0.0, 0.0, time.process_time() - t0, L)

    def _guard_target(self, L: int, N: int, P: int) -> tuple[np.ndarray, np.ndarray]:
        """``([L, P] the default's map: EPLB refit on the last ``guard_intervals`` intervals,
        [L] its max GPU load on the estimate)``."""
        win = np.sum(self._recent[-max(1, self.guard_intervals):], axis=0)
        refit = eplb_fast(win, self.num_gpus, self.num_nodes, P, self.num_groups)
        w, _ = self.estimate()
        return refit, _gpu_loads(refit, w, self.num_gpus).max(axis=1)


# ---- kernels ------------------------------------------------------------------------------
# As baselines.eplb and vLLM 0.34: loads and group sums in float32, pack sums and per-copy
# loads in float64.
_F = np.float32
_D = np.float64


def _pack_batch(w: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """``baselines.balanced_packing`` on every row of ``w [B, n]`` at once: heaviest item
    first (stable), each to the lightest pack with room (lowest index on ties)."""
    B, n = w.shape
    per = n // packs
    if per == 1:
        return np.tile(np.arange(n), (B, 1)), np.zeros((B, n), np.int64)
    w = w.astype(_D) if w.dtype == _D else w.astype(_F).astype(_D)
    order = np.argsort(-w, axis=1, kind="stable")
    pw = np.zeros((B, packs), _D)
    pn = np.zeros((B, packs), np.int64)
    pack = np.empty((B, n), np.int64)
    rank = np.empty((B, n), np.int64)
    ar = np.arange(B)
    inf = _D(np.inf)
    for j in range(n):
        i = order[:, j]
        b = np.argmin(np.where(pn < per, pw, inf), axis=1)
        pack[ar, i] = b
        rank[ar, i] = pn[ar, b]
        pw[ar, b] = pw[ar, b] + w[ar, i]
        pn[ar, b] += 1
    return pack, rank


def _replicate_batch(w: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """``baselines.replicate_experts`` on every row of ``w [B, n]`` at once."""
    B, n = w.shape
    w = w.astype(_F).astype(_D)
    out = np.empty((B, slots), np.int64)
    out[:, :n] = np.arange(n)
    cnt = np.ones((B, n), np.int64)
    ar = np.arange(B)
    for i in range(n, slots):
        e = np.argmax(w / cnt, axis=1)
        out[:, i] = e
        cnt[ar, e] += 1
    return out, cnt


def eplb_fast(load: np.ndarray, num_gpus: int, num_nodes: int, num_slots: int,
              num_groups: int = 1) -> np.ndarray:
    """``[L, P]`` DeepSeek EPLB maps, exactly ``baselines.eplb``'s, vectorised over layers
    (and nodes): the guard runs it at every step, so it must cost what the engines' own does."""
    load = np.asarray(load)
    L, N = load.shape
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # DeepSeek's global policy
    M, g = num_nodes, num_groups
    gsize, gpn = N // g, num_gpus // M
    per_gpu = num_slots // num_gpus
    spn = num_slots // M
    if M > 1:
        gl = load.astype(_F).reshape(L, g, gsize).sum(axis=2, dtype=_F)
        pack, rank = _pack_batch(gl, M)
        per_node = g // M
        pos = pack * per_node + rank                                   # [L, g]
        order = np.empty((L, g), np.int64)
        order[np.arange(L)[:, None], pos] = np.arange(g)[None, :]
        experts = (order[:, :, None] * gsize + np.arange(gsize)).reshape(L, M, N // M)
    else:
        experts = np.tile(np.arange(N), (L, 1)).reshape(L, 1, N)
    ex = experts.reshape(L * M, N // M)
    w = np.take_along_axis(np.repeat(load.astype(_F), M, axis=0), ex, axis=1)
    slot_e, cnt = _replicate_batch(w, spn)
    copy_w = np.take_along_axis(w.astype(_D) / cnt, slot_e, axis=1)
    pack, rank = _pack_batch(copy_w, gpn)
    local = np.empty_like(slot_e)
    local[np.arange(L * M)[:, None], pack * per_gpu + rank] = slot_e
    return np.take_along_axis(ex, local, axis=1).reshape(L, num_slots)


def preserve_slots(new: np.ndarray, old: np.ndarray, num_gpus: int) -> np.ndarray:
    """``new`` with each GPU's slots reordered so that an expert the GPU already held keeps
    its old slot (a reorder inside one GPU copies nothing; kept slots keep maps comparable).
    GPU loads and moved copies are those of ``new``. Old slots are served in order, each by
    the first unused equal entry of the new block; the rest of the new block fills the free
    slots in its own order."""
    new, old = np.asarray(new), np.asarray(old)
    L, P = new.shape
    S = P // num_gpus
    nb = new.reshape(L * num_gpus, S)
    ob = old.reshape(L * num_gpus, S)
    used = np.zeros(nb.shape, bool)      # new entries already placed in an old slot
    kept = np.zeros(nb.shape, bool)      # old slots that keep their expert
    rows = np.arange(len(nb))
    for s in range(S):  # vectorised over every (layer, GPU); S is a handful of slots
        m = (nb == ob[:, s:s + 1]) & ~used
        hit = m.any(axis=1)
        first = np.argmax(m, axis=1)
        used[rows[hit], first[hit]] = True
        kept[hit, s] = True
    out = np.where(kept, ob, 0)
    # the k-th free slot of a block takes the k-th unused new entry (stable orders)
    free = np.argsort(kept, axis=1, kind="stable")
    rest = np.argsort(used, axis=1, kind="stable")
    take = np.arange(S)[None, :] < (~kept).sum(axis=1, keepdims=True)
    r = np.broadcast_to(rows[:, None], nb.shape)
    out[r[take], free[take]] = nb[r[take], rest[take]]
    return out.reshape(L, P)


def _gpu_loads(rows: np.ndarray, w: np.ndarray, G: int) -> np.ndarray:
    """``[..., G]`` GPU loads of maps ``rows [..., P]`` under loads ``w [..., N]`` (an
    expert's load split evenly over its copies, as the evaluator's stats view)."""
    rows = np.asarray(rows)
    P = rows.shape[-1]
    N = w.shape[-1]
    flat = rows.reshape(-1, P)
    ww = np.broadcast_to(w, (*rows.shape[:-1], N)).reshape(-1, N)
    cnt = np.zeros_like(ww)
    np.add.at(cnt, (np.arange(len(flat))[:, None], flat), 1)
    share = np.take_along_axis(ww / np.maximum(cnt, 1), flat, axis=1)
    return share.reshape((*rows.shape[:-1], G, P // G)).sum(axis=-1)


def relabel_gpus(new: np.ndarray, old: np.ndarray, num_gpus: int,
                 node_size: int | None = None) -> np.ndarray:
    """``new [L, P]`` with its GPUs renumbered (whole GPUs; with ``node_size``, whole nodes
    first, then GPUs inside them) so that as many (GPU, expert) pairs of ``old`` as possible
    stay: a fresh fit's GPU numbering is arbitrary, and every pair kept is a copy not sent.
    Slots are then preserved per GPU (``preserve_slots``). GPU loads are those of ``new``."""
    from ortools.graph.python import linear_sum_assignment as lsa

    new, old = np.asarray(new), np.asarray(old)
    L, P = new.shape
    G = num_gpus
    S = P // G
    N = int(max(new.max(), old.max())) + 1
    gpu = np.arange(P) // S

    def match(O: np.ndarray) -> np.ndarray:
        """perm[i] = old index that new index i takes, maximising the summed overlap O."""
        n = len(O)
        a = lsa.SimpleLinearSumAssignment()
        a.add_arcs_with_cost(np.repeat(np.arange(n), n), np.tile(np.arange(n), n),
                             (-np.rint(O)).astype(np.int64).ravel())
        a.solve()
        return np.array([a.right_mate(i) for i in range(n)])

    # overlap[l, i, j]: experts new GPU i shares with old GPU j (a gather, not a matmul: BLAS
    # threads would cost CPU time the engine's own policy does not spend)
    held_old = np.zeros((L, N, G), np.int64)
    held_old[np.arange(L)[:, None], old, gpu[None, :]] = 1
    blocks_new = np.sort(new.reshape(L, G, S), axis=2)
    first = np.ones((L, G, S), bool)
    first[:, :, 1:] = blocks_new[:, :, 1:] != blocks_new[:, :, :-1]  # an expert once per GPU
    overlap = (held_old[np.arange(L)[:, None, None], blocks_new] * first[..., None]).sum(axis=2)
    out = np.empty_like(new)
    for l in range(L):
        O = overlap[l]
        if node_size is None or node_size == G:
            perm = match(O)
        else:
            M = G // node_size
            On = O.reshape(M, node_size, M, node_size).sum(axis=(1, 3))
            nperm = match(On)
            perm = np.empty(G, np.int64)
            for i in range(M):
                j = nperm[i]
                sub = O[i * node_size:(i + 1) * node_size, j * node_size:(j + 1) * node_size]
                perm[i * node_size:(i + 1) * node_size] = j * node_size + match(sub)
        blocks = np.empty((G, S), new.dtype)
        blocks[perm] = new[l].reshape(G, S)
        out[l] = blocks.ravel()
    return preserve_slots(out, old, G)


def _realized_gain(old: np.ndarray, new: np.ndarray, loads: np.ndarray, G: int) -> np.ndarray:
    """``[K]`` max GPU load with ``old`` minus with ``new`` on each interval of ``loads``."""
    a = _gpu_loads(np.broadcast_to(old, (len(loads), *old.shape)), loads, G).max(axis=1)
    b = _gpu_loads(np.broadcast_to(new, (len(loads), *new.shape)), loads, G).max(axis=1)
    return a - b


def _search_layer(row0: np.ndarray, w: np.ndarray, G: int, S: int, node: int | None,
                  colocate: bool, max_moves: int, min_gain: float, target: float | None,
                  max_steps: int | None = None
                  ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The greedy move search of one layer (``_search_layer_numpy``), compiled where numba is
    installed and the layer is large enough for it to pay."""
    from moeplace.solvers import _online_kernels as kern

    P = row0.shape[0]
    if kern.use_numba(P * G):
        steps = max_moves if max_steps is None else min(max_moves, max_steps)
        rows, copies, maxes = kern.compiled_search()(
            np.ascontiguousarray(row0, np.int64), np.ascontiguousarray(w, np.float64), G, S,
            node or 0, colocate, int(max_moves), float(min_gain),
            float(target) if target is not None else 0.0, target is not None, int(steps),
            _PROBE_STEPS, _SPARES)
        return list(rows), copies, maxes
    return _search_layer_numpy(row0, w, G, S, node, colocate, max_moves, min_gain, target,
                               max_steps)


def _search_layer_numpy(row0: np.ndarray, w: np.ndarray, G: int, S: int, node: int | None,
                        colocate: bool, max_moves: int, min_gain: float, target: float | None,
                        max_steps: int | None = None
                        ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Greedy moves on one layer from ``row0``: ``(maps, copies, max loads)`` after 0, 1, ...
    moves. Stops when the max is the mean, no move lowers it, or the remaining possible gain
    cannot pay one copy (``min_gain``) and the guard ``target`` is met."""
    P = row0.shape[0]
    N = w.shape[0]
    row = row0.copy()
    gpu = np.arange(P) // S
    C = np.zeros((G, N), np.int64)
    np.add.at(C, (gpu, row), 1)
    cnt = C.sum(axis=0)
    share = w / np.maximum(cnt, 1)
    gl = np.bincount(gpu, share[row], minlength=G).astype(np.float64)
    mean = float(w.sum()) / G
    rows, copies, maxes = [row.copy()], [0], [float(gl.max())]
    cap = P if colocate else G
    eps = 1e-12 * max(mean, 1.0)
    steps = max_moves if max_steps is None else min(max_moves, max_steps)
    for j in range(steps):
        if copies[-1] >= max_moves:
            break
        h = int(np.argmax(gl))
        cur = float(gl[h])
        met = target is None or cur <= target * (1 + 1e-9)
        if cur - mean <= eps or (met and cur - mean < min_gain):
            break
        if not met and j >= _PROBE_STEPS:
            # At the rate its last steps closed the gap, the search would not reach the
            # default's balance within its steps: stop, the caller lands the refit instead.
            rate = (maxes[-1 - _PROBE_STEPS] - cur) / _PROBE_STEPS  # over the last steps
            if rate <= 0 or j + (cur - target) / rate > steps:
                break
        same = np.ones(G, bool) if node is None else (np.arange(G) // node == h // node)
        best = None  # (score per copy, kind, data)
        order = np.argsort(-gl, kind="stable")
        second = gl[order[1]] if G > 1 else -np.inf
        third = gl[order[2]] if G > 2 else -np.inf
        scale = 1e-3 / max(mean, 1e-12)
        A = np.flatnonzero(gpu == h)
        # (a) swaps of a copy on h with a copy on another GPU of the allowed domain
        B = np.flatnonzero((gpu != h) & same[gpu])
        if B.size:
            ea, eb = row[A], row[B]
            k = gpu[B]
            d = share[eb][None, :] - share[ea][:, None]           # what h gains
            nh = cur + d
            nk = gl[k][None, :] - d
            other = np.where(k == order[1], third, second)[None, :]
            val = np.maximum(np.maximum(nh, nk), other)
            ok = (ea[:, None] != eb[None, :]) & (d < 0)
            if not colocate:
                ok &= (C[k, ea[:, None]] == 0) & (C[h, eb][None, :] == 0)
            sq = nh ** 2 + nk ** 2 - cur ** 2 - gl[k][None, :] ** 2
            score = val + scale * sq
            score = np.where(ok & (val <= cur + eps), score, np.inf)
            i = int(np.argmin(score))
            if np.isfinite(score.flat[i]):
                gain = (cur - score.flat[i]) / 2
                if gain > 0:
                    ia, ib = divmod(i, B.size)
                    best = (gain, "swap", (A[ia], B[ib]))
        # (b) a spare copy elsewhere re-targeted to an expert of h; (c) a spare copy on h
        # re-targeted to an expert h does not hold. Together: every move of one copy that
        # can lower h (a move elsewhere that touches none of h's experts leaves h as it is).
        b0 = np.unique(row[A])
        b0 = b0[cnt[b0] < cap]
        S0 = np.flatnonzero((gpu != h) & same[gpu] & (cnt[row] > 1))
        if S0.size > _SPARES:
            # Only the spare copies whose removal loads their expert's other copies least:
            # keeps a step's cost independent of the replica count.
            ra = row[S0]
            inc = w[ra] / (cnt[ra] - 1) - w[ra] / cnt[ra] + gl[gpu[S0]] * 1e-9
            S0 = np.sort(S0[np.argsort(inc, kind="stable")[:_SPARES]])
        Sh = A[cnt[row[A]] > 1]
        bh = np.flatnonzero((C[h] == 0) & (cnt < cap)) if Sh.size else Sh
        if node is not None and bh.size:  # an expert's copies stay inside its node
            home = np.zeros(N, bool)
            home[row[same[gpu]]] = True
            bh = bh[home[bh]]
        if bh.size > _SPARES:  # the experts whose new copy would carry least
            bh = np.sort(bh[np.argsort(w[bh] / (cnt[bh] + 1), kind="stable")[:_SPARES]])
        for bs, Ss in ((b0, S0), (bh, Sh)):
            if not (bs.size and Ss.size):
                continue
            a = row[Ss]
            gs = gpu[Ss]
            oh = np.zeros((G, Ss.size))
            oh[gs, np.arange(Ss.size)] = 1.0
            Ca = C[:, a]
            wa, ca = w[a], cnt[a].astype(np.float64)
            ch_a = (Ca - oh) * (wa / np.maximum(ca - 1, 1)) - Ca * (wa / ca)   # [G, ns]
            Cb = C[:, bs].astype(np.float64)[:, :, None]                        # [G, nb, 1]
            wb, cb = w[bs][None, :, None], cnt[bs].astype(np.float64)[None, :, None]
            ch_b = (Cb + oh[:, None, :]) * (wb / (cb + 1)) - Cb * (wb / cb)     # [G, nb, ns]
            new = gl[:, None, None] + ch_a[:, None, :] + ch_b
            val = new.max(axis=0)
            sq = (new ** 2).sum(axis=0) - (gl ** 2).sum()
            ok = a[None, :] != bs[:, None]
            if not colocate:
                ok &= C[gs[None, :], bs[:, None]] == 0
            score = np.where(ok & (val <= cur + eps), val + scale * sq, np.inf)
            i = int(np.argmin(score))
            if np.isfinite(score.flat[i]):
                gain = cur - score.flat[i]
                if gain > 0 and (best is None or gain > best[0]):
                    ib, js = divmod(i, Ss.size)
                    best = (gain, "retarget", (int(bs[ib]), Ss[js]))
        if best is None:
            break
        if best[1] == "swap":
            i, j = best[2]
            ea, eb = row[i], row[j]
            C[gpu[i], ea] -= 1
            C[gpu[j], eb] -= 1
            C[gpu[i], eb] += 1
            C[gpu[j], ea] += 1
            row[i], row[j] = eb, ea
            gl[gpu[i]] += share[eb] - share[ea]
            gl[gpu[j]] += share[ea] - share[eb]
            n = 2
        else:
            b, s = best[2]
            a = row[s]
            C[gpu[s], a] -= 1
            C[gpu[s], b] += 1
            cnt[a] -= 1
            cnt[b] += 1
            row[s] = b
            share = w / np.maximum(cnt, 1)
            gl = np.bincount(gpu, share[row], minlength=G).astype(np.float64)
            n = 1
        rows.append(row.copy())
        copies.append(copies[-1] + n)
        maxes.append(float(gl.max()))
    return rows, np.asarray(copies, np.float64), np.asarray(maxes)

"""Score any placement on any trace with the shared metrics of docs/objective.md (1, 2, 3 and 5).

1. load imbalance (max/mean GPU load per layer, whole trace and windows of W tokens);
2. cross-layer pair fraction (GPU and node level), from transition counts;
3. token traffic under the ``static`` (home GPU) and ``follow`` execution models;
5. migration against a current placement;
and the decode view: per serving step and layer, the distinct experts each GPU activates
(``active_experts_max``, ``active_experts_imbalance``). Optional per-GPU speeds make every
imbalance speed-aware: ``max_g(x_g / s_g) / (sum x / sum s)``.

Replica choice for a token (placements with replicas): the copy on the token's current GPU if
any, else the first copy on its node, else round-robin over the expert's copies in token order
(the even split a least-loaded policy converges to). Pair fractions with replicas count a pair as
co-located when some copy of each shares a GPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moeplace._limits import check_memory
from moeplace._progress import Progress
from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers._eval_kernels import (
    GPUS,
    INTER,
    INTRA,
    NODES,
    _cumcount,
    flush_steps,
    score_into,
)
from moeplace.solvers.cost import speed_imbalance, unequal_speeds
from moeplace.traces import RoutingStats, Trace, TraceReader
from moeplace.traces._kernels import count_into
from moeplace.traces.store import as_chunks
from moeplace.traces.trace import mix64

HOME_MODELS = ("static", "follow")
DEFAULT_WINDOW = 4096
# Serving-step size when the trace records no step ids (the simulator's default too).
DEFAULT_TOKENS_PER_STEP = 4096


def check_compatible(placement: Placement, num_layers: int, num_experts: int, source: str) -> None:
    """Raise unless the placement has the trace's layer and expert counts."""
    if placement.num_layers != num_layers or placement.num_experts != num_experts:
        raise InputError(placement.source, "phy2log",
                         f"placement is {placement.num_layers} layers x {placement.num_experts} "
                         f"experts but {source} has {num_layers} x {num_experts}",
                         "solve a placement for this model")


# ---- metric 2 and stats-only metric 1 -------------------------------------------------------
def colocation(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """``[L-1, N, N]`` booleans: experts (a at l, b at l+1) share a GPU / share a node."""
    inc = placement.incidence()  # [L, N, G]
    L, N, _G = inc.shape
    node_inc = inc.reshape(L, N, placement.num_nodes, placement.gpus_per_node).any(axis=3)
    f = inc.astype(np.float32)
    fn = node_inc.astype(np.float32)
    same_gpu = np.einsum("lag,lbg->lab", f[:-1], f[1:]) > 0
    same_node = np.einsum("lag,lbg->lab", fn[:-1], fn[1:]) > 0
    return same_gpu, same_node


def pair_fractions(transitions: np.ndarray, placement: Placement) -> pd.DataFrame:
    """Metric 2 per consecutive layer pair from transition counts ``[L-1, N, N]``."""
    same_gpu, same_node = colocation(placement)
    tot = transitions.sum(axis=(1, 2)).astype(np.float64)
    cross_gpu = (transitions * ~same_gpu).sum(axis=(1, 2))
    cross_node = (transitions * ~same_node).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({
            "pairs": tot.astype(np.int64),
            "cross_gpu_pairs": cross_gpu,
            "cross_node_pairs": cross_node,
            "cross_gpu_pair_fraction": np.where(tot > 0, cross_gpu / tot, 0.0),
            "cross_node_pair_fraction": np.where(tot > 0, cross_node / tot, 0.0),
        })


def gpu_loads_from_stats(load: np.ndarray, placement: Placement) -> np.ndarray:
    """``[L, G]`` expected GPU loads, an expert's load split evenly over its copies."""
    cnt = placement.logcnt().astype(np.float64)
    L, _P = placement.phy2log.shape
    share = np.take_along_axis(load / cnt, placement.phy2log, axis=1)  # [L, P]
    return share.reshape(L, placement.num_gpus, placement.slots_per_gpu).sum(axis=2)


def imbalance(gpu_load: np.ndarray, speeds: np.ndarray | None = None) -> np.ndarray:
    """max / mean over the last axis (1.0 for an idle layer); with ``speeds`` (one per GPU)
    the speed-aware ``max_g(load_g / s_g) / (sum load / sum s)``, the slowest GPU's time over
    the time of a perfect split in proportion to speed."""
    if speeds is not None:
        return speed_imbalance(gpu_load, speeds)
    mean = gpu_load.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, gpu_load.max(axis=-1) / np.where(mean > 0, mean, 1), 1.0)


def coactivation_spread(coactivation: np.ndarray, placement: Placement) -> float:
    """Share of within-layer expert pairs of a token (a != b) with no GPU in common."""
    c = coactivation.astype(np.float64).copy()
    idx = np.arange(c.shape[1])
    c[:, idx, idx] = 0.0
    tot = c.sum()
    if tot == 0:
        return 0.0
    f = placement.incidence().astype(np.float32)
    shared = np.einsum("lag,lbg->lab", f, f) > 0
    return float((c * ~shared).sum() / tot)


def evaluate_stats(stats: RoutingStats, placement: Placement,
                   gpu_speeds: np.ndarray | list[float] | None = None) -> dict[str, Any]:
    """Metrics 1 (whole trace) and 2 from aggregated statistics alone (``gpu_speeds``: the
    speed-aware imbalance, as in ``evaluate_many``)."""
    check_compatible(placement, stats.num_layers, stats.num_experts, stats.meta.source or "stats")
    sp = unequal_speeds(gpu_speeds, placement.num_gpus, "evaluate", "gpu_speeds")
    imb = imbalance(gpu_loads_from_stats(stats.load, placement), sp)
    out: dict[str, Any] = {"load_imbalance_mean": float(imb.mean()),
                           "load_imbalance_max": float(imb.max())}
    if stats.transitions is not None and stats.num_layers > 1:
        pf = pair_fractions(stats.transitions, placement)
        tot = pf["pairs"].sum()
        out["cross_gpu_pair_fraction"] = float(pf["cross_gpu_pairs"].sum() / tot) if tot else 0.0
        out["cross_node_pair_fraction"] = float(pf["cross_node_pairs"].sum() / tot) if tot else 0.0
    if stats.coactivation is not None:
        out["coactivation_spread"] = coactivation_spread(stats.coactivation, placement)
    return out


# ---- metric 5 -------------------------------------------------------------------------------
def migration(new: Placement, current: Placement, expert_bytes: int = 0) -> dict[str, int]:
    """Metric 5: experts whose GPU set changes, and the expert copies (bytes) to transfer."""
    if new.phy2log.shape[0] != current.phy2log.shape[0] or new.num_experts != current.num_experts:
        raise InputError(current.source, "phy2log", "current placement has another shape "
                         f"({current.num_layers} x {current.num_experts}) than the new one "
                         f"({new.num_layers} x {new.num_experts})", "pass a placement of this model")
    if new.num_gpus != current.num_gpus:
        raise InputError(current.source, "num_gpus", f"{current.num_gpus} GPUs, new placement "
                         f"has {new.num_gpus}", "compare placements on one cluster")
    a, b = new.incidence(), current.incidence()
    copies = int((a & ~b).sum())
    moved = int((a != b).any(axis=2).sum())
    return {"experts_moved": moved, "copies_transferred": copies,
            "bytes_transferred": copies * int(expert_bytes)}


# ---- per-token metrics ----------------------------------------------------------------------
def home_gpus(requests: np.ndarray, num_gpus: int, known: dict[int, int] | None = None
              ) -> np.ndarray:
    """Static-model home GPU of each token: requests, in order of first appearance, go
    round-robin over GPUs (attention data-parallel ranks). ``known`` carries the assignment
    across chunks of one trace."""
    known = {} if known is None else known
    return _request_ordinals(requests, known) % num_gpus


def _request_ordinals(requests: np.ndarray, known: dict[int, int]) -> np.ndarray:
    """Each token's request, numbered in order of first appearance (``known`` carries on)."""
    uniq, first, inv = np.unique(requests, return_index=True, return_inverse=True)
    ords = np.empty(len(uniq), np.int64)
    for i in np.argsort(first, kind="stable"):
        r = int(uniq[i])
        if r not in known:
            known[r] = len(known)
        ords[i] = known[r]
    return ords[inv.reshape(-1)]


class _Resolver:
    """Maps (token, layer, expert) to the GPU that serves it, keeping round-robin state
    (the simulator's per-step numpy path; the evaluator uses ``_eval_kernels``)."""

    def __init__(self, placement: Placement) -> None:
        self.p = placement
        self.replicated = placement.num_replicas > 0
        self.n_per_node = placement.gpus_per_node
        if not self.replicated:
            self.gpu_of = placement.expert_gpu()
            return
        self.log2phy = placement.log2phy()
        self.cnt = placement.logcnt()
        self.copy_gpu = np.where(self.log2phy >= 0, self.log2phy // placement.slots_per_gpu, -1)
        self.rr = np.zeros_like(self.cnt)  # round-robin counters carried across chunks

    def layer(self, l: int, e: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """GPUs serving experts ``e [T, k]`` at layer l for tokens currently on ``cur [T]``."""
        if not self.replicated:
            return self.gpu_of[l][e]
        cg = self.copy_gpu[l][e]  # [T, k, C]
        local = (cg == cur[:, None, None]).any(axis=2)
        on_node = (cg >= 0) & (cg // self.n_per_node == (cur // self.n_per_node)[:, None, None])
        node_any = on_node.any(axis=2)
        node_pick = cg[np.arange(cg.shape[0])[:, None], np.arange(cg.shape[1])[None, :],
                       on_node.argmax(axis=2)]
        need = ~local & ~node_any
        out = np.where(local, cur[:, None], node_pick)
        if need.any():
            ee = e[need].astype(np.int64)
            rank = _cumcount(ee) + self.rr[l][ee]
            c = self.cnt[l][ee]
            out[need] = self.copy_gpu[l][ee, rank % c]
            np.add.at(self.rr[l], ee, 1)
        return out


@dataclass
class EvalResult:
    """Per-layer table and summary dictionary of one evaluation."""

    per_layer: pd.DataFrame
    summary: dict[str, Any]


def _keep_blocks(blocks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, order-free choice of about ``fraction`` of block ids (splitmix64 of id and seed)."""
    z = mix64(blocks, seed)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class Evaluator:
    """Streaming evaluator of one or several placements: feed trace chunks in token order,
    then ``results()`` (one ``EvalResult`` per placement, in order) or ``result()`` (the first).

    All placements are scored in the same pass, so the trace is read once however many are
    compared; memory depends on the model shape and the number of requests, not on the trace's
    length.
    """

    def __init__(self, placement: Placement | list[Placement], num_layers: int,
                 num_experts: int, *, window: int = DEFAULT_WINDOW, home: str = "static",
                 source: str = "trace", backend: str = "auto",
                 tokens_per_step: int | None = None,
                 gpu_speeds: str | np.ndarray | list[float] | None = None) -> None:
        plcs = [placement] if isinstance(placement, Placement) else list(placement)
        if not plcs:
            raise InputError("evaluate", "placements", "none given", "pass at least one placement")
        for p in plcs:
            check_compatible(p, num_layers, num_experts, source)
        if window < 1:
            raise InputError("evaluate", "window", f"{window} < 1", "pass --window >= 1")
        if home not in HOME_MODELS:
            raise InputError("evaluate", "home", f"{home!r} unknown", f"use one of {HOME_MODELS}")
        if tokens_per_step is not None and (isinstance(tokens_per_step, bool) or not isinstance(
                tokens_per_step, (int, np.integer)) or tokens_per_step < 1):
            raise InputError("evaluate", "tokens_per_step", f"{tokens_per_step!r} is not an integer >= 1",
                             "pass --tokens-per-step >= 1")
        self.placements = plcs
        self.L, self.N = num_layers, num_experts
        self.window = window
        self.home = home
        self.backend = backend
        P, L, N = len(plcs), num_layers, num_experts
        C = max(int(p.logcnt().max()) for p in plcs)
        self.G = np.array([p.num_gpus for p in plcs], np.int64)
        Gmax = int(self.G.max())
        # Transition counts are needed only to score replicated placements' pair fractions;
        # the kernel counts co-located pairs itself for placements without replicas.
        self.do_colo = np.array([p.num_replicas == 0 for p in plcs])
        need_trans = L > 1 and not self.do_colo.all()
        check_memory(4.0 * P * L * N * (C + 5) + 8.0 * (need_trans * (L - 1) * N * N
                                                       + 2 * P * L * Gmax),
                     "the evaluator's tables", source, "num_experts")
        self.copy_gpu = np.full((P, L, N, C), -1, np.int32)
        self.cnt = np.zeros((P, L, N), np.int32)
        self.node_of = np.zeros((P, Gmax), np.int32)
        for i, p in enumerate(plcs):
            l2p = p.log2phy()
            self.copy_gpu[i, :, :, :l2p.shape[2]] = np.where(l2p >= 0, l2p // p.slots_per_gpu, -1)
            self.cnt[i] = p.logcnt()
            self.node_of[i, :p.num_gpus] = np.arange(p.num_gpus) // p.gpus_per_node
        self.rr = np.zeros((P, 2, L, N), np.int64)  # round-robin counters carried across chunks
        self.colo = np.zeros((P, 2, max(L - 1, 0)), np.int64)
        self.top_k = 0
        self.tokens = 0
        self.pending = np.zeros((P, L, Gmax), np.int64)  # the open window's loads
        self._pending_tokens = 0
        self.gpu_load = np.zeros((P, L, Gmax), np.int64)
        self.win_sum = np.zeros((P, L))
        self.win_max = np.zeros((P, L))
        self.win_count = 0
        self.traffic = np.zeros((P, 2, 4, L), np.int64)
        self.trans = np.zeros((L - 1, N, N), np.int64) if need_trans else None
        self._scratch = np.zeros((L, N), np.int64) if need_trans else None
        self._known: dict[int, int] = {}
        self._next_token = 0
        # Speeds: None keeps today's max/mean arithmetic exactly (equal speeds mean the same).
        self.speeds: np.ndarray | None = None
        if gpu_speeds is not None:
            if len({p.num_gpus for p in plcs}) > 1:
                raise InputError("evaluate", "gpu_speeds", "placements for different GPU "
                                 "counts share one speed list", "score one cluster at a time")
            flag = isinstance(gpu_speeds, str)  # text comes from the --gpu-speeds flag
            self.speeds = unequal_speeds(gpu_speeds, int(self.G[0]), "--gpu-speeds" if flag
                                         else "evaluate", "value" if flag else "gpu_speeds")
        self.speed_tab = np.ones((P, Gmax))
        if self.speeds is not None:
            self.speed_tab[:] = self.speeds
        # Serving steps: runs of equal ``step`` ids when the trace has them and no size was
        # given, else blocks of ``tokens_per_step`` tokens (decided on the first chunk).
        self.tokens_per_step = tokens_per_step
        self._by_step: bool | None = None
        self._last_step: int | None = None
        # Per-copy step stamps only for replicated placements (see _eval_kernels).
        rep = not self.do_colo.all()
        check_memory(8.0 * (P * L * (rep * N * C + Gmax + 2) + 2 * L * N),
                     "the evaluator's step tables", source, "num_experts")
        self.act_stamp = np.full((P, L, N, C) if rep else (P, 1, 1, 1), -1, np.int64)
        self.est = np.full((L, N), -1, np.int64)
        self.alist = np.zeros(L * N, np.int64)
        self.act_cnt = np.zeros((P, L, Gmax), np.int64)
        self.act_acc = np.zeros((P, 2, L))
        self.act_open = np.array([-1, 0], np.int64)  # open step's serial, experts listed
        self._act = self.act_acc
        self.steps = 0

    def _homes(self, trace: Trace) -> np.ndarray:
        """``[P, T]`` home GPU of each token under each placement."""
        if "request" in trace.tokens:
            ords = _request_ordinals(trace.tokens["request"], self._known)
        else:  # every token its own request, numbered in order: no table to keep
            ords = self._next_token + np.arange(trace.num_tokens, dtype=np.int64)
        self._next_token += trace.num_tokens
        return ords[None, :] % self.G[:, None]

    def add(self, trace: Trace) -> None:
        """Score one chunk (tokens in trace order) for every placement."""
        e = trace.experts
        T, L, _k = e.shape
        if (L, trace.num_experts) != (self.L, self.N):
            raise InputError(trace.meta.source or "trace", "experts", "chunk shape changed",
                             "evaluate one trace at a time")
        if T == 0:
            return
        if self.top_k and trace.top_k != self.top_k:
            raise InputError(trace.meta.source or "trace", "top_k", "chunk top-k changed",
                             "evaluate one trace at a time")
        self.top_k = trace.top_k
        ser = self._serials(trace)
        homes = self._homes(trace)
        if self.trans is not None:
            count_into(e, self._scratch, self.trans, None)
        load_model = HOME_MODELS.index(self.home)
        start = 0
        while start < T:  # windows are flushed exactly at their boundary
            stop = min(T, start + self.window - self._pending_tokens)
            w = None if trace.weights is None else trace.weights[start:stop]
            score_into(e[start:stop], w, np.ascontiguousarray(homes[:, start:stop]),
                       self.copy_gpu, self.cnt, self.rr, self.node_of, load_model,
                       self.pending, self.traffic, self.colo, self.do_colo, ser[start:stop],
                       self.est, self.alist, self.act_stamp, self.act_cnt, self.act_acc, self.act_open, self.G,
                       self.speed_tab, self.backend)
            self._pending_tokens += stop - start
            start = stop
            if self._pending_tokens == self.window:
                self._flush_window()
        self.tokens += T

    def _serials(self, trace: Trace) -> np.ndarray:
        """``[T]`` serving-step serial of each token of a chunk (0, 1, ... over the trace)."""
        T = trace.num_tokens
        has = "step" in trace.tokens
        if self._by_step is None:
            self._by_step = has and self.tokens_per_step is None
        elif self._by_step and not has:
            raise InputError(trace.meta.source or "trace", "step", "some chunks lack step ids",
                             "evaluate one trace at a time, or pass tokens_per_step")
        if not self._by_step:
            B = self.tokens_per_step or DEFAULT_TOKENS_PER_STEP
            return (self.tokens + np.arange(T, dtype=np.int64)) // B
        st = trace.tokens["step"]
        change = np.empty(T, bool)
        change[0] = self._last_step is None or int(st[0]) != self._last_step
        change[1:] = st[1:] != st[:-1]
        self._last_step = int(st[-1])
        return int(self.act_open[0]) + np.cumsum(change, dtype=np.int64)

    def _flush_window(self) -> None:
        for i, G in enumerate(self.G):
            imb = imbalance(self.pending[i, :, :G].astype(np.float64), self.speeds)
            self.win_sum[i] += imb
            self.win_max[i] = np.maximum(self.win_max[i], imb)
        self.win_count += 1
        self.gpu_load += self.pending
        self.pending[:] = 0
        self._pending_tokens = 0

    def results(self) -> list[EvalResult]:
        """One result per placement, in the order given."""
        if self.tokens == 0:
            raise InputError("evaluate", "trace", "no tokens", "evaluate a non-empty trace")
        if self._pending_tokens:
            self._flush_window()
        # Close the last serving step on copies, so that more chunks may still follow.
        self._act = self.act_acc.copy()
        flush_steps(self.act_cnt.copy(), self._act, self.G, self.speed_tab, self.alist,
                    self.act_open.copy(), self.copy_gpu, self.do_colo)
        self.steps = int(self.act_open[0]) + 1
        return [self._result(i) for i in range(len(self.placements))]

    def result(self) -> EvalResult:
        """The first placement's result."""
        return self.results()[0]

    def _result(self, i: int) -> EvalResult:
        p, L, G = self.placements[i], self.L, int(self.G[i])
        imb = imbalance(self.gpu_load[i, :, :G].astype(np.float64), self.speeds)
        wmean = self.win_sum[i] / self.win_count
        act = self._act[i] / self.steps
        df = pd.DataFrame({"layer": np.arange(L), "tokens": self.tokens,
                           "load_imbalance": imb,
                           "window_imbalance_mean": wmean,
                           "window_imbalance_max": self.win_max[i],
                           "active_experts_max": act[0],
                           "active_experts_imbalance": act[1]})
        cg = np.full(L, np.nan)
        cn = np.full(L, np.nan)
        cross: tuple[float, float] | None = None
        if L > 1 and self.do_colo[i]:
            pairs = float(self.tokens * self.top_k * self.top_k)
            cg[:-1] = 1.0 - self.colo[i, 0] / pairs
            cn[:-1] = 1.0 - self.colo[i, 1] / pairs
            tot = pairs * (L - 1)
            cross = 1.0 - self.colo[i, 0].sum() / tot, 1.0 - self.colo[i, 1].sum() / tot
        elif L > 1:
            assert self.trans is not None
            pf = pair_fractions(self.trans, p)
            cg[:-1] = pf["cross_gpu_pair_fraction"].to_numpy()
            cn[:-1] = pf["cross_node_pair_fraction"].to_numpy()
            tot = pf["pairs"].sum()
            cross = ((float(pf["cross_gpu_pairs"].sum() / tot), float(pf["cross_node_pairs"].sum()
                                                                     / tot)) if tot else (0.0, 0.0))
        df["cross_gpu_pair_fraction_to_next"] = cg
        df["cross_node_pair_fraction_to_next"] = cn
        parts = {"gpus": GPUS, "intra": INTRA, "inter": INTER, "nodes": NODES}
        for m, model in enumerate(HOME_MODELS):
            for name, j in parts.items():
                df[f"traffic_{model}_{name}"] = self.traffic[i, m, j]
        tl = self.tokens * L
        summary: dict[str, Any] = {
            "tokens": self.tokens, "num_layers": L, "num_experts": self.N,
            "num_gpus": G, "num_nodes": p.num_nodes, "window": self.window,
            "home": self.home,
            "load_imbalance_mean": float(imb.mean()), "load_imbalance_max": float(imb.max()),
            "window_imbalance_mean": float(wmean.mean()),
            "window_imbalance_max": float(self.win_max[i].max()),
            "active_experts_max": float(act[0].mean()),
            "active_experts_imbalance": float(act[1].mean()),
            "steps": self.steps,
            "tokens_per_step": None if self._by_step else (self.tokens_per_step
                                                           or DEFAULT_TOKENS_PER_STEP),
        }
        if self.speeds is not None:
            summary["gpu_speeds"] = [float(x) for x in self.speeds]
        if cross is not None:
            summary["cross_gpu_pair_fraction"] = float(cross[0])
            summary["cross_node_pair_fraction"] = float(cross[1])
        for m, model in enumerate(HOME_MODELS):
            t = self.traffic[i, m].sum(axis=1)
            summary[f"traffic_{model}"] = float(t[GPUS] / tl)
            summary[f"traffic_{model}_inter_node"] = float(t[INTER] / tl)
            summary[f"traffic_{model}_intra_node"] = float(t[INTRA] / tl)
            summary[f"traffic_{model}_remote_nodes"] = float(t[NODES] / tl)
            summary[f"traffic_{model}_total"] = int(t[GPUS])
        return EvalResult(df, summary)


def evaluate_many(trace: Trace | TraceReader | str | os.PathLike[str] | Iterable[Trace],
                  placements: list[Placement], *, window: int = DEFAULT_WINDOW,
                  home: str = "static", chunk_tokens: int = 1 << 16,
                  show_progress: bool | None = None, sample: float = 1.0, seed: int = 0,
                  deadline: float | None = None, total_tokens: int | None = None,
                  backend: str = "auto", tokens_per_step: int | None = None,
                  gpu_speeds: str | np.ndarray | list[float] | None = None
                  ) -> list[EvalResult]:
    """Score several placements in one streaming pass; one result per placement, in order.

    Serving steps for ``active_experts_*``: the trace's ``step`` ids (runs of equal ids) when
    it has them and ``tokens_per_step`` is None, else blocks of ``tokens_per_step`` (default
    4096) tokens. ``gpu_speeds`` (``[G]``, or ``"1,1,0.7,0.7"``) makes every imbalance
    speed-aware; equal or absent speeds give the plain max / mean.

    ``sample < 1`` scores a seeded choice of about that fraction of the trace's windows (whole
    windows of ``window`` consecutive tokens, chosen by hashing the window's index with
    ``seed``); ``deadline`` (a ``time.monotonic()`` instant) stops scoring there. Either way the
    summaries say what was scored: ``tokens`` scored, ``sample_fraction``, ``sample_seed``,
    ``stopped_at_deadline``.
    """
    if not 0.0 < sample <= 1.0:
        raise InputError("evaluate", "sample", f"{sample} is not in (0, 1]", "pass 0 < sample <= 1")
    if window < 1:
        raise InputError("evaluate", "window", f"{window} < 1", "pass --window >= 1")
    # Reader chunks are multiples of the window so windows never straddle chunks unevenly.
    step = max(window, (chunk_tokens // window) * window)
    chunks, meta, total = as_chunks(trace, step)
    total = total_tokens if total_tokens is not None else total
    ev = Evaluator(placements, meta.num_layers, meta.num_experts, window=window, home=home,
                   source=meta.source or "trace", backend=backend,
                   tokens_per_step=tokens_per_step, gpu_speeds=gpu_speeds)
    bar = Progress(total, "scoring", "tokens", enabled=show_progress)
    offset = 0
    stopped = False
    try:
        for c in chunks:
            if deadline is not None and ev.tokens and time.monotonic() > deadline:
                stopped = True  # (at least one chunk is always scored)
                break
            n = c.num_tokens
            if sample < 1.0:
                blocks = (offset + np.arange(n)) // window
                keep = _keep_blocks(blocks, sample, seed)
                offset += n
                bar.update(n)
                if not keep.any():
                    continue
                c = c if keep.all() else c.select(keep)
            else:
                bar.update(n)
            ev.add(c)
    finally:
        bar.close()
    if ev.tokens == 0:
        raise InputError(meta.source or "trace", "sample", "no tokens were scored "
                         f"(sample {sample:g} of the windows, deadline passed: {stopped})",
                         "raise the time limit or the sample fraction")
    res = ev.results()
    for r in res:
        r.summary.update(sample_fraction=sample, sample_seed=seed, stopped_at_deadline=stopped)
    return res


def evaluate(trace: Trace | TraceReader | str | os.PathLike[str] | Iterable[Trace],
             placement: Placement, *, window: int = DEFAULT_WINDOW, home: str = "static",
             current: Placement | None = None, expert_bytes: int = 0,
             chunk_tokens: int = 1 << 16, show_progress: bool | None = None,
             backend: str = "auto", tokens_per_step: int | None = None,
             gpu_speeds: str | np.ndarray | list[float] | None = None) -> EvalResult:
    """Score ``placement`` on a per-token trace (in memory, a Parquet path, or chunks);
    ``tokens_per_step`` and ``gpu_speeds`` as in ``evaluate_many``."""
    res = evaluate_many(trace, [placement], window=window, home=home, chunk_tokens=chunk_tokens,
                        show_progress=show_progress, backend=backend,
                        tokens_per_step=tokens_per_step, gpu_speeds=gpu_speeds)[0]
    for key in ("sample_fraction", "sample_seed", "stopped_at_deadline"):
        res.summary.pop(key)
    if current is not None:
        res.summary.update(migration(placement, current, expert_bytes))
    return res

"""Score any placement on any trace with the shared metrics of docs/objective.md (1, 2, 3 and 5).

1. load imbalance (max/mean GPU load per layer, whole trace and windows of W tokens);
2. cross-layer pair fraction (GPU and node level), from transition counts;
3. token traffic under the ``static`` (home GPU) and ``follow`` execution models;
5. migration against a current placement.

Replica choice for a token (placements with replicas): the copy on the token's current GPU if
any, else the first copy on its node, else round-robin over the expert's copies in token order
(the even split a least-loaded policy converges to). Pair fractions with replicas count a pair as
co-located when some copy of each shares a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moeplace._progress import Progress
from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.traces import RoutingStats, Trace, TraceReader
from moeplace.traces._kernels import count_into
from moeplace.traces.store import as_chunks

HOME_MODELS = ("static", "follow")
DEFAULT_WINDOW = 4096


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
            "cross_gpu_fraction": np.where(tot > 0, cross_gpu / tot, 0.0),
            "cross_node_fraction": np.where(tot > 0, cross_node / tot, 0.0),
        })


def gpu_loads_from_stats(load: np.ndarray, placement: Placement) -> np.ndarray:
    """``[L, G]`` expected GPU loads, an expert's load split evenly over its copies."""
    cnt = placement.logcnt().astype(np.float64)
    L, _P = placement.phy2log.shape
    share = np.take_along_axis(load / cnt, placement.phy2log, axis=1)  # [L, P]
    return share.reshape(L, placement.num_gpus, placement.slots_per_gpu).sum(axis=2)


def imbalance(gpu_load: np.ndarray) -> np.ndarray:
    """max / mean over the last axis (1.0 for an idle layer)."""
    mean = gpu_load.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, gpu_load.max(axis=-1) / np.where(mean > 0, mean, 1), 1.0)


def evaluate_stats(stats: RoutingStats, placement: Placement) -> dict[str, Any]:
    """Metrics 1 (whole trace) and 2 from aggregated statistics alone."""
    check_compatible(placement, stats.num_layers, stats.num_experts, stats.meta.source or "stats")
    imb = imbalance(gpu_loads_from_stats(stats.load, placement))
    out: dict[str, Any] = {"load_imbalance_mean": float(imb.mean()),
                           "load_imbalance_max": float(imb.max())}
    if stats.transitions is not None and stats.num_layers > 1:
        pf = pair_fractions(stats.transitions, placement)
        tot = pf["pairs"].sum()
        out["cross_gpu_pair_fraction"] = float(pf["cross_gpu_pairs"].sum() / tot) if tot else 0.0
        out["cross_node_pair_fraction"] = float(pf["cross_node_pairs"].sum() / tot) if tot else 0.0
    if stats.coactivation is not None:
        from moeplace.solvers.objective import coactivation_spread

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
def _cumcount(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key."""
    if keys.size == 0:
        return keys
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, sk.size]))
    out = np.empty_like(keys)
    out[order] = np.arange(sk.size) - first
    return out


def _distinct_remote(g: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Per row of ``g [T, k]``: number of distinct values other than ``cur [T]``."""
    s = np.sort(g, axis=1)
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)
    return distinct - (g == cur[:, None]).any(axis=1)


def home_gpus(requests: np.ndarray, num_gpus: int, known: dict[int, int] | None = None
              ) -> np.ndarray:
    """Static-model home GPU of each token: requests, in order of first appearance, go
    round-robin over GPUs (attention data-parallel ranks). ``known`` carries the assignment
    across chunks of one trace."""
    known = {} if known is None else known
    uniq, inv = np.unique(requests, return_inverse=True)
    first = np.full(len(uniq), len(requests))
    np.minimum.at(first, inv, np.arange(len(requests)))
    homes = np.empty(len(uniq), np.int64)
    for i in np.argsort(first, kind="stable"):
        r = int(uniq[i])
        if r not in known:
            known[r] = len(known) % num_gpus
        homes[i] = known[r]
    return homes[inv]


class _Resolver:
    """Maps (token, layer, expert) to the GPU that serves it, keeping round-robin state."""

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


class Evaluator:
    """Streaming evaluator: feed trace chunks in token order, then ``result()``."""

    def __init__(self, placement: Placement, num_layers: int, num_experts: int, *,
                 window: int = DEFAULT_WINDOW, home: str = "static",
                 source: str = "trace") -> None:
        check_compatible(placement, num_layers, num_experts, source)
        if window < 1:
            raise InputError("evaluate", "window", f"{window} < 1", "pass --window >= 1")
        if home not in HOME_MODELS:
            raise InputError("evaluate", "home", f"{home!r} unknown", f"use one of {HOME_MODELS}")
        self.p = placement
        self.L, self.N, self.G = num_layers, num_experts, placement.num_gpus
        self.n_per_node = placement.gpus_per_node
        self.window = window
        self.home = home
        self.tokens = 0
        self.gpu_load = np.zeros((self.L, self.G), np.int64)
        self.win_sum = np.zeros(self.L)
        self.win_max = np.zeros(self.L)
        self.win_count = 0
        self._pending = np.zeros((self.L, self.G), np.int64)  # partial window carried over
        self._pending_tokens = 0
        self.trans = np.zeros((max(self.L - 1, 0), self.N, self.N), np.int64)
        self.traffic = {k: np.zeros(self.L, np.int64) for k in (
            "static_gpus", "static_intra", "static_inter", "static_nodes",
            "follow_gpus", "follow_intra", "follow_inter", "follow_nodes")}
        self._homes: dict[int, int] = {}
        self._res = {m: _Resolver(placement) for m in HOME_MODELS}

    def _home_of(self, trace: Trace) -> np.ndarray:
        return home_gpus(trace.request_ids(), self.G, self._homes)

    def _count_traffic(self, prefix: str, l: int, g: np.ndarray, cur: np.ndarray) -> None:
        node = g // self.n_per_node
        cnode = cur // self.n_per_node
        remote = _distinct_remote(g, cur)
        # Remote GPUs on other nodes = distinct (gpu) values whose node differs.
        s = np.sort(np.where(node != cnode[:, None], g, -1), axis=1)
        inter = (s[:, 1:] != s[:, :-1]).sum(axis=1) + (s[:, 0] >= 0)
        self.traffic[f"{prefix}_gpus"][l] += int(remote.sum())
        self.traffic[f"{prefix}_inter"][l] += int(inter.sum())
        self.traffic[f"{prefix}_intra"][l] += int((remote - inter).sum())
        self.traffic[f"{prefix}_nodes"][l] += int(_distinct_remote(node, cnode).sum())

    def add(self, trace: Trace) -> None:
        e = trace.experts
        T, L, k = e.shape
        if (L, trace.num_experts) != (self.L, self.N):
            raise InputError(trace.meta.source or "trace", "experts", "chunk shape changed",
                             "evaluate one trace at a time")
        home = self._home_of(trace)
        count_into(e, np.zeros((L, self.N), np.int64), self.trans if L > 1 else None, None)
        # static: every layer served relative to the home GPU
        gs = np.empty((T, L, k), np.int64)
        for l in range(L):
            gs[:, l] = self._res["static"].layer(l, e[:, l], home)
            self._count_traffic("static", l, gs[:, l], home)
        # follow: the token moves to the GPU that ran most of its experts
        gf = np.empty((T, L, k), np.int64)
        cur = home.copy()
        w = trace.weights
        if w is None:  # ties go to the first-listed expert
            tie = np.broadcast_to(-np.arange(k) * 1e-3, (T, L, k))
        else:  # ties go to the highest-weight expert (weights scaled below one vote)
            tie = w * (1e-3 / (np.abs(w).sum(axis=2, keepdims=True) + 1e-30))
        for l in range(L):
            g = gf[:, l] = self._res["follow"].layer(l, e[:, l], cur)
            self._count_traffic("follow", l, g, cur)
            votes = (g[:, :, None] == g[:, None, :]).sum(axis=2)
            cur = g[np.arange(T), np.argmax(votes + tie[:, l], axis=1)]
        gl = gs if self.home == "static" else gf
        self._add_load(gl)
        self.tokens += T

    def _add_load(self, g: np.ndarray) -> None:
        T, L, _ = g.shape
        G = self.G
        lg = (g + (np.arange(L) * G)[None, :, None]).reshape(T, -1)
        self.gpu_load += np.bincount(lg.ravel(), minlength=L * G).reshape(L, G)
        start = 0
        while start < T:
            take = min(self.window - self._pending_tokens, T - start)
            block = lg[start:start + take]
            self._pending += np.bincount(block.ravel(), minlength=L * G).reshape(L, G)
            self._pending_tokens += take
            start += take
            if self._pending_tokens == self.window:
                self._flush_window()

    def _flush_window(self) -> None:
        imb = imbalance(self._pending.astype(np.float64))
        self.win_sum += imb
        self.win_max = np.maximum(self.win_max, imb)
        self.win_count += 1
        self._pending[:] = 0
        self._pending_tokens = 0

    def result(self) -> EvalResult:
        if self.tokens == 0:
            raise InputError("evaluate", "trace", "no tokens", "evaluate a non-empty trace")
        if self._pending_tokens:
            self._flush_window()
        L = self.L
        imb = imbalance(self.gpu_load.astype(np.float64))
        df = pd.DataFrame({"layer": np.arange(L), "tokens": self.tokens,
                           "load_imbalance": imb,
                           "window_imbalance_mean": self.win_sum / self.win_count,
                           "window_imbalance_max": self.win_max})
        pf = pair_fractions(self.trans, self.p) if L > 1 else None
        cg = np.full(L, np.nan)
        cn = np.full(L, np.nan)
        if pf is not None:
            cg[:-1] = pf["cross_gpu_fraction"].to_numpy()
            cn[:-1] = pf["cross_node_fraction"].to_numpy()
        df["cross_gpu_pair_fraction_to_next"] = cg
        df["cross_node_pair_fraction_to_next"] = cn
        for key, arr in self.traffic.items():
            df[f"traffic_{key}"] = arr
        tl = self.tokens * L
        summary: dict[str, Any] = {
            "tokens": self.tokens, "num_layers": L, "num_experts": self.N,
            "num_gpus": self.G, "num_nodes": self.p.num_nodes, "window": self.window,
            "home": self.home,
            "load_imbalance_mean": float(imb.mean()), "load_imbalance_max": float(imb.max()),
            "window_imbalance_mean": float((self.win_sum / self.win_count).mean()),
            "window_imbalance_max": float(self.win_max.max()),
        }
        if pf is not None:
            tot = pf["pairs"].sum()
            summary["cross_gpu_pair_fraction"] = float(pf["cross_gpu_pairs"].sum() / tot)
            summary["cross_node_pair_fraction"] = float(pf["cross_node_pairs"].sum() / tot)
        for m in HOME_MODELS:
            summary[f"traffic_{m}"] = float(self.traffic[f"{m}_gpus"].sum() / tl)
            summary[f"traffic_{m}_inter_node"] = float(self.traffic[f"{m}_inter"].sum() / tl)
            summary[f"traffic_{m}_intra_node"] = float(self.traffic[f"{m}_intra"].sum() / tl)
            summary[f"traffic_{m}_remote_nodes"] = float(self.traffic[f"{m}_nodes"].sum() / tl)
            summary[f"traffic_{m}_total"] = int(self.traffic[f"{m}_gpus"].sum())
        return EvalResult(df, summary)


def evaluate(trace: Trace | TraceReader | str | os.PathLike[str] | Iterable[Trace],
             placement: Placement, *, window: int = DEFAULT_WINDOW, home: str = "static",
             current: Placement | None = None, expert_bytes: int = 0,
             chunk_tokens: int = 1 << 16, show_progress: bool | None = None) -> EvalResult:
    """Score ``placement`` on a per-token trace (in memory, a Parquet path, or chunks)."""
    # Reader chunks are multiples of the window so windows never straddle chunks unevenly.
    step = max(window, (chunk_tokens // window) * window) if window > 0 else chunk_tokens
    chunks, meta, total = as_chunks(trace, step)
    ev = Evaluator(placement, meta.num_layers, meta.num_experts, window=window, home=home,
                   source=meta.source or "trace")
    bar = Progress(total, "evaluate", "tokens", enabled=show_progress)
    for c in chunks:
        ev.add(c)
        bar.update(c.num_tokens)
    bar.close()
    res = ev.result()
    if current is not None:
        res.summary.update(migration(placement, current, expert_bytes))
    return res

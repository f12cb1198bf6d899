"""Routing statistics (per-layer load, cross-layer transitions, co-activation) built in one streaming pass."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplace._fileio import atomic_path
from moeplace._limits import check_memory
from moeplace._progress import Progress
from moeplace._validate import NpzMembers, as_int, loads_json
from moeplace.errors import InputError
from moeplace.traces._kernels import count_into
from moeplace.traces.store import TraceReader, as_chunks
from moeplace.traces.trace import Trace, TraceMeta

STATS_FORMAT = "moeplace.stats"
STATS_VERSION = 1


@dataclass
class RoutingStats:
    """Aggregates solvers need; they add up exactly across shards (``a + b``).

    - ``load[l, e]``: token-expert assignments of expert e at MoE layer l.
    - ``transitions[l, a, b]``: over tokens, pairs (a in R(t,l), b in R(t,l+1)), k*k per token.
    - ``coactivation[l, a, b]``: over tokens, pairs (a, b) both in R(t,l); the diagonal is load.

    ``transitions``/``coactivation`` are ``None`` when the source had only counts (e.g. SGLang
    ``stat`` dumps or Switch loads).
    """

    meta: TraceMeta
    num_tokens: int
    load: np.ndarray
    transitions: np.ndarray | None = None
    coactivation: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the source left out of these counts (records it marked as lost)."""
        return self.meta.dropped_tokens

    @classmethod
    def zeros(cls, meta: TraceMeta, transitions: bool = True, coactivation: bool = True
              ) -> RoutingStats:
        L, N = meta.num_layers, meta.num_experts
        # The shape comes from a file's header: check what it implies before allocating it.
        # Counted twice: whoever uses the counts (analysis, solvers) makes float64 copies of
        # the N x N arrays, so half the cap for the counts keeps the whole run near the cap.
        check_memory(2 * 8 * (L * N + (max(L - 1, 0) * N * N if transitions else 0)
                              + (L * N * N if coactivation else 0)),
                     f"statistics for {L} layers x {N} experts (and working copies)",
                     meta.source or "trace", "num_experts")
        return cls(
            meta=meta,
            num_tokens=0,
            load=np.zeros((L, N), np.int64),
            transitions=np.zeros((max(L - 1, 0), N, N), np.int64) if transitions else None,
            coactivation=np.zeros((L, N, N), np.int64) if coactivation else None,
        )

    def add_trace(self, trace: Trace, backend: str = "auto") -> None:
        """Count one chunk into these statistics in place."""
        count_into(trace.experts, self.load, self.transitions, self.coactivation, backend)
        self.num_tokens += trace.num_tokens

    def __add__(self, other: RoutingStats) -> RoutingStats:
        # Same shape is not enough: counts of another model's layers or top-k would add up
        # silently into nonsense.
        self.meta.require_same_model(other.meta, other.meta.source or "stats",
                                     "aggregate statistics")

        def _sum(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else a + b

        return RoutingStats(self.meta, self.num_tokens + other.num_tokens, self.load + other.load,
                            _sum(self.transitions, other.transitions),
                            _sum(self.coactivation, other.coactivation))

    def require_transitions(self) -> np.ndarray:
        if self.transitions is None:
            raise InputError(self.meta.source or "stats", "transitions",
                             "these statistics carry loads only (no per-token paths)",
                             "use a per-token trace for cross-layer metrics")
        return self.transitions

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as ``.npz`` (atomically); ``load`` reads it back exactly."""
        arrays = {"load": self.load, "num_tokens": np.int64(self.num_tokens),
                  "header": np.array(json.dumps({"format": STATS_FORMAT, "version": STATS_VERSION,
                                                 "meta": self.meta.to_dict()}))}
        if self.transitions is not None:
            arrays["transitions"] = self.transitions
        if self.coactivation is not None:
            arrays["coactivation"] = self.coactivation
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return Path(path)

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> RoutingStats:
        """Read a file written by ``save``, checking header, keys, shapes, dtypes, signs and
        token totals before anything is used (a wrong-shape ``transitions`` is refused here,
        not in a solver's matrix product later)."""
        fix = "re-create it with moeplace stats / RoutingStats.save"
        with NpzMembers(path, fix) as z:
            if "header" not in z:
                raise InputError(path, "header", "missing: not a moeplace statistics file", fix)
            hshape, hdtype = z.header("header")
            if hshape != () or hdtype.kind not in "US" or hdtype.itemsize > 64 << 20:
                raise InputError(path, "header", f"{hdtype} array of shape {hshape} is not a "
                                 "JSON string", fix)
            header = loads_json(str(z.read("header")), path, "header", fix)
            if not isinstance(header, dict):
                raise InputError(path, "header", "is not a JSON object", fix)
            if header.get("format") != STATS_FORMAT:
                raise InputError(path, "format", f"{header.get('format')!r:.60} is not "
                                 f"{STATS_FORMAT!r}", "create it with RoutingStats.save")
            version = as_int(header.get("version"), path, "version", lo=1, fix=fix)
            if version > STATS_VERSION:
                raise InputError(path, "version", f"{version} is newer than this moeplace "
                                 f"understands ({STATS_VERSION})", "upgrade moeplace")
            meta = TraceMeta.from_dict(header.get("meta"), path)
            L, N = meta.num_layers, meta.num_experts
            want = {"load": (L, N), "transitions": (max(L - 1, 0), N, N),
                    "coactivation": (L, N, N)}
            if "load" not in z:
                raise InputError(path, "load", "missing", fix)
            total = 0
            for key, shape in want.items():
                if key not in z:
                    continue
                got, dtype = z.header(key)
                if got != shape:
                    raise InputError(path, key, f"shape {got}, but the header's {L} layers x "
                                     f"{N} experts need {shape}", fix)
                if dtype.kind not in "iu":
                    raise InputError(path, key, f"dtype {dtype} is not an integer type",
                                     "counts are integers")
                total += 8 * int(np.prod(shape))
            check_memory(total, f"statistics for {L} layers x {N} experts", path, "meta")
            num_tokens = z.scalar_int("num_tokens", 0, 2**62) if "num_tokens" in z else None
            if num_tokens is None:
                raise InputError(path, "num_tokens", "missing", fix)
            arrays = {k: _counts(z.read(k), path, k) for k in want if k in z}
        stats = cls(meta, num_tokens, arrays["load"], arrays.get("transitions"),
                    arrays.get("coactivation"))
        stats._check_totals(path)
        return stats

    def _check_totals(self, source: object) -> None:
        """Each token adds top_k to every layer's load and top_k^2 to every transition slice;
        files that say otherwise were edited or mixed."""
        if (self.num_tokens == 0 or self.meta.extra.get("top_k_unknown")
                or self.meta.extra.get("inexact_totals")):
            return
        k = self.meta.top_k
        per_layer = self.load.sum(axis=1)
        bad = np.flatnonzero(per_layer != self.num_tokens * k)
        if bad.size:
            l = int(bad[0])
            raise InputError(source, "load", f"layer {l} counts {int(per_layer[l])} assignments, "
                             f"but {self.num_tokens} tokens x top-{k} = {self.num_tokens * k}",
                             "num_tokens, top_k and the counts disagree; re-create the file")
        if self.transitions is not None and self.transitions.size:
            sums = self.transitions.sum(axis=(1, 2))
            bad = np.flatnonzero(sums != self.num_tokens * k * k)
            if bad.size:
                raise InputError(source, "transitions", f"layer pair {int(bad[0])} counts "
                                 f"{int(sums[bad[0]])} pairs, expected "
                                 f"{self.num_tokens * k * k}", "re-create the file")


def _counts(a: np.ndarray, source: object, key: str) -> np.ndarray:
    """Non-negative integer counts as int64 (uint64 values beyond int64 are refused, not wrapped)."""
    if a.size and a.dtype.kind == "u" and a.dtype.itemsize == 8 and int(a.max()) > 2**62:
        raise InputError(source, key, f"count {int(a.max())} is implausibly large",
                         "re-create the file")
    a = a.astype(np.int64, copy=False)
    if a.size and int(a.min()) < 0:
        raise InputError(source, key, f"negative count {int(a.min())}", "counts are >= 0")
    return a


def compute_stats(source: Trace | TraceReader | str | os.PathLike[str] | Iterable[Trace], *,
                  transitions: bool = True, coactivation: bool = True,
                  chunk_tokens: int = 1 << 16, backend: str = "auto",
                  show_progress: bool | None = None) -> RoutingStats:
    """One streaming pass over a trace (in memory, a Parquet path, or chunks) to statistics."""
    chunks, meta, total = as_chunks(source, chunk_tokens, weights=False, token_fields=False)
    stats = RoutingStats.zeros(meta, transitions, coactivation)
    bar = Progress(total, "statistics", "tokens", enabled=show_progress)
    for chunk in chunks:
        stats.add_trace(chunk, backend)
        bar.update(chunk.num_tokens)
    bar.close()
    return stats

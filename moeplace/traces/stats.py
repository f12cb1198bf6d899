"""Routing statistics (per-layer load, cross-layer transitions, co-activation) built in one streaming pass."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplace._fileio import atomic_path
from moeplace._progress import Progress
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

    @classmethod
    def zeros(cls, meta: TraceMeta, transitions: bool = True, coactivation: bool = True
              ) -> RoutingStats:
        L, N = meta.num_layers, meta.num_experts
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
        if self.load.shape != other.load.shape:
            raise InputError(other.meta.source or "stats", "load",
                             f"shape {other.load.shape} differs from {self.load.shape}",
                             "merge statistics of one model only")

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
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(path, "header", f"not a moeplace statistics file ({exc})",
                             "create it with moeplace stats / RoutingStats.save") from None
        if header.get("format") != STATS_FORMAT:
            raise InputError(path, "format", f"{header.get('format')!r} is not {STATS_FORMAT!r}",
                             "create it with RoutingStats.save")
        meta = TraceMeta.from_dict(header["meta"], path)
        def get(k):
            return (z[k].astype(np.int64) if k in z.files else None)
        stats = cls(meta, int(z["num_tokens"]), get("load"), get("transitions"),
                    get("coactivation"))
        if stats.load is None or stats.load.shape != (meta.num_layers, meta.num_experts):
            raise InputError(path, "load", "missing or of the wrong shape", "re-create the file")
        return stats


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

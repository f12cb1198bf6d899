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
from moeplace.traces.trace import Trace, TraceMeta, expert_dtype, mix64

STATS_FORMAT = "moeplace.stats"
STATS_VERSION = 1

# Requests hash into this many buckets of load counts: each bucket is a different sixteenth of
# the traffic, which lets a solver check that its balance holds on traffic it was not fitted to.
LOAD_BUCKETS = 64
# Tokens kept (a uniform sample, mergeable across shards) for objectives that need each token's
# whole expert set, such as distinct GPUs per token; ~16k tokens fix a mean of a few units to
# about 1%.
SAMPLE_TOKENS = 16384
# Consecutive tokens taken as one request when a trace has no request ids (about one prompt).
UNKNOWN_REQUEST_TOKENS = 128


def _content_hash(experts: np.ndarray, block: int = 4096) -> np.ndarray:
    """``[T]`` a hash of each token's whole expert array, in blocks (bounded temporaries)."""
    T = experts.shape[0]
    flat = experts.reshape(T, -1)
    w = mix64(np.arange(flat.shape[1], dtype=np.uint64))
    out = np.empty(T, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, T, block):
            out[s:s + block] = (flat[s:s + block].astype(np.uint64) * w).sum(axis=1)
    return out


@dataclass
class RoutingStats:
    """Aggregates solvers need; they add up exactly across shards (``a + b``).

    - ``load[l, e]``: token-expert assignments of expert e at MoE layer l.
    - ``transitions[l, a, b]``: over tokens, pairs (a in R(t,l), b in R(t,l+1)), k*k per token.
    - ``coactivation[l, a, b]``: over tokens, pairs (a, b) both in R(t,l); the diagonal is load.

    - ``load_buckets[h, l, e]``: ``load`` split by request, requests hashed into ``LOAD_BUCKETS``
      buckets (sums to ``load``); solvers check balance on each bucket as held-out traffic.
    - ``token_sample[t, l, j]`` with ``sample_priority[t]``: the expert sets of a uniform sample of
      at most ``SAMPLE_TOKENS`` tokens (those with the smallest hash priorities, so the sample of
      two shards is the sample of their union).

    ``transitions``/``coactivation`` and the rest are ``None`` when the source had only counts
    (e.g. SGLang ``stat`` dumps or Switch loads).
    """

    meta: TraceMeta
    num_tokens: int
    load: np.ndarray
    transitions: np.ndarray | None = None
    coactivation: np.ndarray | None = None
    load_buckets: np.ndarray | None = None
    token_sample: np.ndarray | None = None
    sample_priority: np.ndarray | None = None

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
    def zeros(cls, meta: TraceMeta, transitions: bool = True, coactivation: bool = True,
              samples: bool = True) -> RoutingStats:
        L, N, k = meta.num_layers, meta.num_experts, meta.top_k
        # The shape comes from a file's header: check what it implies before allocating it.
        # Counted twice: whoever uses the counts (analysis, solvers) makes float64 copies of
        # the N x N arrays, so half the cap for the counts keeps the whole run near the cap.
        check_memory(2 * 8 * (L * N + (max(L - 1, 0) * N * N if transitions else 0)
                              + (L * N * N if coactivation else 0)
                              + ((LOAD_BUCKETS * L * N + SAMPLE_TOKENS * (L * k + 1))
                                 if samples else 0)),
                     f"statistics for {L} layers x {N} experts (and working copies)",
                     meta.source or "trace", "num_experts")
        return cls(
            meta=meta,
            num_tokens=0,
            load=np.zeros((L, N), np.int64),
            transitions=np.zeros((max(L - 1, 0), N, N), np.int64) if transitions else None,
            coactivation=np.zeros((L, N, N), np.int64) if coactivation else None,
            load_buckets=np.zeros((LOAD_BUCKETS, L, N), np.int64) if samples else None,
            token_sample=np.zeros((0, L, k), expert_dtype(N)) if samples else None,
            sample_priority=np.zeros(0, np.uint64) if samples else None,
        )

    def add_trace(self, trace: Trace, backend: str = "auto") -> None:
        """Count one chunk into these statistics in place."""
        count_into(trace.experts, self.load, self.transitions, self.coactivation, backend)
        if self.load_buckets is not None:
            self._add_samples(trace, backend)
        self.num_tokens += trace.num_tokens

    def _add_samples(self, trace: Trace, backend: str) -> None:
        """Count the chunk into its request buckets and offer its tokens to the sample."""
        T = trace.num_tokens
        if T == 0:
            return
        # Tokens of one request share a bucket; their priorities differ by position (in the
        # request when the trace says, so shards give the same sample as one pass).
        salt = (np.asarray(trace.tokens["position"]).astype(np.uint64)
                if "position" in trace.tokens and "request" in trace.tokens
                else np.arange(T, dtype=np.uint64) + np.uint64(self.num_tokens))
        if "request" in trace.tokens:
            req = np.asarray(trace.tokens["request"], np.int64)
        else:
            # Without request ids, blocks of consecutive tokens stand in for requests: tokens
            # close in a stream share prompts, steps and topics, and buckets of single tokens
            # would hide how much the load moves from one part of the traffic to another.
            req = (np.arange(T, dtype=np.int64) + self.num_tokens) // UNKNOWN_REQUEST_TOKENS
        h = mix64(req)
        bucket = (h % np.uint64(LOAD_BUCKETS)).astype(np.intp)
        # One bucket's tokens at a time through the load counter: memory of a 64th of a chunk.
        order = np.argsort(bucket, kind="stable")
        ends = np.searchsorted(bucket[order], np.arange(LOAD_BUCKETS + 1))
        assert self.load_buckets is not None
        for b in np.flatnonzero(np.diff(ends)):
            count_into(trace.experts[order[ends[b]:ends[b + 1]]], self.load_buckets[b], None,
                       None, backend)
        # The token's experts enter its priority too, so equal priorities mean equal tokens and
        # the sample does not depend on the order shards are merged in.
        pr = mix64(h ^ mix64(salt) ^ mix64(_content_hash(trace.experts)))
        self._merge_sample(trace.experts, pr)

    def _merge_sample(self, sets: np.ndarray, pr: np.ndarray) -> None:
        """Keep the ``SAMPLE_TOKENS`` lowest priorities of the current sample and ``sets``."""
        assert self.token_sample is not None and self.sample_priority is not None
        if len(self.sample_priority) >= SAMPLE_TOKENS:
            keep = pr < self.sample_priority.max()
            if not keep.any():
                return
            sets, pr = sets[keep], pr[keep]
        if len(pr) > SAMPLE_TOKENS:  # only the chunk's own lowest can enter
            idx = np.argpartition(pr, SAMPLE_TOKENS - 1)[:SAMPLE_TOKENS]
            sets, pr = sets[idx], pr[idx]
        allp = np.concatenate([self.sample_priority, pr])
        alls = np.concatenate([self.token_sample, sets.astype(self.token_sample.dtype)])
        if len(allp) > SAMPLE_TOKENS:
            idx = np.argpartition(allp, SAMPLE_TOKENS - 1)[:SAMPLE_TOKENS]
            allp, alls = allp[idx], alls[idx]
        order = np.argsort(allp, kind="stable")
        self.sample_priority, self.token_sample = allp[order], alls[order]

    def __add__(self, other: RoutingStats) -> RoutingStats:
        # Same shape is not enough: counts of another model's layers or top-k would add up
        # silently into nonsense.
        self.meta.require_same_model(other.meta, other.meta.source or "stats",
                                     "aggregate statistics")

        def _sum(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else a + b

        out = RoutingStats(self.meta, self.num_tokens + other.num_tokens, self.load + other.load,
                           _sum(self.transitions, other.transitions),
                           _sum(self.coactivation, other.coactivation),
                           _sum(self.load_buckets, other.load_buckets))
        if (self.token_sample is not None and other.token_sample is not None
                and self.sample_priority is not None and other.sample_priority is not None):
            out.token_sample, out.sample_priority = self.token_sample, self.sample_priority
            out._merge_sample(other.token_sample, other.sample_priority)
        return out

    @property
    def has_samples(self) -> bool:
        """Whether these statistics carry the per-request buckets and the token sample."""
        return (self.load_buckets is not None and self.token_sample is not None
                and len(self.token_sample) > 0)

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
        if self.load_buckets is not None:
            arrays["load_buckets"] = self.load_buckets
        if self.token_sample is not None and self.sample_priority is not None:
            arrays["token_sample"] = self.token_sample
            arrays["sample_priority"] = self.sample_priority
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
            # The optional samples, at most their declared limits (the header's sizes).
            total += 8 * LOAD_BUCKETS * L * N * ("load_buckets" in z)
            total += 8 * SAMPLE_TOKENS * (L * meta.top_k + 1) * ("token_sample" in z)
            check_memory(total, f"statistics for {L} layers x {N} experts", path, "meta")
            num_tokens = z.scalar_int("num_tokens", 0, 2**62) if "num_tokens" in z else None
            if num_tokens is None:
                raise InputError(path, "num_tokens", "missing", fix)
            arrays = {k: _counts(z.read(k), path, k) for k in want if k in z}
            samples = _read_samples(z, path, meta, num_tokens, fix)
        stats = cls(meta, num_tokens, arrays["load"], arrays.get("transitions"),
                    arrays.get("coactivation"), *samples)
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
        if self.load_buckets is not None and not np.array_equal(self.load_buckets.sum(axis=0),
                                                                 self.load):
            raise InputError(source, "load_buckets", "the request buckets do not add up to load",
                             "re-create the file")
        if self.transitions is not None and self.transitions.size:
            sums = self.transitions.sum(axis=(1, 2))
            bad = np.flatnonzero(sums != self.num_tokens * k * k)
            if bad.size:
                raise InputError(source, "transitions", f"layer pair {int(bad[0])} counts "
                                 f"{int(sums[bad[0]])} pairs, expected "
                                 f"{self.num_tokens * k * k}", "re-create the file")


def _read_samples(z: NpzMembers, path: object, meta: TraceMeta, num_tokens: int, fix: str
                  ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The optional request buckets and token sample, checked (shapes, ids, sizes) before use."""
    L, N, k = meta.num_layers, meta.num_experts, meta.top_k
    buckets = sample = prio = None
    if ("token_sample" in z) != ("load_buckets" in z):
        raise InputError(path, "token_sample", "the token sample and load_buckets come together",
                         fix)
    if "load_buckets" in z:
        got, dtype = z.header("load_buckets")
        if got != (LOAD_BUCKETS, L, N) or dtype.kind not in "iu":
            raise InputError(path, "load_buckets", f"{dtype} array of shape {got}, expected "
                             f"integers of shape {(LOAD_BUCKETS, L, N)}", fix)
        buckets = _counts(z.read("load_buckets"), path, "load_buckets")
    if ("token_sample" in z) != ("sample_priority" in z):
        raise InputError(path, "token_sample", "token_sample and sample_priority come together",
                         fix)
    if "token_sample" in z:
        got, dtype = z.header("token_sample")
        if (len(got) != 3 or got[0] > min(SAMPLE_TOKENS, num_tokens) or got[1:] != (L, k)
                or dtype.kind not in "iu"):
            raise InputError(path, "token_sample", f"{dtype} array of shape {got}, expected "
                             f"integers of shape (<= {min(SAMPLE_TOKENS, num_tokens)}, {L}, {k}"
                             ")", fix)
        pgot, pdtype = z.header("sample_priority")
        if pgot != (got[0],) or pdtype != np.dtype(np.uint64):
            raise InputError(path, "sample_priority", f"{pdtype} array of shape {pgot}, expected "
                             f"uint64 of shape ({got[0]},)", fix)
        raw = z.read("token_sample")
        if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= N):
            raise InputError(path, "token_sample", f"expert ids outside 0..{N - 1}", fix)
        sample = raw.astype(expert_dtype(N))
        prio = z.read("sample_priority")
    return buckets, sample, prio


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
                  transitions: bool = True, coactivation: bool = True, samples: bool = True,
                  chunk_tokens: int = 1 << 16, backend: str = "auto",
                  show_progress: bool | None = None) -> RoutingStats:
    """One streaming pass over a trace (in memory, a Parquet path, or chunks) to statistics
    (``samples``: the request buckets and the token sample, see ``RoutingStats``)."""
    chunks, meta, total = as_chunks(source, chunk_tokens, weights=False, token_fields=samples)
    stats = RoutingStats.zeros(meta, transitions, coactivation, samples)
    bar = Progress(total, "statistics", "tokens", enabled=show_progress)
    for chunk in chunks:
        stats.add_trace(chunk, backend)
        bar.update(chunk.num_tokens)
    bar.close()
    return stats

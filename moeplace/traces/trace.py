"""The in-memory routing trace: per-token top-k expert ids per MoE layer, gate weights and metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplace._validate import MAX_EXPERTS, MAX_LAYERS, MAX_TOP_K, as_int, as_int_list
from moeplace.errors import InputError

PHASE_UNKNOWN = -1
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_UNKNOWN: "unknown", PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}

# ``TraceMeta.extra`` key of the count of tokens an importer dropped (see ``dropped_tokens``).
DROPPED_KEY = "dropped_tokens"

# Per-token metadata columns and the dtype each is stored in.
TOKEN_FIELDS: dict[str, np.dtype] = {
    "request": np.dtype(np.int64),
    "position": np.dtype(np.int32),
    "phase": np.dtype(np.int8),
    "step": np.dtype(np.int64),
}


def expert_dtype(num_experts: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ids ``0..num_experts-1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_experts - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class TraceMeta:
    """Model facts a trace needs to be interpreted: expert count, top-k and which layers are MoE."""

    num_experts: int
    top_k: int
    moe_layer_ids: tuple[int, ...]
    model: str = ""
    num_hidden_layers: int | None = None
    num_shared_experts: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """Number of MoE layers recorded (the trace's layer axis)."""
        return len(self.moe_layer_ids)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def dropped_tokens(self) -> int:
        """Tokens the importer left out because the file marked one of their records as lost
        (its declared ``missing_id``); 0 when nothing was dropped. Carried into statistics,
        Parquet headers and ``analyze --json``."""
        v = self.extra.get(DROPPED_KEY, 0)
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else 0

    @classmethod
    def from_dict(cls, d: Any, source: object = "metadata") -> TraceMeta:
        """Build from a file's metadata object, checking every field's type and range first
        (sizes declared here drive allocations later, so nothing is trusted unchecked)."""
        fix = "re-create the file with moeplace convert"
        if not isinstance(d, dict):
            raise InputError(source, "meta", f"{type(d).__name__} is not a JSON object", fix)
        for key in ("num_experts", "top_k", "moe_layer_ids"):
            if key not in d:
                raise InputError(source, key, "missing from trace metadata", fix)
        n = as_int(d["num_experts"], source, "meta.num_experts", lo=1, hi=MAX_EXPERTS, fix=fix)
        k = as_int(d["top_k"], source, "meta.top_k", lo=1, hi=min(n, MAX_TOP_K),
                   fix="top_k must lie in 1..num_experts")
        ids = as_int_list(d["moe_layer_ids"], source, "meta.moe_layer_ids", lo=0,
                          hi=MAX_LAYERS, distinct=True, fix="list each MoE layer's id once")
        if not ids:
            raise InputError(source, "meta.moe_layer_ids", "empty: the trace has no layers", fix)
        H = d.get("num_hidden_layers")
        if H is not None:
            # ``>= max id``, not ``>``: some sources number layers from 1 (the bundled
            # FLAME-MoE sample: 9 hidden layers, MoE layers 2..9).
            H = as_int(H, source, "meta.num_hidden_layers", lo=max(ids), hi=MAX_LAYERS + 1,
                       fix="num_hidden_layers cannot be below a MoE layer id")
        shared = as_int(d.get("num_shared_experts", 0), source, "meta.num_shared_experts",
                        lo=0, hi=MAX_EXPERTS, fix=fix)
        for key in ("model", "source"):
            if not isinstance(d.get(key, ""), str):
                raise InputError(source, f"meta.{key}", "is not a string", fix)
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise InputError(source, "meta.extra", "is not a JSON object", fix)
        if DROPPED_KEY in extra:
            as_int(extra[DROPPED_KEY], source, f"meta.extra.{DROPPED_KEY}", lo=0, fix=fix)
        return cls(num_experts=n, top_k=k, moe_layer_ids=tuple(ids), model=d.get("model", ""),
                   num_hidden_layers=H, num_shared_experts=shared,
                   source=d.get("source", ""), extra=dict(extra))

    def with_updates(self, **kw: Any) -> TraceMeta:
        return dataclasses.replace(self, **kw)

    def require_same_model(self, other: TraceMeta, source: object, what: str) -> None:
        """Refuse to combine ``other`` (chunks, shards, statistics) with this model's data
        unless experts, top-k and MoE layers agree; ``what`` says what was being combined."""
        if (self.num_experts, self.top_k, self.moe_layer_ids) != (
                other.num_experts, other.top_k, other.moe_layer_ids):
            raise InputError(source, "meta", f"num_experts, top_k or MoE layers differ from "
                             f"{self.source or 'the first part'}", f"{what} of one model only")


def check_experts(experts: Any, num_experts: int | None, source: object,
                  field_name: str = "experts") -> np.ndarray:
    """Validate an expert-id array and return it as ``[T, L, k]`` in the smallest dtype.

    A 2-D array is read as top-1 routing ``[T, L]``.
    """
    arr = np.asarray(experts)
    if arr.dtype.kind not in "iu":
        raise InputError(source, field_name, f"dtype {arr.dtype} is not an integer type",
                         "expert ids must be integers")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(source, field_name, f"shape {arr.shape} is not [tokens, layers, k]",
                         "give a 3-D array (or 2-D for top-1)")
    if arr.shape[0] == 0:
        raise InputError(source, field_name, "the trace has no tokens",
                         "record or import at least one token")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InputError(source, field_name, f"shape {arr.shape} has no layers or no experts per token",
                         "check the layer axis and top-k")
    lo = int(arr.min()) if arr.dtype.kind == "i" else 0
    if lo < 0:
        raise InputError(source, field_name, f"negative expert id {lo}",
                         "ids must lie in 0..num_experts-1")
    hi = int(arr.max())
    if num_experts is not None and hi >= num_experts:
        raise InputError(source, field_name, f"expert id {hi} >= num_experts={num_experts}",
                         "pass the right --num-experts or fix the ids")
    n = num_experts if num_experts is not None else hi + 1
    return np.ascontiguousarray(arr, dtype=expert_dtype(n))


def mix64(x: np.ndarray, seed: int = 1) -> np.ndarray:
    """splitmix64 of integer ids under ``seed``: a fixed hash, the same on every machine
    (negative ids wrap to uint64 first)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_request_ids(requests: np.ndarray, fraction: float, seed: int,
                     source: object) -> np.ndarray:
    """The held-out ids among the sorted unique ``requests``: ``fraction`` of them (at least
    one, never all), chosen with ``seed``. The one rule behind ``Trace.split_requests`` and the
    streamed split of ``solve --holdout``, so both hold out the same requests."""
    if not 0.0 < fraction < 1.0:
        raise InputError("holdout", "fraction", f"{fraction} is not in (0, 1)",
                         "pass e.g. --holdout 0.5")
    if len(requests) < 2:
        raise InputError(source, "request", "a holdout split needs at least two requests",
                         "record per-request metadata or drop --holdout")
    rng = np.random.default_rng(seed)
    n_hold = min(max(1, round(len(requests) * fraction)), len(requests) - 1)
    return np.sort(rng.choice(requests, size=n_hold, replace=False))


@dataclass
class Trace:
    """Routing of ``T`` tokens through ``L`` MoE layers, ``k`` experts each, with optional extras.

    ``experts[t, l, j]`` is the j-th selected expert of token t at MoE layer l (layer l is hidden
    layer ``meta.moe_layer_ids[l]``); ``weights`` holds the matching gate weights when known;
    ``tokens`` maps ``request``/``position``/``phase``/``step`` to per-token arrays when known.
    """

    experts: np.ndarray
    meta: TraceMeta
    weights: np.ndarray | None = None
    tokens: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        src = self.meta.source or "trace"
        self.experts = check_experts(self.experts, self.meta.num_experts, src)
        T, L, k = self.experts.shape
        if L != self.meta.num_layers:
            raise InputError(src, "moe_layer_ids",
                             f"{self.meta.num_layers} layer ids for {L} layers in experts",
                             "give one id per MoE layer")
        if k != self.meta.top_k:
            raise InputError(src, "top_k", f"metadata says top_k={self.meta.top_k} but experts "
                             f"have k={k}", "fix top_k")
        if self.weights is not None:
            w = np.asarray(self.weights)
            if w.shape != self.experts.shape:
                raise InputError(src, "weights", f"shape {w.shape} differs from experts "
                                 f"{self.experts.shape}", "give one weight per selected expert")
            if w.dtype.kind != "f":
                raise InputError(src, "weights", f"dtype {w.dtype} is not floating point",
                                 "gate weights must be floats")
            self.weights = np.ascontiguousarray(w, dtype=np.float32)
        clean: dict[str, np.ndarray] = {}
        for name, arr in self.tokens.items():
            if arr is None:
                continue
            if name not in TOKEN_FIELDS:
                raise InputError(src, name, "unknown per-token field",
                                 f"use one of {sorted(TOKEN_FIELDS)}")
            a = np.asarray(arr)
            if a.shape != (T,):
                raise InputError(src, name, f"shape {a.shape}, expected ({T},)",
                                 "give one value per token")
            if a.dtype.kind not in "iu":
                raise InputError(src, name, f"dtype {a.dtype} is not an integer type",
                                 "per-token fields are integers")
            clean[name] = a.astype(TOKEN_FIELDS[name], copy=False)
        self.tokens = clean

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the source file left out of this trace (records it marked as lost)."""
        return self.meta.dropped_tokens

    def __len__(self) -> int:
        return self.num_tokens

    def select(self, index: np.ndarray | slice) -> Trace:
        """A new trace holding the tokens picked by ``index`` (mask, indices or slice)."""
        return Trace(
            experts=self.experts[index],
            meta=self.meta,
            weights=None if self.weights is None else self.weights[index],
            tokens={k: v[index] for k, v in self.tokens.items()},
        )

    def select_layers(self, layers: list[int] | np.ndarray) -> Trace:
        """A new trace restricted to the given MoE-layer positions (for analysis of sub-stacks)."""
        idx = np.asarray(layers, dtype=np.intp)
        meta = self.meta.with_updates(moe_layer_ids=tuple(self.meta.moe_layer_ids[i] for i in idx))
        return Trace(
            experts=self.experts[:, idx],
            meta=meta,
            weights=None if self.weights is None else self.weights[:, idx],
            tokens=dict(self.tokens),
        )

    def request_ids(self) -> np.ndarray:
        """Request id of each token; tokens without one count as a request each."""
        if "request" in self.tokens:
            return self.tokens["request"]
        return np.arange(self.num_tokens, dtype=np.int64)

    def split_requests(self, fraction: float, seed: int = 0) -> tuple[Trace, Trace]:
        """Split by whole requests into (fit, holdout), ``fraction`` of requests held out."""
        req = self.request_ids()
        held = held_request_ids(np.unique(req), fraction, seed, self.meta.source or "trace")
        mask = np.isin(req, held)
        return self.select(~mask), self.select(mask)

    @staticmethod
    def concat(parts: list[Trace]) -> Trace:
        """Join traces of the same model, token order preserved."""
        if not parts:
            raise InputError("trace", "experts", "nothing to concatenate", "give at least one part")
        meta = parts[0].meta
        for p in parts[1:]:
            meta.require_same_model(p.meta, p.meta.source or "trace", "concatenate traces")
        has_w = all(p.weights is not None for p in parts)
        keys = set.intersection(*(set(p.tokens) for p in parts))
        return Trace(
            experts=np.concatenate([p.experts for p in parts]),
            meta=meta,
            weights=np.concatenate([p.weights for p in parts]) if has_w else None,  # type: ignore[misc]
            tokens={k: np.concatenate([p.tokens[k] for p in parts]) for k in sorted(keys)},
        )

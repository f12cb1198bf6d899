"""The in-memory routing trace: per-token top-k expert ids per MoE layer, gate weights and metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplace.errors import InputError

PHASE_UNKNOWN = -1
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_UNKNOWN: "unknown", PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}

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

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: object = "metadata") -> TraceMeta:
        try:
            return cls(
                num_experts=int(d["num_experts"]),
                top_k=int(d["top_k"]),
                moe_layer_ids=tuple(int(x) for x in d["moe_layer_ids"]),
                model=str(d.get("model", "")),
                num_hidden_layers=(
                    None if d.get("num_hidden_layers") is None else int(d["num_hidden_layers"])
                ),
                num_shared_experts=int(d.get("num_shared_experts", 0)),
                source=str(d.get("source", "")),
                extra=dict(d.get("extra", {})),
            )
        except KeyError as exc:
            raise InputError(source, str(exc.args[0]), "missing from trace metadata",
                             "re-create the file with moeplace convert") from None
        except (TypeError, ValueError) as exc:
            raise InputError(source, "metadata", f"malformed ({exc})",
                             "re-create the file with moeplace convert") from None

    def with_updates(self, **kw: Any) -> TraceMeta:
        return dataclasses.replace(self, **kw)


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
        if not 0.0 < fraction < 1.0:
            raise InputError("holdout", "fraction", f"{fraction} is not in (0, 1)",
                             "pass e.g. --holdout 0.5")
        req = self.request_ids()
        uniq = np.unique(req)
        if len(uniq) < 2:
            raise InputError(self.meta.source or "trace", "request",
                             "a holdout split needs at least two requests",
                             "record per-request metadata or drop --holdout")
        rng = np.random.default_rng(seed)
        n_hold = min(max(1, round(len(uniq) * fraction)), len(uniq) - 1)
        held = rng.choice(uniq, size=n_hold, replace=False)
        mask = np.isin(req, held)
        return self.select(~mask), self.select(mask)

    @staticmethod
    def concat(parts: list[Trace]) -> Trace:
        """Join traces of the same model, token order preserved."""
        if not parts:
            raise InputError("trace", "experts", "nothing to concatenate", "give at least one part")
        meta = parts[0].meta
        for p in parts[1:]:
            if (p.meta.num_experts, p.meta.top_k, p.meta.moe_layer_ids) != (
                meta.num_experts, meta.top_k, meta.moe_layer_ids
            ):
                raise InputError(p.meta.source or "trace", "meta",
                                 "parts disagree on num_experts, top_k or MoE layers",
                                 "concatenate traces of one model only")
        has_w = all(p.weights is not None for p in parts)
        keys = set.intersection(*(set(p.tokens) for p in parts))
        return Trace(
            experts=np.concatenate([p.experts for p in parts]),
            meta=meta,
            weights=np.concatenate([p.weights for p in parts]) if has_w else None,  # type: ignore[misc]
            tokens={k: np.concatenate([p.tokens[k] for p in parts]) for k in sorted(keys)},
        )

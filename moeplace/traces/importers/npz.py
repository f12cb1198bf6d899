"""Import the ``.npz`` routing traces of ../shared/traces (and files in the same convention)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from moeplace.errors import InputError
from moeplace.traces.trace import Trace, TraceMeta

_WEIGHT_KEYS = ("weights", "scores", "gating_probs")
_POSITION_KEYS = ("token_pos", "position", "positions", "token_idx")
_REQUEST_KEYS = ("request", "prompt_id", "request_id")


def read_npz_trace(path: str | os.PathLike[str], *, num_experts: int | None = None,
                   model: str = "") -> Trace:
    """Read ``experts`` ``[T, L, k]`` (``[T, L]`` top-1; ``[R, P, L, k]`` per request/position).

    Unsigned ids equal to the dtype's maximum (e.g. 255 in uint8) mark records the source lost;
    tokens carrying one are dropped and counted in ``meta.extra['dropped_tokens']``.
    """
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
        files = set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(p, "file", f"not a readable .npz archive ({exc})",
                         "check the path or re-export the trace") from None
    if "experts" not in files:
        raise InputError(p, "experts", "array missing",
                         "the archive must hold experts [tokens, layers, k]")
    experts = z["experts"]
    if experts.dtype.kind not in "iu":
        raise InputError(p, "experts", f"dtype {experts.dtype} is not an integer type",
                         "expert ids must be integers")
    tokens: dict[str, np.ndarray] = {}
    if experts.ndim == 4:  # [requests, positions, L, k]
        R, P = experts.shape[:2]
        tokens["request"] = np.repeat(np.arange(R, dtype=np.int64), P)
        tokens["position"] = np.tile(np.arange(P, dtype=np.int32), R)
        experts = experts.reshape(R * P, *experts.shape[2:])
        reshape4 = True
    else:
        reshape4 = False
    if experts.ndim == 2:
        experts = experts[:, :, None]
    if experts.ndim != 3:
        raise InputError(p, "experts", f"shape {experts.shape} is not [tokens, layers, k]",
                         "give [T, L, k], [T, L] or [R, P, L, k]")
    T, L, k = experts.shape

    def per_token(key: str) -> np.ndarray:
        a = z[key]
        if reshape4:
            a = a.reshape(-1)
        if a.shape != (T,):
            raise InputError(p, key, f"shape {a.shape}, expected ({T},)", "one value per token")
        return a

    weights = None
    for key in _WEIGHT_KEYS:
        if key in files:
            weights = z[key].reshape(experts.shape)
            break
    if not reshape4:
        for key in _REQUEST_KEYS:
            if key in files:
                tokens["request"] = per_token(key)
                break
        else:
            if "dataset" in files and "problem_id" in files:
                ds, pid = per_token("dataset").astype(np.int64), per_token("problem_id")
                tokens["request"] = ds * (int(pid.max()) + 1) + pid
        for key in _POSITION_KEYS:
            if key in files:
                tokens["position"] = per_token(key)
                break
    if "step" in files:
        tokens["step"] = per_token("step")
    if "phase" in files:
        ph = per_token("phase")
        if ph.dtype.kind in "US":
            ph = np.select([ph == "prefill", ph == "decode"], [0, 1], -1)
        tokens["phase"] = ph
    layer_ids = [int(x) for x in z["moe_layer_ids"]] if "moe_layer_ids" in files else list(range(L))

    dropped = 0
    if experts.dtype.kind == "u":
        sentinel = np.iinfo(experts.dtype).max
        lost = np.any(experts == sentinel, axis=(1, 2))
        if lost.any() and (num_experts is None or num_experts <= sentinel):
            dropped = int(lost.sum())
            keep = ~lost
            experts = experts[keep]
            weights = None if weights is None else weights[keep]
            tokens = {kk: v[keep] for kk, v in tokens.items()}
    if experts.shape[0] == 0:
        raise InputError(p, "experts", "the trace has no tokens", "import a non-empty trace")
    if num_experts is None:
        num_experts = int(z["num_experts"]) if "num_experts" in files else int(experts.max()) + 1
    meta = TraceMeta(num_experts=num_experts, top_k=k, moe_layer_ids=tuple(layer_ids),
                     model=model or p.stem, source=str(p),
                     extra={"dropped_tokens": dropped} if dropped else {})
    return Trace(experts=experts, meta=meta, weights=weights, tokens=tokens)

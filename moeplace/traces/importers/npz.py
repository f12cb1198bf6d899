"""Import the ``.npz`` routing traces of ../shared/traces (and files in the same convention).

Every member is sized from the zip directory and its ``.npy`` header before it is read, and the
file's own metadata (``num_experts``, ``missing_id``, ``moe_layer_ids``) is read before any token
is looked at. No id is treated as "record lost" unless the file (a ``missing_id`` member) or the
caller (``missing_id=``, the CLI's ``--missing-id``) says so: a 256-expert model stored as uint8
uses id 255 for a real expert.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeplace._limits import check_memory
from moeplace._validate import MAX_EXPERTS, MAX_LAYERS, NpzMembers, as_int, as_int_list
from moeplace.errors import InputError
from moeplace.traces.importers._common import infer_num_experts
from moeplace.traces.trace import DROPPED_KEY, Trace, TraceMeta

_WEIGHT_KEYS = ("weights", "scores", "gating_probs")
_POSITION_KEYS = ("token_pos", "position", "positions", "token_idx")
_REQUEST_KEYS = ("request", "prompt_id", "request_id")


def _refuse_undeclared_marker(experts: np.ndarray, source: Path) -> None:
    """An undeclared id at the dtype's maximum far above every other id (Mixtral's 255 among
    0..7) is almost surely a lost-record marker: refuse to guess either way."""
    if experts.dtype.kind != "u":
        return
    top = int(np.iinfo(experts.dtype).max)
    mask = experts == top
    if not mask.any():
        return
    rest = experts[~mask]
    below = int(rest.max()) if rest.size else -1
    if top > 2 * (below + 1):
        raise InputError(source, "experts", f"id {top} (the {experts.dtype} maximum) occurs, but "
                         f"no other id exceeds {below}: it looks like a lost-record marker the "
                         "file does not declare",
                         f"pass --missing-id {top} to drop those tokens (counted), or "
                         f"--num-experts {top + 1} if {top} is a real expert")


def read_npz_trace(path: str | os.PathLike[str], *, num_experts: int | None = None,
                   missing_id: int | None = None, model: str = "") -> Trace:
    """Read ``experts`` ``[T, L, k]`` (``[T, L]`` top-1; ``[R, P, L, k]`` per request/position).

    ``num_experts`` and ``missing_id`` come from the file's members of those names or from the
    arguments (which must agree with the file). Tokens with a ``missing_id`` record are dropped
    and counted in ``Trace.dropped_tokens``; without a declared marker every id is an expert.
    """
    p = Path(path)
    with NpzMembers(p, "check the path or re-export the trace") as z:
        return _read(z, p, num_experts, missing_id, model)


def _read(z: NpzMembers, p: Path, num_experts: int | None, missing_id: int | None,
          model: str) -> Trace:
    if "experts" not in z:
        raise InputError(p, "experts", "array missing",
                         "the archive must hold experts [tokens, layers, k]")
    shape, dtype = z.header("experts")
    if dtype.kind not in "iu":
        raise InputError(p, "experts", f"dtype {dtype} is not an integer type",
                         "expert ids must be integers")
    if len(shape) not in (2, 3, 4):
        raise InputError(p, "experts", f"shape {shape} is not [tokens, layers, k]",
                         "give [T, L, k], [T, L] or [R, P, L, k]")
    if 0 in shape:
        no_tokens = 0 in shape[:2 if len(shape) == 4 else 1]
        what = "the trace has no tokens" if no_tokens else "no layers or no experts per token"
        raise InputError(p, "experts", f"shape {shape}: {what}",
                         "import a trace with tokens, layers and experts")
    reshape4 = len(shape) == 4
    T = shape[0] * shape[1] if reshape4 else shape[0]
    L = shape[-2] if len(shape) >= 3 else shape[1]
    k = shape[-1] if len(shape) >= 3 else 1
    if L > MAX_LAYERS:
        raise InputError(p, "experts", f"{L} layers is implausible", "check the array's axes")
    # The ids, a boolean mask of the same shape, weights (float32) and per-token fields.
    check_memory(T * L * k * (dtype.itemsize + 1 + 4) + T * 40, f"trace of shape {shape}", p,
                 "experts")

    # ---- the file's own metadata, before any token is examined ---------------------------
    if "num_experts" in z:
        declared = z.scalar_int("num_experts", 1, MAX_EXPERTS)
        if num_experts is not None and num_experts != declared:
            raise InputError(p, "num_experts", f"the file says {declared}, --num-experts says "
                             f"{num_experts}", "drop --num-experts or fix the file")
        num_experts = declared
    if num_experts is not None:
        as_int(num_experts, "--num-experts", "value", lo=1, hi=MAX_EXPERTS)
    if "missing_id" in z:
        declared = z.scalar_int("missing_id", 0, 2**63 - 1)
        if missing_id is not None and missing_id != declared:
            raise InputError(p, "missing_id", f"the file says {declared}, --missing-id says "
                             f"{missing_id}", "drop --missing-id or fix the file")
        missing_id = declared
    if missing_id is not None:
        as_int(missing_id, p, "missing_id", lo=0)
        if num_experts is not None and missing_id < num_experts:
            raise InputError(p, "missing_id", f"{missing_id} is a valid expert id "
                             f"(num_experts={num_experts})",
                             "a lost-record marker must be >= num_experts")
    if "moe_layer_ids" in z:
        raw_ids = z.read("moe_layer_ids")
        if raw_ids.ndim != 1 or raw_ids.dtype.kind not in "iu":
            raise InputError(p, "moe_layer_ids", f"{raw_ids.dtype} array of shape "
                             f"{raw_ids.shape} is not a list of layer ids",
                             "store one integer per MoE layer")
        layer_ids = as_int_list([int(x) for x in raw_ids], p, "moe_layer_ids", lo=0,
                                hi=MAX_LAYERS, distinct=True)
        if len(layer_ids) != L:
            raise InputError(p, "moe_layer_ids", f"{len(layer_ids)} ids for {L} layers",
                             "give one id per MoE layer")
    else:
        layer_ids = list(range(L))

    experts = z.read("experts")
    tokens: dict[str, np.ndarray] = {}
    if reshape4:  # [requests, positions, L, k]
        R, P = shape[:2]
        tokens["request"] = np.repeat(np.arange(R, dtype=np.int64), P)
        tokens["position"] = np.tile(np.arange(P, dtype=np.int32), R)
    experts = experts.reshape(T, L, k)

    def member(key: str, per_token: bool) -> np.ndarray:
        mshape, mdtype = z.header(key)
        want = (T,) if per_token else experts.shape
        size = int(np.prod(mshape, dtype=object))
        # 4-D files store per-token fields [R, P] and weights [R, P, L, k]: same size suffices.
        ok = size == int(np.prod(want)) if (reshape4 or not per_token) else tuple(mshape) == want
        if not ok:
            raise InputError(p, key, f"shape {mshape}, expected {want}",
                             "one value per token" if per_token else "one per selected expert")
        if per_token and mdtype.kind not in "iuUS":
            raise InputError(p, key, f"dtype {mdtype} is not an integer type",
                             "per-token fields are integers")
        return z.read(key).reshape(want)

    weights = None
    for key in _WEIGHT_KEYS:
        if key in z:
            weights = member(key, per_token=False)
            break
    if not reshape4:
        for key in _REQUEST_KEYS:
            if key in z:
                tokens["request"] = member(key, True)
                break
        else:
            if "dataset" in z and "problem_id" in z:
                ds, pid = member("dataset", True), member("problem_id", True)
                if ds.dtype.kind not in "iu" or pid.dtype.kind not in "iu" or (
                        ds.min() < 0 or pid.min() < 0 or pid.max() >= 1 << 31
                        or ds.max() >= 1 << 31):
                    raise InputError(p, "dataset/problem_id", "not small non-negative integers",
                                     "store indices")
                tokens["request"] = ds.astype(np.int64) * (int(pid.max()) + 1) + pid
        for key in _POSITION_KEYS:
            if key in z:
                tokens["position"] = member(key, True)
                break
    if "step" in z:
        tokens["step"] = member("step", True)
    if "phase" in z:
        ph = member("phase", True)
        if ph.dtype.kind in "US":
            ph = np.select([ph == "prefill", ph == "decode"], [0, 1], -1)
        tokens["phase"] = ph
    for key, arr in tokens.items():
        if arr.dtype.kind not in "iu":
            raise InputError(p, key, f"dtype {arr.dtype} is not an integer type",
                             "per-token fields are integers")

    dropped = 0
    if missing_id is not None and (experts.dtype.kind == "i" or
                                   missing_id <= np.iinfo(experts.dtype).max):
        lost = np.any(experts == missing_id, axis=(1, 2))
        dropped = int(lost.sum())
        if dropped:
            keep = ~lost
            experts = experts[keep]
            weights = None if weights is None else weights[keep]
            tokens = {kk: v[keep] for kk, v in tokens.items()}
    if experts.shape[0] == 0:
        raise InputError(p, "experts", f"every token has a lost record (missing_id={missing_id})"
                         if dropped else "the trace has no tokens", "import a non-empty trace")
    if experts.dtype.kind == "i" and int(experts.min()) < 0:
        raise InputError(p, "experts", f"negative expert id {int(experts.min())}",
                         "ids must lie in 0..num_experts-1 (declare a missing_id for markers)")
    if num_experts is None:
        if missing_id is None:
            _refuse_undeclared_marker(experts, p)
        num_experts = infer_num_experts(experts, p)
    elif int(experts.max()) >= num_experts:
        raise InputError(p, "experts", f"expert id {int(experts.max())} >= num_experts="
                         f"{num_experts}", "fix num_experts, or declare the lost-record marker "
                         "(a missing_id member or --missing-id)")
    if k > num_experts:
        raise InputError(p, "experts", f"{k} experts per token but num_experts={num_experts}",
                         "check the last axis (top-k) and num_experts")
    meta = TraceMeta(num_experts=num_experts, top_k=k, moe_layer_ids=tuple(layer_ids),
                     model=model or p.stem, source=str(p),
                     extra={DROPPED_KEY: dropped} if dropped else {})
    return Trace(experts=experts, meta=meta, weights=weights, tokens=tokens)

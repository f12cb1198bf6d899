"""Import SGLang routing: per-request ``routed_experts`` and expert-distribution recorder dumps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.traces.importers._common import (
    b64decode,
    drop_dense_layers,
    iter_json_records,
    to_numpy,
    torch_load,
)
from moeplace.traces.importers.vllm import from_routed_experts
from moeplace.traces.stats import RoutingStats
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL, PHASE_UNKNOWN, Trace, TraceMeta


def read_sglang_requests(path: str | os.PathLike[str], *, num_hidden_layers: int | None = None,
                         top_k: int | None = None, num_experts: int | None = None,
                         moe_layer_ids: list[int] | None = None, model: str = "") -> Trace:
    """Read ``/generate`` responses whose ``meta_info.routed_experts`` is base64 int32.

    The flat int32 buffer is ``[tokens-1, num_hidden_layers, top_k]``; the token count comes from
    ``prompt_tokens + completion_tokens``, so one of ``num_hidden_layers``/``top_k`` must be known.
    """
    p = Path(path)
    arrays: list[np.ndarray] = []
    prompts: list[int | None] = []
    for where, obj in iter_json_records(p):
        info = obj.get("meta_info")
        if not isinstance(info, dict) or "routed_experts" not in info:
            raise InputError(where, "meta_info.routed_experts", "missing",
                             "send requests with return_routed_experts: true")
        flat = np.frombuffer(b64decode(info["routed_experts"], where, "meta_info.routed_experts"),
                             dtype="<i4")
        rows = None
        if "prompt_tokens" in info and "completion_tokens" in info:
            rows = int(info["prompt_tokens"]) + int(info["completion_tokens"]) - 1
        arrays.append(_shape_rows(flat, rows, num_hidden_layers, top_k, where))
        prompts.append(int(info["prompt_tokens"]) if "prompt_tokens" in info else None)
    return from_routed_experts(arrays, num_experts=num_experts, moe_layer_ids=moe_layer_ids,
                               prompt_tokens=prompts if any(x is not None for x in prompts)
                               else None, source=str(p), model=model)


def _shape_rows(flat: np.ndarray, rows: int | None, H: int | None, k: int | None,
                where: str) -> np.ndarray:
    n = flat.size
    if H is not None and k is not None:
        per = H * k
    elif rows:
        if n % rows:
            raise InputError(where, "meta_info.routed_experts", f"{n} ids do not split into "
                             f"{rows} token rows", "check prompt_tokens/completion_tokens")
        per = n // rows
        if H is None and k is None:
            raise InputError(where, "meta_info.routed_experts", f"{per} ids per token, but the "
                             "split into layers x top_k is unknown",
                             "pass --num-hidden-layers or --top-k")
        H, k = (per // k, k) if k is not None else (H, per // H)  # type: ignore[operator]
    else:
        raise InputError(where, "meta_info", "token count unknown and shape not given",
                         "pass --num-hidden-layers and --top-k")
    assert H is not None and k is not None
    if H * k == 0 or n % (H * k):
        raise InputError(where, "meta_info.routed_experts",
                         f"{n} ids are not a multiple of layers x top_k = {H}x{k}",
                         "check --num-hidden-layers / --top-k")
    return flat.reshape(-1, H, k)


def _phase_of(mode: Any) -> int:
    text = str(getattr(mode, "name", mode)).upper()
    if "DECODE" in text or text == "2":
        return PHASE_DECODE
    if "EXTEND" in text or "PREFILL" in text or text == "1":
        return PHASE_PREFILL
    return PHASE_UNKNOWN


def read_sglang_dump(path: str | os.PathLike[str], *, num_experts: int | None = None,
                     moe_layer_ids: list[int] | None = None, model: str = ""
                     ) -> Trace | RoutingStats:
    """Read an expert-distribution recorder ``.pt`` dump.

    ``per_token`` dumps become a trace (physical slot ids mapped to logical experts through
    ``last_physical_to_logical_map``); ``stat`` dumps (``logical_count``) become load-only stats.
    """
    p = Path(path)
    obj = torch_load(p)
    if not isinstance(obj, dict):
        raise InputError(p, "file", "not an SGLang recorder dump (expected a dict)",
                         "pass expert_distribution_recorder_*.pt unmodified")
    if "logical_count" in obj:
        return _stat_dump(p, obj, num_experts, moe_layer_ids, model)
    if "records" not in obj:
        raise InputError(p, "records", "neither 'records' nor 'logical_count' present",
                         "record with --expert-distribution-recorder-mode per_token or stat")
    return _per_token_dump(p, obj, num_experts, moe_layer_ids, model)


def _stat_dump(p: Path, obj: dict[str, Any], num_experts: int | None,
               moe_layer_ids: list[int] | None, model: str) -> RoutingStats:
    counts = to_numpy(obj["logical_count"]).astype(np.int64)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3:
        raise InputError(p, "logical_count", f"shape {counts.shape} is not [steps, layers, N]",
                         "pass the stat dump unmodified")
    load = counts.sum(axis=0)
    H, N = load.shape
    if moe_layer_ids is None:
        moe_layer_ids = [h for h in range(H) if load[h].any()]
    if num_experts is not None and num_experts != N:
        raise InputError(p, "logical_count", f"{N} experts, expected {num_experts}",
                         "check --num-experts")
    meta = TraceMeta(num_experts=N, top_k=1, moe_layer_ids=tuple(moe_layer_ids),
                     num_hidden_layers=H, model=model, source=str(p),
                     extra={"top_k_unknown": True})
    load = load[moe_layer_ids]
    # The dump states neither top_k nor the token count, so num_tokens stays 0.
    return RoutingStats(meta=meta, num_tokens=0, load=load)


def _per_token_dump(p: Path, obj: dict[str, Any], num_experts: int | None,
                    moe_layer_ids: list[int] | None, model: str) -> Trace:
    if "last_physical_to_logical_map" not in obj:
        raise InputError(p, "last_physical_to_logical_map", "missing",
                         "pass the per_token dump unmodified")
    p2l = to_numpy(obj["last_physical_to_logical_map"]).astype(np.int64)
    parts, reqs, poss, phases = [], [], [], []
    next_req = 0
    for i, rec in enumerate(obj["records"]):
        if "topk_ids_of_layer" not in rec:
            raise InputError(p, f"records[{i}].topk_ids_of_layer", "missing",
                             "record with --expert-distribution-recorder-mode per_token")
        ids = to_numpy(rec["topk_ids_of_layer"]).astype(np.int64)  # [H, tokens, 8]
        if ids.ndim != 3 or ids.shape[0] != p2l.shape[0]:
            raise InputError(p, f"records[{i}].topk_ids_of_layer", f"shape {ids.shape} does not "
                             f"match the map's {p2l.shape[0]} layers", "pass the dump unmodified")
        if ids.shape[1] == 0:
            continue
        if ids.max() >= p2l.shape[1]:
            raise InputError(p, f"records[{i}].topk_ids_of_layer", f"physical id {ids.max()} >= "
                             f"{p2l.shape[1]} slots", "pass the dump unmodified")
        logical = np.where(ids >= 0, np.take_along_axis(p2l[:, None, :].repeat(
            ids.shape[1], 1), np.clip(ids, 0, None), axis=2), -1)
        parts.append(logical.transpose(1, 0, 2))
        n = ids.shape[1]
        raw_seg = rec.get("extend_seq_lens")
        seg = to_numpy(raw_seg if raw_seg is not None else [n]).astype(np.int64).reshape(-1)
        if _phase_of(rec.get("forward_mode")) == PHASE_DECODE or seg.sum() != n:
            seg = np.ones(n, np.int64)  # decode passes: one token per request
        reqs.append(np.repeat(np.arange(next_req, next_req + len(seg)), seg))
        next_req += len(seg)
        raw_pos = rec.get("positions")
        poss.append(to_numpy(raw_pos if raw_pos is not None else np.arange(n))
                    .astype(np.int32).reshape(-1))
        phases.append(np.full(n, _phase_of(rec.get("forward_mode")), np.int8))
    if not parts:
        raise InputError(p, "records", "no tokens recorded", "record while serving traffic")
    allids = np.concatenate(parts)  # [T, H, 8] with -1 padding
    experts, layer_ids = drop_dense_layers(allids, moe_layer_ids, p)
    valid = experts >= 0
    k_per = valid.sum(axis=2)
    k = int(k_per.max())
    if (k_per != k).any():
        raise InputError(p, "topk_ids_of_layer", "tokens have different numbers of experts "
                         "across layers", "all MoE layers must use the same top-k")
    experts = np.sort(np.where(valid, experts, np.iinfo(np.int64).max), axis=2)[:, :, :k]
    if num_experts is None:
        num_experts = int(p2l.max()) + 1
    meta = TraceMeta(num_experts=num_experts, top_k=k, moe_layer_ids=tuple(layer_ids),
                     num_hidden_layers=p2l.shape[0], model=model, source=str(p))
    return Trace(experts=experts, meta=meta, tokens={
        "request": np.concatenate(reqs), "position": np.concatenate(poss),
        "phase": np.concatenate(phases)})

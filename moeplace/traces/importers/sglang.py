"""Import SGLang routing: per-request ``routed_experts`` and expert-distribution recorder dumps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._validate import MAX_EXPERTS, MAX_LAYERS, MAX_TOP_K, as_int, int_array
from moeplace.errors import InputError
from moeplace.traces.importers._common import (
    b64decode,
    drop_dense_layers,
    infer_num_experts,
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
    if num_hidden_layers is not None:
        as_int(num_hidden_layers, "--num-hidden-layers", "value", lo=1, hi=MAX_LAYERS)
    if top_k is not None:
        as_int(top_k, "--top-k", "value", lo=1, hi=MAX_TOP_K)
    arrays: list[np.ndarray] = []
    prompts: list[int | None] = []
    for where, obj in iter_json_records(p):
        info = obj.get("meta_info")
        if not isinstance(info, dict) or "routed_experts" not in info:
            raise InputError(where, "meta_info.routed_experts", "missing",
                             "send requests with return_routed_experts: true")
        raw = b64decode(info["routed_experts"], where, "meta_info.routed_experts")
        if len(raw) % 4:
            raise InputError(where, "meta_info.routed_experts", f"{len(raw)} bytes is not a "
                             "whole number of int32 ids", "pass the field unmodified")
        flat = np.frombuffer(raw, dtype="<i4")
        pt = info.get("prompt_tokens")
        pt = None if pt is None else as_int(pt, where, "meta_info.prompt_tokens", lo=0)
        ct = info.get("completion_tokens")
        ct = None if ct is None else as_int(ct, where, "meta_info.completion_tokens", lo=0)
        rows = None
        if pt is not None and ct is not None:
            rows = pt + ct - 1
            if rows < 1:
                raise InputError(where, "meta_info.prompt_tokens", f"{pt} prompt + {ct} "
                                 "completion tokens leave no routed token",
                                 "pass the response unmodified")
        arrays.append(_shape_rows(flat, rows, num_hidden_layers, top_k, where))
        prompts.append(pt)
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


def _int_tensor(x: Any, source: object, field: str, ndim: tuple[int, ...]) -> np.ndarray:
    """A tensor/list from a dump as an int64 array of one of the allowed ranks."""
    if x is None:
        raise InputError(source, field, "missing", "pass the dump unmodified")
    a = int_array(to_numpy(x) if hasattr(x, "detach") else x, source, field)
    if a.ndim not in ndim:
        raise InputError(source, field, f"shape {a.shape} has {a.ndim} axes, expected "
                         f"{' or '.join(map(str, ndim))}", "pass the dump unmodified")
    return a


def _stat_dump(p: Path, obj: dict[str, Any], num_experts: int | None,
               moe_layer_ids: list[int] | None, model: str) -> RoutingStats:
    counts = _int_tensor(obj["logical_count"], p, "logical_count", (2, 3))
    if counts.ndim == 2:
        counts = counts[None]
    if 0 in counts.shape[1:]:
        raise InputError(p, "logical_count", f"shape {counts.shape} has no layers or experts",
                         "pass the stat dump unmodified")
    if counts.size and int(counts.min()) < 0:
        raise InputError(p, "logical_count", f"negative count {int(counts.min())}",
                         "pass the stat dump unmodified")
    load = counts.sum(axis=0)
    H, N = load.shape
    as_int(N, p, "logical_count", hi=MAX_EXPERTS, fix="check the experts axis")
    if moe_layer_ids is None:
        moe_layer_ids = [h for h in range(H) if load[h].any()]
    bad = [h for h in moe_layer_ids if not 0 <= h < H]
    if bad or len(set(moe_layer_ids)) != len(moe_layer_ids) or not moe_layer_ids:
        raise InputError(p, "moe_layer_ids", f"{moe_layer_ids} are not distinct layers in "
                         f"0..{H - 1}" if moe_layer_ids else "every layer's count is zero",
                         "check --moe-layers, or record while serving traffic")
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
    p2l = _int_tensor(obj["last_physical_to_logical_map"], p, "last_physical_to_logical_map",
                      (2,))
    if 0 in p2l.shape or int(p2l.min()) < 0 or int(p2l.max()) >= MAX_EXPERTS:
        raise InputError(p, "last_physical_to_logical_map", f"shape {p2l.shape} or ids outside "
                         f"0..{MAX_EXPERTS - 1}", "pass the per_token dump unmodified")
    H = p2l.shape[0]
    records = obj["records"]
    if not isinstance(records, (list, tuple)):
        raise InputError(p, "records", f"a {type(records).__name__}, not a list",
                         "pass the per_token dump unmodified")
    parts, reqs, poss, phases = [], [], [], []
    next_req = 0
    for i, rec in enumerate(records):
        field = f"records[{i}].topk_ids_of_layer"
        if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
            raise InputError(p, field, "missing",
                             "record with --expert-distribution-recorder-mode per_token")
        ids = _int_tensor(rec["topk_ids_of_layer"], p, field, (3,))  # [H, tokens, 8]
        if ids.shape[0] != H or ids.shape[2] > MAX_TOP_K:
            raise InputError(p, field, f"shape {ids.shape} does not match the map's {H} layers",
                             "pass the dump unmodified")
        n = ids.shape[1]
        if n == 0 or ids.shape[2] == 0:
            continue
        if int(ids.max()) >= p2l.shape[1] or int(ids.min()) < -1:
            bad = int(ids.max()) if int(ids.max()) >= p2l.shape[1] else int(ids.min())
            raise InputError(p, field, f"physical id {bad} outside -1..{p2l.shape[1] - 1}",
                             "pass the dump unmodified")
        # Gather each layer's logical ids directly ([H, T, k] int64, the size of ``ids``).
        logical = np.where(ids >= 0, p2l[np.arange(H)[:, None, None], np.clip(ids, 0, None)],
                           -1)
        parts.append(logical.transpose(1, 0, 2))
        raw_seg = rec.get("extend_seq_lens")
        seg = (_int_tensor(raw_seg, p, f"records[{i}].extend_seq_lens", (0, 1)).reshape(-1)
               if raw_seg is not None else np.array([n], np.int64))
        if seg.size and int(seg.min()) < 0:
            raise InputError(p, f"records[{i}].extend_seq_lens", "negative length",
                             "pass the dump unmodified")
        if _phase_of(rec.get("forward_mode")) == PHASE_DECODE or seg.sum() != n:
            seg = np.ones(n, np.int64)  # decode passes: one token per request
        reqs.append(np.repeat(np.arange(next_req, next_req + len(seg)), seg))
        next_req += len(seg)
        raw_pos = rec.get("positions")
        pos = (_int_tensor(raw_pos, p, f"records[{i}].positions", (0, 1, 2)).reshape(-1)
               if raw_pos is not None else np.arange(n))
        if pos.size != n or (n and (int(pos.min()) < 0 or int(pos.max()) >= 1 << 31)):
            raise InputError(p, f"records[{i}].positions", f"{pos.size} positions for {n} "
                             "tokens, or outside 0..2^31-1", "pass the dump unmodified")
        poss.append(pos.astype(np.int32))
        phases.append(np.full(n, _phase_of(rec.get("forward_mode")), np.int8))
    if not parts:
        raise InputError(p, "records", "no tokens recorded", "record while serving traffic")
    allids = np.concatenate(parts)  # [T, H, 8] with -1 padding
    experts, layer_ids = drop_dense_layers(allids, moe_layer_ids, p)
    valid = experts >= 0
    k_per = valid.sum(axis=2)
    k = int(k_per.max())
    if k == 0 or (k_per != k).any():
        raise InputError(p, "topk_ids_of_layer", "tokens have different numbers of experts "
                         "across layers", "all MoE layers must use the same top-k")
    experts = np.sort(np.where(valid, experts, np.iinfo(np.int64).max), axis=2)[:, :, :k]
    num_experts = infer_num_experts(p2l, p, "last_physical_to_logical_map", num_experts)
    meta = TraceMeta(num_experts=num_experts, top_k=k, moe_layer_ids=tuple(layer_ids),
                     num_hidden_layers=H, model=model, source=str(p))
    return Trace(experts=experts, meta=meta, tokens={
        "request": np.concatenate(reqs), "position": np.concatenate(poss),
        "phase": np.concatenate(phases)})

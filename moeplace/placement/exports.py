"""Write placements in the files serving stacks load (SGLang, vLLM proposals, vllm-ascend, EPLB) and
read them back.

Layer axes differ by stack: SGLang counts every hidden layer (dense layers get trivial rows),
the vLLM proposals, vllm-ascend and EPLB count MoE layers only. A placement knows its MoE layers'
hidden-layer ids (``moe_layer_ids``) when it was solved from a trace; otherwise they must be given.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._fileio import atomic_path
from moeplace.errors import InputError
from moeplace.placement.placement import Placement

FORMATS = ("sglang", "sglang-logical-count", "vllm-ascend", "vllm-pr49572", "vllm-pr41141", "eplb")


def _hidden_rows(placement: Placement, num_hidden_layers: int | None,
                 moe_layer_ids: list[int] | None) -> tuple[int, list[int]]:
    ids = list(moe_layer_ids) if moe_layer_ids is not None else (
        list(placement.moe_layer_ids) if placement.moe_layer_ids is not None else None)
    if ids is None:
        raise InputError(placement.source, "moe_layer_ids", "unknown: which hidden layers are MoE?",
                         "pass --moe-layers (or solve from a trace that records them)")
    if len(ids) != placement.num_layers:
        raise InputError(placement.source, "moe_layer_ids", f"{len(ids)} ids for "
                         f"{placement.num_layers} MoE layers", "give one id per MoE layer")
    H = num_hidden_layers if num_hidden_layers is not None else max(ids) + 1
    if max(ids) >= H or min(ids) < 0:
        raise InputError("--num-hidden-layers", "value", f"{H} hidden layers cannot hold MoE "
                         f"layer {max(ids)}", "pass the model's num_hidden_layers")
    return H, ids


def to_sglang(placement: Placement, num_hidden_layers: int | None = None,
              moe_layer_ids: list[int] | None = None) -> dict[str, Any]:
    """``{"physical_to_logical_map": [num_hidden_layers][N+R]}`` for ``--init-expert-location``."""
    H, ids = _hidden_rows(placement, num_hidden_layers, moe_layer_ids)
    trivial = (np.arange(placement.num_slots) % int(placement.num_experts)).tolist()  # type: ignore[arg-type]
    rows = [trivial] * H
    for j, h in enumerate(ids):
        rows[h] = placement.phy2log[j].tolist()
    return {"physical_to_logical_map": rows}


def to_sglang_logical_count(load: np.ndarray, moe_layer_ids: list[int],
                            num_hidden_layers: int | None = None) -> dict[str, Any]:
    """``{"logical_count": [num_hidden_layers][N]}`` so SGLang runs its own EPLB at start-up."""
    H = num_hidden_layers if num_hidden_layers is not None else max(moe_layer_ids) + 1
    out = np.zeros((H, load.shape[1]), np.int64)
    out[list(moe_layer_ids)] = load
    return {"logical_count": out.tolist()}


def to_eplb(placement: Placement) -> dict[str, np.ndarray]:
    """DeepSeek EPLB arrays: ``phy2log [L, P]``, ``log2phy [L, N, max copies]``, ``logcnt``."""
    return {"phy2log": placement.phy2log.astype(np.int64),
            "log2phy": placement.log2phy().astype(np.int64),
            "logcnt": placement.logcnt().astype(np.int64)}


def to_vllm_ascend(placement: Placement) -> dict[str, Any]:
    return {"moe_layer_count": placement.num_layers, "layer_list": [
        {"layer_id": l, "device_count": placement.num_gpus,
         "device_list": [{"device_id": g, "device_expert": ex}
                         for g, ex in enumerate(placement.gpu_experts(l))]}
        for l in range(placement.num_layers)]}


def launch_flags(fmt: str, path: str, placement: Placement) -> str:
    """The serving-stack flags that load an exported file."""
    R = placement.num_replicas
    ep = placement.num_gpus
    if fmt in ("sglang", "sglang-logical-count"):
        return (f"sglang: --ep-size {ep} --init-expert-location {path}"
                + (f" --ep-num-redundant-experts {R}" if R else ""))
    if fmt == "vllm-ascend":
        return ("vllm-ascend: --enable-expert-parallel --additional-config "
                f"'{{\"eplb_config\":{{\"expert_map_path\":\"{path}\"}}}}'")
    if fmt == "vllm-pr49572":
        return (f"vLLM with PR 49572 (unmerged): --enable-expert-parallel --eplb-config "
                f"'{{\"initial_expert_map_path\":\"{path}\",\"num_redundant_experts\":{R}}}'")
    if fmt == "vllm-pr41141":
        return (f"vLLM with PR 41141 (unmerged): --enable-expert-parallel, load {path} as the "
                f"initial EPLB mapping ({R} redundant experts)")
    return f"DeepSeek EPLB arrays in {path} (phy2log, log2phy, logcnt; MoE layers only)"


def export_placement(placement: Placement, fmt: str, path: str | os.PathLike[str], *,
                     num_hidden_layers: int | None = None, moe_layer_ids: list[int] | None = None,
                     load: np.ndarray | None = None) -> str:
    """Write ``placement`` as ``fmt`` atomically; returns the launch flags to use it."""
    if fmt not in FORMATS:
        raise InputError("export", "--format", f"unknown format {fmt!r}", f"use one of {FORMATS}")
    with atomic_path(path) as tmp:
        if fmt == "eplb":
            with open(tmp, "wb") as fh:
                np.savez(fh, **to_eplb(placement))
        elif fmt == "vllm-pr41141":
            rec = {"record_type": "eplb_initial_mapping", "version": 1,
                   "num_redundant_experts": placement.num_replicas,
                   "num_slots": placement.num_slots,
                   "initial_global_assignments": {str(l): placement.phy2log[l].tolist()
                                                  for l in range(placement.num_layers)}}
            tmp.write_text(json.dumps(rec) + "\n")
        else:
            if fmt == "sglang":
                obj: Any = to_sglang(placement, num_hidden_layers, moe_layer_ids)
            elif fmt == "sglang-logical-count":
                if load is None:
                    raise InputError("export", "--stats", "sglang-logical-count writes routing "
                                     "counts, not a placement", "pass --stats TRACE_OR_STATS")
                _, ids = _hidden_rows(placement, num_hidden_layers, moe_layer_ids)
                obj = to_sglang_logical_count(load, ids, num_hidden_layers)
            elif fmt == "vllm-ascend":
                obj = to_vllm_ascend(placement)
            else:  # vllm-pr49572: one [P] list per MoE layer
                obj = placement.phy2log.tolist()
            tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    return launch_flags(fmt, str(path), placement)


def read_placement(path: str | os.PathLike[str], fmt: str = "auto", *, num_gpus: int | None = None,
                   num_nodes: int = 1, num_experts: int | None = None,
                   moe_layer_ids: list[int] | None = None) -> Placement:
    """Read any exported format (or moeplace JSON) back into a ``Placement``.

    SGLang maps keep the rows of the given MoE layers (all rows when none are given); formats
    without a GPU count (SGLang, vLLM PRs, EPLB) need ``num_gpus``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "path", "no such file", "check the path")
    if fmt == "auto":
        fmt = _detect(p)
    src = str(p)

    def need_gpus() -> int:
        if num_gpus is None:
            raise InputError(p, "num_gpus", f"{fmt} files do not record the GPU count",
                             "pass --gpus (the expert-parallel size)")
        return num_gpus

    try:
        if fmt == "moeplace":
            return Placement.load(p)
        if fmt == "eplb":
            z = np.load(p, allow_pickle=False)
            if "phy2log" not in z.files:
                raise InputError(p, "phy2log", "array missing", "export with --format eplb")
            return Placement(z["phy2log"], need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, source=src)
        if fmt == "vllm-pr41141":
            rec = json.loads(p.read_text().splitlines()[0])
            ga = rec["initial_global_assignments"]
            rows = [ga[str(l)] for l in range(len(ga))]
            return Placement(np.array(rows), need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, source=src)
        obj = json.loads(p.read_text())
        if fmt == "vllm-ascend":
            layers = sorted(obj["layer_list"], key=lambda d: d["layer_id"])
            rows = [[e for dev in sorted(d["device_list"], key=lambda x: x["device_id"])
                     for e in dev["device_expert"]] for d in layers]
            return Placement(np.array(rows), int(layers[0]["device_count"]), num_nodes,
                             num_experts, moe_layer_ids=moe_layer_ids, source=src)
        if fmt == "vllm-pr49572":
            arr = np.array(obj)
            if arr.ndim == 1:
                raise InputError(p, "map", "one flat list gives no per-layer placement",
                                 "export per-layer lists")
            return Placement(arr, need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, source=src)
        if fmt == "sglang":
            if set(obj) != {"physical_to_logical_map"}:
                raise InputError(p, "keys", f"{sorted(obj)}: SGLang accepts exactly one key",
                                 "keep only physical_to_logical_map")
            rows = np.array(obj["physical_to_logical_map"])
            ids = moe_layer_ids if moe_layer_ids is not None else list(range(len(rows)))
            return Placement(rows[ids], need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=ids, source=src)
    except (KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(p, fmt, f"malformed ({type(exc).__name__}: {exc})",
                         f"write it with moeplace export --format {fmt}") from None
    raise InputError(p, "format", f"{fmt!r} cannot be read as a placement",
                     "sglang-logical-count holds statistics; use it with solve")


def _detect(p: Path) -> str:
    if p.suffix == ".npz":
        return "eplb"
    if p.suffix == ".jsonl":
        return "vllm-pr41141"
    try:
        obj = json.loads(p.read_text())
    except ValueError:
        raise InputError(p, "file", "not JSON, JSONL or .npz", "pass --format") from None
    if isinstance(obj, list):
        return "vllm-pr49572"
    if isinstance(obj, dict):
        if "physical_to_logical_map" in obj:
            return "sglang"
        if "layer_list" in obj:
            return "vllm-ascend"
        if obj.get("format") == "moeplace.placement" or "phy2log" in obj:
            return "moeplace"
        if "logical_count" in obj:
            return "sglang-logical-count"
    raise InputError(p, "format", "not a known placement file", "pass --format")

"""Import Megatron-Core ``router_trace_rank*.jsonl`` routing traces."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from moeplace._validate import MAX_LAYERS, MAX_TOP_K, as_int, int_array
from moeplace.errors import InputError
from moeplace.traces.importers._common import infer_num_experts, iter_json_records
from moeplace.traces.trace import Trace, TraceMeta


def read_megatron(path: str | os.PathLike[str], *, num_experts: int | None = None,
                  model: str = "") -> Trace:
    """Read one ``router_trace_rank{r}.jsonl`` file or a directory of them.

    Records of one (rank, step, stage) that share a layer are successive micro-batches; the i-th
    record of every layer covers the same tokens, which become request ``(rank, step, stage, i)``.
    MTP layers (``mtp_idx``) are skipped.
    """
    p = Path(path)
    files = sorted(p.glob("router_trace_rank*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise InputError(p, "path", "no router_trace_rank*.jsonl files",
                         "point at the --moe-routing-trace-path directory")
    groups: dict[tuple, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    topk_seen: dict[int, tuple[int, str]] = {}
    for f in files:
        for where, rec in iter_json_records(f):
            if rec.get("mtp_idx") is not None:
                continue
            for key in ("layer", "top_indices"):
                if key not in rec:
                    raise InputError(where, key, "missing", "pass the Megatron trace unmodified")
            idx = int_array(rec["top_indices"], where, "top_indices")
            if idx.size == 0:
                continue  # an empty micro-batch routes no token at any layer
            if idx.ndim == 1:
                idx = idx[:, None]
            if idx.ndim != 2 or idx.shape[1] > MAX_TOP_K:
                raise InputError(where, "top_indices", f"shape {idx.shape} is not [tokens, topk]",
                                 "pass the Megatron trace unmodified")
            if "num_tokens" in rec and as_int(rec["num_tokens"], where, "num_tokens",
                                              lo=0) != idx.shape[0]:
                raise InputError(where, "num_tokens", f"says {rec['num_tokens']} but top_indices "
                                 f"has {idx.shape[0]} rows", "pass the trace unmodified")
            layer = as_int(rec["layer"], where, "layer", lo=0, hi=MAX_LAYERS)
            k = idx.shape[1]
            for other_layer, (k0, w0) in topk_seen.items():
                if k0 != k:
                    raise InputError(where, "top_indices", f"top-k {k} at layer {layer} but "
                                     f"{k0} at layer {other_layer} ({w0})",
                                     "all MoE layers must share one top-k")
                break
            topk_seen.setdefault(layer, (k, where))
            for name in ("rank", "step"):
                if name in rec:
                    as_int(rec[name], where, name)
            key = (int(rec.get("rank", 0)), int(rec.get("step", 0)), str(rec.get("stage", "")),
                   str(rec.get("block", "decoder")))
            groups[key][layer].append(idx)
    if not groups:
        raise InputError(p, "records", "no routing records", "check --moe-routing-trace-path")
    layers = sorted(topk_seen)
    parts, reqs, poss = [], [], []
    rid = 0
    for key in sorted(groups):
        g = groups[key]
        if sorted(g) != layers:
            raise InputError(p, "layer", f"{key} lacks layers "
                             f"{sorted(set(layers) - set(g))}", "keep all ranks' complete traces")
        nmb = {len(v) for v in g.values()}
        if len(nmb) != 1:
            raise InputError(p, "layer", f"{key}: layers saw different numbers of micro-batches",
                             "keep complete traces")
        for i in range(nmb.pop()):
            cols = [g[layer][i] for layer in layers]
            n = {c.shape[0] for c in cols}
            if len(n) != 1:
                raise InputError(p, "num_tokens", f"{key} micro-batch {i}: layers routed "
                                 "different token counts", "keep complete traces")
            parts.append(np.stack(cols, axis=1))
            cnt = cols[0].shape[0]
            reqs.append(np.full(cnt, rid, np.int64))
            poss.append(np.arange(cnt, dtype=np.int32))
            rid += 1
    experts = np.concatenate(parts)
    num_experts = infer_num_experts(experts, p, "top_indices", num_experts)
    meta = TraceMeta(num_experts=num_experts, top_k=experts.shape[2],
                     moe_layer_ids=tuple(layers), model=model, source=str(p))
    return Trace(experts=experts, meta=meta,
                 tokens={"request": np.concatenate(reqs), "position": np.concatenate(poss)})

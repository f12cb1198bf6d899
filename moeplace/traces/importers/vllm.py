"""Import vLLM ``routed_experts``: numpy arrays or base64 ``.npy`` inside OpenAI-style responses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeplace._validate import MAX_LAYERS, MAX_TOP_K, as_int, int_array, type_name
from moeplace.errors import InputError
from moeplace.traces.importers._common import (
    b64decode,
    drop_dense_layers,
    infer_num_experts,
    iter_json_records,
    npy_from_bytes,
)
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL, PHASE_UNKNOWN, Trace, TraceMeta


def from_routed_experts(arrays: list[np.ndarray], *, num_experts: int | None = None,
                        moe_layer_ids: list[int] | None = None,
                        prompt_tokens: list[int | None] | None = None,
                        source: str = "vllm", model: str = "") -> Trace:
    """Build a trace from per-request arrays ``[prompt+generated-1, num_hidden_layers, top_k]``.

    Each array is one request; rows are positions; rows below ``prompt_tokens[i]`` are prefill.
    Dense layers (zero rows in vLLM) are dropped unless ``moe_layer_ids`` names the MoE layers.
    """
    if not arrays:
        raise InputError(source, "routed_experts", "no requests found",
                         "start vLLM with --enable-return-routed-experts")
    for a in arrays:
        if a.ndim != 3:
            raise InputError(source, "routed_experts", f"shape {a.shape} is not "
                             "[tokens, num_hidden_layers, top_k]", "pass the array unmodified")
        if a.dtype.kind not in "iu":
            raise InputError(source, "routed_experts", f"dtype {a.dtype} is not an integer type",
                             "pass the array unmodified")
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InputError(source, "routed_experts", f"requests disagree on [layers, top_k]: "
                         f"{sorted(shapes)}", "import responses of one model only")
    if 0 in arrays[0].shape[1:] or sum(a.shape[0] for a in arrays) == 0:
        raise InputError(source, "routed_experts", f"shape {arrays[0].shape} holds no routing",
                         "start vLLM with --enable-return-routed-experts")
    if arrays[0].shape[1] > MAX_LAYERS or arrays[0].shape[2] > MAX_TOP_K:
        raise InputError(source, "routed_experts", f"shape {arrays[0].shape} is implausible",
                         "pass the array unmodified")
    if prompt_tokens is not None and len(prompt_tokens) != len(arrays):
        raise InputError(source, "prompt_tokens", f"{len(prompt_tokens)} values for "
                         f"{len(arrays)} requests", "give one per request")
    H = arrays[0].shape[1]
    stacked = np.concatenate(arrays)
    experts, layer_ids = drop_dense_layers(stacked, moe_layer_ids, source)
    lengths = [a.shape[0] for a in arrays]
    request = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    position = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    phase = np.full(len(request), PHASE_UNKNOWN, np.int8)
    if prompt_tokens is not None:
        start = 0
        for n, p in zip(lengths, prompt_tokens, strict=True):
            if p is not None:
                phase[start:start + n] = np.where(np.arange(n) < p, PHASE_PREFILL, PHASE_DECODE)
            start += n
    num_experts = infer_num_experts(experts, source, "routed_experts", num_experts)
    meta = TraceMeta(num_experts=num_experts, top_k=experts.shape[2],
                     moe_layer_ids=tuple(layer_ids), num_hidden_layers=H, model=model,
                     source=source)
    tokens = {"request": request, "position": position}
    if prompt_tokens is not None:
        tokens["phase"] = phase
    return Trace(experts=experts, meta=meta, tokens=tokens)


def read_vllm(path: str | os.PathLike[str], *, num_experts: int | None = None,
              moe_layer_ids: list[int] | None = None, model: str = "") -> Trace:
    """Read a ``.npy`` array, or JSON/JSONL OpenAI responses with ``choices[i].routed_experts``."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = npy_from_bytes(None, str(p), "file", path=p)
        return from_routed_experts([arr], num_experts=num_experts, moe_layer_ids=moe_layer_ids,
                                   source=str(p), model=model)
    arrays: list[np.ndarray] = []
    prompts: list[int | None] = []
    names: list[str] = []
    for where, obj in iter_json_records(p):
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise InputError(where, "choices", "missing: not an OpenAI-style response",
                             "save the server's JSON responses unmodified")
        usage = obj.get("usage") or {}
        if not isinstance(usage, dict):
            raise InputError(where, "usage", f"a JSON {type_name(usage)}, not an object",
                             "save the server's JSON responses unmodified")
        if isinstance(obj.get("model"), str):
            names.append(obj["model"])
        for i, ch in enumerate(choices):
            field = f"choices[{i}].routed_experts"
            if not isinstance(ch, dict) or "routed_experts" not in ch:
                raise InputError(where, field, "missing",
                                 "start vLLM with --enable-return-routed-experts")
            val = ch["routed_experts"]
            arr = (int_array(val, where, field) if isinstance(val, list)
                   else npy_from_bytes(b64decode(val, where, field), where, field))
            arrays.append(arr)
            pt = usage.get("prompt_tokens") if len(choices) == 1 else None
            prompts.append(None if pt is None else
                           as_int(pt, where, "usage.prompt_tokens", lo=0))
    return from_routed_experts(arrays, num_experts=num_experts, moe_layer_ids=moe_layer_ids,
                               prompt_tokens=prompts if any(x is not None for x in prompts)
                               else None, source=str(p), model=model or next(iter(names), ""))

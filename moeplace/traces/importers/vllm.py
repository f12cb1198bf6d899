"""Import vLLM ``routed_experts``: numpy arrays or base64 ``.npy`` inside OpenAI-style responses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeplace.errors import InputError
from moeplace.traces.importers._common import (
    b64decode,
    drop_dense_layers,
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
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InputError(source, "routed_experts", f"requests disagree on [layers, top_k]: "
                         f"{sorted(shapes)}", "import responses of one model only")
    for a in arrays:
        if a.ndim != 3:
            raise InputError(source, "routed_experts", f"shape {a.shape} is not "
                             "[tokens, num_hidden_layers, top_k]", "pass the array unmodified")
        if a.dtype.kind not in "iu":
            raise InputError(source, "routed_experts", f"dtype {a.dtype} is not an integer type",
                             "pass the array unmodified")
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
    if num_experts is None:
        num_experts = int(experts.max()) + 1
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
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(p, "file", f"not a .npy array ({exc})", "save with numpy.save") from None
        return from_routed_experts([arr], num_experts=num_experts, moe_layer_ids=moe_layer_ids,
                                   source=str(p), model=model)
    arrays: list[np.ndarray] = []
    prompts: list[int | None] = []
    for where, obj in iter_json_records(p):
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise InputError(where, "choices", "missing: not an OpenAI-style response",
                             "save the server's JSON responses unmodified")
        usage = obj.get("usage") or {}
        for i, ch in enumerate(choices):
            field = f"choices[{i}].routed_experts"
            if not isinstance(ch, dict) or "routed_experts" not in ch:
                raise InputError(where, field, "missing",
                                 "start vLLM with --enable-return-routed-experts")
            val = ch["routed_experts"]
            arr = (np.asarray(val) if isinstance(val, list)
                   else npy_from_bytes(b64decode(val, where, field), where, field))
            arrays.append(arr)
            pt = usage.get("prompt_tokens") if len(choices) == 1 else None
            prompts.append(int(pt) if pt is not None else None)
    model = model or next((o.get("model", "") for _, o in iter_json_records(p)), "")
    return from_routed_experts(arrays, num_experts=num_experts, moe_layer_ids=moe_layer_ids,
                               prompt_tokens=prompts if any(x is not None for x in prompts)
                               else None, source=str(p), model=model)

"""TensorRT-LLM expert statistics (``EXPERT_STATISTIC_PATH``) as ``RoutingStats``.

With ``EXPERT_STATISTIC_PATH=DIR`` and ``EXPERT_STATISTIC_ITER_RANGE=a-b`` each EP rank writes
``DIR/rank<r>.safetensors``: one tensor ``[num_experts]`` of routed-token counts per key
``"<iter>_<layer>"`` (layer = hidden-layer id), optionally ``DIR/cooccurrence_rank<r>.safetensors``
with ``[num_experts, num_experts]`` within-layer co-occurrence under the same keys, and
``DIR/meta_info.json`` with ``num_experts`` and ``num_experts_per_token``. Ranks' tensors add up.

The safetensors files are parsed here (8-byte header length, JSON header, raw little-endian
data) without torch; every header is validated and the arrays' memory is checked before reading.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._limits import check_memory
from moeplace._validate import loads_json, read_json
from moeplace.errors import InputError
from moeplace.traces.stats import RoutingStats
from moeplace.traces.trace import TraceMeta

_DTYPES = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "I32": "<i4", "I64": "<i8",
           "F16": "<f2", "F32": "<f4", "F64": "<f8"}
MAX_HEADER = 100 << 20
_KEY = re.compile(r"^(\d+)_(\d+)$")


def is_trtllm_dir(p: Path) -> bool:
    """A directory holding ``meta_info.json`` and ``rank*.safetensors``."""
    return p.is_dir() and (p / "meta_info.json").is_file() and any(p.glob("rank*.safetensors"))


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """``(tensors, data_start, file_size)`` of a safetensors file, validated."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(path, "header", "file shorter than 8 bytes",
                             "pass the rank files TensorRT-LLM wrote")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(path, "header", f"declares a {n}-byte header in a {size}-byte file",
                             "pass the rank files TensorRT-LLM wrote, unmodified")
        head = loads_json(fh.read(n), path, "header", "pass the file unmodified")
    if not isinstance(head, dict):
        raise InputError(path, "header", "not a JSON object", "pass the file unmodified")
    head.pop("__metadata__", None)
    return head, 8 + n, size


def _read_file(path: Path, num_experts: int, want_ndim: int,
               out: dict[tuple[int, int], np.ndarray]) -> None:
    """Add every ``"<iter>_<layer>"`` tensor of one rank file into ``out``."""
    head, start, size = _header(path)
    N = num_experts
    shape_want = [N] * want_ndim
    check_memory(len(head) * N ** want_ndim * 8, "expert statistics", path, "header")
    with open(path, "rb") as fh:
        for key, info in head.items():
            m = _KEY.match(key)
            if not m or not isinstance(info, dict):
                raise InputError(path, key, "not an '<iter>_<layer>' tensor",
                                 "pass the statistics TensorRT-LLM wrote")
            dt = _DTYPES.get(info.get("dtype"))
            shape = info.get("shape")
            offs = info.get("data_offsets")
            if dt is None:
                raise InputError(path, key, f"dtype {info.get('dtype')!r} is not a count type",
                                 "pass the statistics TensorRT-LLM wrote")
            if shape != shape_want:
                raise InputError(path, key, f"shape {shape} is not {shape_want} "
                                 f"(num_experts={N} in meta_info.json)",
                                 "check meta_info.json against the rank files")
            nbytes = np.dtype(dt).itemsize * N ** want_ndim
            if (not isinstance(offs, list) or len(offs) != 2 or not all(
                    isinstance(o, int) for o in offs) or offs[1] - offs[0] != nbytes
                    or offs[0] < 0 or start + offs[1] > size):
                raise InputError(path, key, f"data_offsets {offs} do not hold {shape} {dt}",
                                 "the file is truncated or corrupt")
            fh.seek(start + offs[0])
            arr = np.frombuffer(fh.read(nbytes), dtype=dt).reshape(shape)
            if not np.isfinite(arr).all() or (arr < 0).any():
                raise InputError(path, key, "negative or non-finite counts",
                                 "pass the statistics TensorRT-LLM wrote")
            k = (int(m.group(1)), int(m.group(2)))
            acc = out.get(k)
            out[k] = arr.astype(np.float64) if acc is None else acc + arr


def read_trtllm_stats(path: str | os.PathLike[str], *, model: str = "") -> RoutingStats:
    """Sum a TensorRT-LLM statistics directory over ranks and iterations into ``RoutingStats``:
    ``load [L, N]`` per hidden-layer id (sorted), and ``coactivation [L, N, N]`` when the
    co-occurrence files exist (its diagonal set to the load, moeplace's convention)."""
    p = Path(path)
    if not is_trtllm_dir(p):
        raise InputError(p, "path", "not a TensorRT-LLM statistics directory (meta_info.json "
                         "and rank<r>.safetensors)", "pass the EXPERT_STATISTIC_PATH directory")
    meta = read_json(p / "meta_info.json", "file", "pass the directory TensorRT-LLM wrote")
    if not isinstance(meta, dict):
        raise InputError(p / "meta_info.json", "file", "not a JSON object", "pass it unmodified")
    N, k = meta.get("num_experts"), meta.get("num_experts_per_token")
    for name, v in (("num_experts", N), ("num_experts_per_token", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(p / "meta_info.json", name, f"{v!r} is not a positive integer",
                             "pass the meta_info.json TensorRT-LLM wrote")
    if k > N:
        raise InputError(p / "meta_info.json", "num_experts_per_token", f"{k} > {N} experts",
                         "pass the meta_info.json TensorRT-LLM wrote")

    def rank_files(prefix: str) -> list[Path]:
        return sorted(f for f in p.glob(f"{prefix}*.safetensors")
                      if re.fullmatch(rf"{prefix}\d+\.safetensors", f.name))

    counts: dict[tuple[int, int], np.ndarray] = {}
    ranks = rank_files("rank")
    for f in ranks:
        _read_file(f, N, 1, counts)
    if not counts:
        raise InputError(p, "rank*.safetensors", "no statistics tensors",
                         "set EXPERT_STATISTIC_ITER_RANGE so TensorRT-LLM records some")
    iters = sorted({i for i, _ in counts})
    layers = sorted({l for _, l in counts})
    missing = [(i, l) for i in iters for l in layers if (i, l) not in counts]
    if missing:
        raise InputError(p, f"{missing[0][0]}_{missing[0][1]}", "iteration/layer tensor missing "
                         f"({len(missing)} of {len(iters) * len(layers)})",
                         "pass every rank file of one run")
    load = np.stack([sum(counts[(i, l)] for i in iters) for l in layers])
    if (load != np.round(load)).any():
        raise InputError(p, "rank*.safetensors", "counts are not whole numbers",
                         "pass the statistics TensorRT-LLM wrote")
    load = load.astype(np.int64)
    co = None
    co_files = rank_files("cooccurrence_rank")
    if co_files:
        pairs: dict[tuple[int, int], np.ndarray] = {}
        for f in co_files:
            _read_file(f, N, 2, pairs)
        check_memory(len(layers) * N * N * 8, "co-activation counts", p, "cooccurrence")
        co = np.zeros((len(layers), N, N), np.int64)
        for j, l in enumerate(layers):
            for i in iters:
                if (i, l) in pairs:
                    co[j] += np.round(pairs[(i, l)]).astype(np.int64)
            co[j][np.diag_indices(N)] = load[j]
    tokens = int(round(load[0].sum() / k))
    tm = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(layers), model=model,
                   source=str(p), extra={"trtllm": {"iterations": [iters[0], iters[-1]],
                                                    "ep_size": len(ranks)}})
    return RoutingStats(meta=tm, num_tokens=tokens, load=load, coactivation=co)


__all__ = ["is_trtllm_dir", "read_trtllm_stats"]

"""Turn routing data written by other tools into moeplace traces or statistics, by format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moeplace._validate import NpzMembers, loads_json
from moeplace.errors import InputError
from moeplace.traces.importers.megatron import read_megatron
from moeplace.traces.importers.npz import read_npz_trace
from moeplace.traces.importers.sglang import read_sglang_dump, read_sglang_requests
from moeplace.traces.importers.trtllm import is_trtllm_dir, read_trtllm_stats
from moeplace.traces.importers.vllm import from_routed_experts, read_vllm
from moeplace.traces.stats import RoutingStats
from moeplace.traces.store import TraceReader
from moeplace.traces.trace import Trace

FORMATS = ("auto", "parquet", "npz", "vllm", "sglang", "sglang-dump", "megatron", "trtllm")

__all__ = [
    "FORMATS",
    "detect_format",
    "from_routed_experts",
    "import_trace",
    "load_routing",
    "read_megatron",
    "read_npz_trace",
    "read_sglang_dump",
    "read_sglang_requests",
    "read_trtllm_stats",
    "read_vllm",
]


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the format from the extension and, for JSON, the first record's keys."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "path", "no such file or directory", "check the path")
    if p.is_dir():
        if any(p.glob("router_trace_rank*.jsonl")):
            return "megatron"
        if is_trtllm_dir(p):
            return "trtllm"
        return "parquet"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".npz":
        return "npz"
    if suffix == ".npy":
        return "vllm"
    if suffix == ".pt":
        return "sglang-dump"
    if suffix in (".json", ".jsonl"):
        with open(p, errors="replace") as fh:
            head = fh.read(1 << 16)
        first = head.lstrip()[:1]
        obj: Any = _try_json(head.splitlines()[0], p) if head.strip() else None
        if obj is None and first in "[{":
            obj = _try_json(p.read_bytes(), p)
        if isinstance(obj, list) and obj:
            obj = obj[0]
        if isinstance(obj, dict):
            if "top_indices" in obj:
                return "megatron"
            if "choices" in obj:
                return "vllm"
            if "meta_info" in obj:
                return "sglang"
        raise InputError(p, "format", "cannot tell vLLM, SGLang or Megatron JSON apart",
                         "pass --format")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1":
        return "parquet"
    raise InputError(p, "format", f"unknown file type {suffix or '(no extension)'!r}",
                     "pass --format (" + ", ".join(FORMATS[1:]) + ")")


def _try_json(raw: str | bytes, source: Path) -> Any:
    """Parsed JSON, or None when it is not (yet) valid; too deep a nesting is an error."""
    try:
        return loads_json(raw, source)
    except InputError as exc:
        if "nested too deeply" in exc.problem:
            raise
        return None


def import_trace(path: str | os.PathLike[str], fmt: str = "auto", **options: Any) -> Trace:
    """Read any supported per-token routing source into a ``Trace``.

    ``options`` go to the format's reader (``num_experts``, ``moe_layer_ids``, ``top_k``,
    ``num_hidden_layers``, ``missing_id`` (npz), ``model``); options a reader does not take are ignored.
    """
    result = load_routing(path, fmt, **options)
    if isinstance(result, RoutingStats):
        raise InputError(path, "format", "holds aggregated counts, not per-token routing",
                         "use it where statistics are accepted (solve), not as a trace")
    return result


def load_routing(path: str | os.PathLike[str], fmt: str = "auto", **options: Any
                 ) -> Trace | RoutingStats:
    """Read a routing source; aggregate-only sources (stat dumps, count files) give statistics."""
    if fmt not in FORMATS:
        raise InputError(path, "format", f"unknown format {fmt!r}", f"use one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    opts = {k: v for k, v in options.items() if v is not None}

    def pick(*names: str) -> dict[str, Any]:
        return {k: opts[k] for k in names if k in opts}

    if fmt == "parquet":
        return TraceReader(path).read()
    if fmt == "npz":
        with NpzMembers(path) as z:
            files = set(z.files)
        if "experts" not in files and ({"load", "counts", "header"} & files):
            from moeplace.traces.counts import read_counts_npz

            return read_counts_npz(path, **pick("model"))
        return read_npz_trace(path, **pick("num_experts", "missing_id", "model"))
    if fmt == "vllm":
        return read_vllm(path, **pick("num_experts", "moe_layer_ids", "model"))
    if fmt == "sglang":
        return read_sglang_requests(path, **pick("num_experts", "moe_layer_ids", "model", "top_k",
                                                 "num_hidden_layers"))
    if fmt == "sglang-dump":
        return read_sglang_dump(path, **pick("num_experts", "moe_layer_ids", "model"))
    if fmt == "trtllm":
        return read_trtllm_stats(path, **pick("model"))
    return read_megatron(path, **pick("num_experts", "model"))

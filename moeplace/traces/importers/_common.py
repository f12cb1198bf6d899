"""Helpers the importers share: decoding base64 arrays, dropping dense layers, reading JSON records."""

from __future__ import annotations

import base64
import binascii
import io
import os
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._limits import check_memory
from moeplace._validate import MAX_EXPERTS, as_int, loads_json
from moeplace.errors import InputError, MissingDependencyError


def iter_json_records(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, object)`` from a JSON file (object or list) or a JSONL file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(p, "file", f"cannot read ({exc.strerror or exc})",
                         "check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(p, "file", f"not UTF-8 text (bad byte at offset {exc.start})",
                         "save the responses as UTF-8 JSON") from None
    del raw
    stripped = text.lstrip()
    if not stripped:
        raise InputError(p, "file", "file is empty", "give a file with at least one record")
    if p.suffix != ".jsonl" and stripped[0] in "[{":
        try:
            obj = loads_json(text, p)
        except InputError as exc:
            # A whole-file parse that fails may still be JSONL; one too deep never is.
            if "nested too deeply" in exc.problem:
                raise
            obj = None
        if obj is not None:
            items = obj if isinstance(obj, list) else [obj]
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise InputError(p, f"[{i}]", "record is not a JSON object",
                                     "give a list of response objects")
                yield f"{p}[{i}]", item
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = loads_json(line, f"{p}:{lineno}", "line", "one JSON object per line")
        if not isinstance(item, dict):
            raise InputError(f"{p}:{lineno}", "line", "not a JSON object",
                             "one JSON object per line")
        yield f"{p}:{lineno}", item


def b64decode(value: Any, source: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(source, field, f"expected a base64 string, got {type(value).__name__}",
                         "enable routed-expert return in the server")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(source, field, "not valid base64", "pass the field unmodified") from None


def _npy_header(fh: Any, available: int) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, refused when the data cannot be all there."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _f, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _f, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > available - fh.tell():
        raise ValueError(f"header declares {nbytes} bytes of data, "
                         f"{available - fh.tell()} present")
    return shape, dtype


def npy_from_bytes(raw: bytes | None, source: str, field: str,
                   path: Path | None = None) -> np.ndarray:
    """A ``.npy`` payload (bytes, or the file ``path``) as an array, its header checked against
    the bytes present first: numpy allocates the declared shape before reading the data."""
    try:
        if path is not None:
            with open(path, "rb") as fh:
                shape, dtype = _npy_header(fh, path.stat().st_size)
        else:
            assert raw is not None
            shape, dtype = _npy_header(io.BytesIO(raw), len(raw))
        check_memory(int(np.prod(shape, dtype=object)) * dtype.itemsize,
                     f"array of shape {shape}", source, field)
        return np.load(path if path is not None else io.BytesIO(raw), allow_pickle=False)
    except OSError as exc:
        raise InputError(source, field, f"cannot read ({exc.strerror or exc})",
                         "check the path") from None
    except (ValueError, EOFError, SyntaxError, RecursionError, tokenize.TokenError) as exc:
        raise InputError(source, field, f"not .npy bytes ({str(exc)[:120]})",
                         "pass the data unmodified") from None


def drop_dense_layers(experts: np.ndarray, moe_layer_ids: list[int] | None, source: object
                      ) -> tuple[np.ndarray, list[int]]:
    """Keep the MoE layers of an all-hidden-layers array ``[T, H, k]``.

    Without explicit ids, a dense layer is one whose every entry is 0 (vLLM) or -1 (SGLang): a
    real MoE layer with k >= 2 never repeats an expert, so cannot be all zeros.
    """
    H = experts.shape[1]
    if moe_layer_ids is None:
        flat = experts.reshape(experts.shape[0], H, -1)
        dense = np.all((flat == 0) | (flat == -1), axis=(0, 2))
        if experts.shape[2] == 1:
            dense = np.all(flat == -1, axis=(0, 2))
        moe_layer_ids = [h for h in range(H) if not dense[h]]
    if len(set(moe_layer_ids)) != len(moe_layer_ids):
        raise InputError(source, "moe_layer_ids", "a layer is named twice",
                         "name each MoE layer once")
    bad = [h for h in moe_layer_ids if not 0 <= h < H]
    if bad:
        raise InputError(source, "moe_layer_ids", f"layer {bad[0]} outside 0..{H - 1}",
                         "give hidden-layer indices of the MoE layers")
    if not moe_layer_ids:
        raise InputError(source, "routed_experts", "every layer is empty (all dense)",
                         "check that routed-expert capture was enabled")
    return experts[:, moe_layer_ids], list(moe_layer_ids)


def infer_num_experts(experts: np.ndarray, source: object, field: str = "experts",
                      given: int | None = None) -> int:
    """``given`` (checked), else ``largest id + 1``, refusing ids no real model has."""
    if given is not None:
        return as_int(given, "--num-experts", "value", lo=1, hi=MAX_EXPERTS)
    hi = int(experts.max())
    if hi >= MAX_EXPERTS:
        raise InputError(source, field, f"expert id {hi} is implausibly large "
                         f"(over {MAX_EXPERTS - 1})", "check the file, or pass --num-experts")
    return max(hi, 0) + 1


def torch_load(path: str | os.PathLike[str]) -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", f"reading {Path(path).name} (.pt)", "torch") from None
    try:
        # weights_only: plain tensors and containers only, never arbitrary pickled code. Its
        # warnings (pickle protocol, ...) would add lines to the one-line error contract.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, "file", f"not a readable torch file ({first[:200]})",
                         "pass the dump file unmodified") from None


def to_numpy(x: Any) -> np.ndarray:
    """Tensor, list or array to numpy without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)

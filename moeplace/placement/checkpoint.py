"""Rewrite a safetensors checkpoint directory so its default contiguous expert-parallel
sharding realises a placement (and undo that rewrite), streaming tensor by tensor.

Works on the safetensors bytes themselves: a tensor whose first axis is the expert axis has
its rows (equal-sized byte blocks) written in the new order, and a per-expert tensor
(``experts.{e}.w1``) keeps its bytes where they are under its new expert index, so no tensor
moves between shard files and any dtype (bf16, fp8, ...) is handled without torch. Peak memory
is one 64 MiB read; the output appears only when complete (temporary directory, then rename).
A sidecar, ``moeplace-permutation.json``, records the permutation so ``invert`` restores the
original bytes exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._fileio import atomic_path
from moeplace.errors import InputError
from moeplace.placement.permute import _AXIS0, _BLOCK, _PER_EXPERT, layer_permutations
from moeplace.placement.placement import Placement

SIDECAR = "moeplace-permutation.json"
INDEX = "model.safetensors.index.json"
_ROUTER = re.compile(_BLOCK + r"\.(?:gate|router)\.weight$")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict in file order, byte offset where the data starts)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, "header", f"not a safetensors file ({exc})",
                         "pass a checkpoint written by save_pretrained") from None
    return header, 8 + n


def _shards(ckpt: Path) -> list[Path]:
    index = ckpt / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise InputError(index, "weight_map", "missing or malformed",
                             "re-save the checkpoint with save_pretrained") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise InputError(index, "weight_map", f"names {missing[0]}, which is not there",
                             "copy every shard of the checkpoint")
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin weights: re-save with safe_serialization=True)" if any(
            ckpt.glob("*.bin")) else ""
        raise InputError(ckpt, "*.safetensors", "no safetensors weights found" + hint,
                         "pass a directory written by save_pretrained")
    return files


def _group_limits(ckpt: Path) -> tuple[int, int]:
    """(n_group, topk_group) from config.json; (1, 1) when routing is not group-limited."""
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return 1, 1
    n = int(cfg.get("n_group") or 1)
    k = int(cfg.get("topk_group") or n)
    return n, k


def check_groups(perms: dict[int, np.ndarray], n_group: int, source: object) -> None:
    """Refuse a permutation that splits an expert group (group-limited routing would change)."""
    for h, perm in perms.items():
        size = len(perm) // n_group
        groups = perm.reshape(n_group, size) // size
        bad = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
        if bad.size:
            j = int(bad[0])
            raise InputError(source, "phy2log", f"layer {h}: new expert slots {j * size}.."
                             f"{(j + 1) * size - 1} mix experts of groups "
                             f"{sorted(set(groups[j].tolist()))}; with group-limited routing "
                             f"(n_group={n_group}) that changes the model",
                             "solve with --respect-groups to move whole groups only")


def _layout(headers: dict[Path, tuple[dict[str, Any], int]]
            ) -> tuple[dict[int, int], dict[str, Path]]:
    """({hidden layer: experts} from the router rows, {tensor name: shard})."""
    where: dict[str, Path] = {}
    layers: dict[int, int] = {}
    for p, (header, _) in headers.items():
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            where[name] = p
            m = _ROUTER.match(name)
            if m:
                layers[int(m["layer"])] = int(entry["shape"][0])
    return layers, where


def _check_experts(where: dict[str, Path], perms: dict[int, np.ndarray], N: int,
                   ckpt: Path) -> None:
    """Every permuted layer has its expert tensors, all N of each per-expert kind."""
    fused: set[int] = set()
    per: dict[tuple[int, str, str], set[int]] = {}
    for name in where:
        m = _AXIS0.match(name)
        if m and ".experts." in name:
            fused.add(int(m["layer"]))
            continue
        m = _PER_EXPERT.match(name)
        if m and int(m["layer"]) in perms:
            per.setdefault((int(m["layer"]), m["block"], m["rest"]), set()).add(int(m["expert"]))
    for (_, block, rest), got in per.items():
        missing = sorted(set(range(N)) - got)
        if missing or max(got) >= N:
            e = missing[0] if missing else max(got)
            raise InputError(ckpt, f"{block}.experts.{e}.{rest}",
                             "missing" if missing else f"expert {e} >= {N} experts",
                             "the checkpoint is incomplete or of another model")
    for h in perms:
        if h not in fused and not any(k[0] == h for k in per):
            raise InputError(ckpt, f"layers.{h}", "no expert tensors for this MoE layer",
                             "the checkpoint is incomplete or of another model")


def _rewrite_shard(src: Path, dst: Path, header: dict[str, Any], start: int,
                   perms: dict[int, np.ndarray], N: int) -> dict[str, str]:
    """Write one permuted shard (its parsed header; data from byte ``start``); returns
    {new name: old name} of renamed tensors."""
    renamed: dict[str, str] = {}
    new_header: dict[str, Any] = {}
    for name, entry in header.items():
        m = _PER_EXPERT.match(name) if name != "__metadata__" else None
        if m and int(m["layer"]) in perms:
            # perm[i] = old expert now at index i, so old expert e takes index inverse[e].
            new = int(np.argsort(perms[int(m["layer"])])[int(m["expert"])])
            target = f"{m['block']}.experts.{new}.{m['rest']}"
            renamed[target] = name
            new_header[target] = entry
        else:
            new_header[name] = entry
    # Each entry keeps its position under its new name (a shard's names can change when one
    # layer's experts span shards), so an inverse rewrite gives back the original header bytes.
    text = json.dumps(new_header, separators=(",", ":")).encode()
    # Pad with spaces as safetensors does: to the original length when that fits (so the data
    # stays where it was), else to keep the data 8-byte aligned.
    pad_to = start - 8 if len(text) <= start - 8 else -(-len(text) // 8) * 8
    text += b" " * (pad_to - len(text))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(text)))
        fout.write(text)
        fd = fin.fileno()
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n)
                       for n, e in header.items() if n != "__metadata__")
        for begin, end, name in spans:
            m = _AXIS0.match(name)
            if m and int(m["layer"]) in perms:
                shape = header[name]["shape"]
                if shape[0] != N:
                    raise InputError(src, name, f"expert axis {shape[0]} != {N} experts",
                                     "the placement is for another model")
                row = (end - begin) // N
                for old in perms[int(m["layer"])]:
                    _copy_range(fd, fout, start + begin + int(old) * row, row, src)
            else:
                _copy_range(fd, fout, start + begin, end - begin, src)
    return renamed


_CHUNK = 64 << 20  # bytes copied per read: bounds memory whatever the tensor size


def _copy_range(fd: int, fout: Any, offset: int, size: int, src: Path) -> None:
    """Copy ``size`` bytes at ``offset`` of ``fd`` to ``fout`` in bounded chunks (plain reads,
    not mmap, so resident memory stays at one chunk rather than growing with the file)."""
    while size > 0:
        data = os.pread(fd, min(size, _CHUNK), offset)
        if not data:
            raise InputError(src, "data", "shorter than its header says (truncated)",
                             "re-download or re-save the checkpoint")
        fout.write(data)
        offset += len(data)
        size -= len(data)


def rewrite_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                       placement: Placement | None = None, *, invert: bool = False,
                       moe_layer_ids: list[int] | None = None) -> Path:
    """Write ``out``: ``checkpoint`` with each MoE layer's experts in the placement's order.

    New expert index i of layer l holds old expert ``phy2log[l][i]``, so the contiguous split
    over G ranks gives rank g exactly the placement's experts for GPU g. A checkpoint that
    was already rewritten is re-permuted from its original order (the sidecar says which).
    MoE layers the placement does not name keep their expert order.
    ``invert=True`` (no placement) restores the original checkpoint from its sidecar.
    """
    ckpt, dst = Path(checkpoint), Path(out)
    if not ckpt.is_dir():
        raise InputError(ckpt, "--checkpoint", "not a directory", "pass a checkpoint directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(dst, "--out", "exists and is not empty",
                         "choose a new directory (nothing is overwritten)")
    if dst.resolve() == ckpt.resolve():
        raise InputError(dst, "--out", "is the checkpoint itself", "write to a new directory")
    shards = _shards(ckpt)
    headers = {p: _read_header(p) for p in shards}
    layers, where = _layout(headers)
    if not layers:
        raise InputError(ckpt, "router", "no MoE router weights (layers.N.mlp.gate.weight or "
                         "...router.weight) found", "is this a MoE checkpoint?")
    sidecar = ckpt / SIDECAR
    current = _load_sidecar(sidecar) if sidecar.is_file() else None
    if invert:
        if current is None:
            raise InputError(ckpt, SIDECAR, "missing: this checkpoint was not written by "
                             "moeplace apply", "pass the rewritten checkpoint to --invert")
        perms = {h: np.argsort(p) for h, p in current.items()}
        record: dict[str, Any] | None = None
    else:
        if placement is None:
            raise InputError("apply", "PLACEMENT", "no placement given", "pass PLACEMENT.json")
        ids = moe_layer_ids or (list(placement.moe_layer_ids) if placement.moe_layer_ids
                                else sorted(layers))
        # A placement may leave MoE layers out (DeepSeek-V3's multi-token-prediction layer is
        # never traced); those keep their order. Every layer it names must be a MoE layer.
        if (not set(ids) <= set(layers) or len(ids) != placement.num_layers
                or placement.num_experts != layers[min(layers)]):
            raise InputError(placement.source, "shape", f"placement is {placement.num_layers} "
                             f"layers x {placement.num_experts} experts (layers {ids}); the "
                             f"checkpoint has {len(layers)} MoE layers {sorted(layers)} x "
                             f"{layers[min(layers)]} experts", "solve for this model")
        target = layer_permutations(placement, ids)
        n_group, topk_group = _group_limits(ckpt)
        if n_group > 1 and topk_group < n_group:
            check_groups(target, n_group, placement.source)
        # Express the target relative to the layout the checkpoint has now.
        for h in current or {}:  # a layer permuted before but not named now: back to original
            target.setdefault(h, np.arange(len(current[h])))
        perms = {h: (np.argsort(current[h])[p] if current and h in current else p)
                 for h, p in target.items()}
        record = {"format": "moeplace.checkpoint-permutation", "version": 1,
                  "moe_layer_ids": sorted(target), "num_gpus": placement.num_gpus,
                  "perm": {str(h): target[h].tolist() for h in sorted(target)},
                  "placement": placement.to_dict()}
    N = layers[min(layers)]
    _check_experts(where, perms, N, ckpt)
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        renamed: dict[str, str] = {}
        for p in shards:
            renamed.update(_rewrite_shard(p, tmp / p.name, *headers[p], perms, N))
        _copy_others(ckpt, tmp, {p.name for p in shards})
        if (ckpt / INDEX).is_file():
            _rewrite_index(ckpt / INDEX, tmp / INDEX, renamed)
        if record is not None:
            (tmp / SIDECAR).write_text(json.dumps(record, indent=1))
    return dst


def _load_sidecar(path: Path) -> dict[int, np.ndarray]:
    try:
        d = json.loads(path.read_text())
        perms = {int(h): np.asarray(p, np.int64) for h, p in d["perm"].items()}
    except (ValueError, KeyError, TypeError):
        raise InputError(path, "perm", "missing or malformed",
                         "restore the sidecar written by moeplace apply") from None
    for h, p in perms.items():
        if sorted(p.tolist()) != list(range(len(p))):
            raise InputError(path, f"perm.{h}", "not a permutation", "restore the sidecar")
    return perms


def _copy_others(src: Path, dst: Path, skip: set[str]) -> None:
    """Config, tokenizer and every other file, except weights, index and an old sidecar."""
    for p in src.iterdir():
        if p.name in skip or p.name in (INDEX, SIDECAR):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def _rewrite_index(src: Path, dst: Path, renamed: dict[str, str]) -> None:
    d = json.loads(src.read_text())
    old = d["weight_map"]
    d["weight_map"] = {k: old[renamed.get(k, k)] for k in old}
    dst.write_text(json.dumps(d, indent=2))

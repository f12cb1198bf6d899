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
from moeplace._validate import (
    MAX_EXPERTS,
    as_int,
    as_int_list,
    loads_json,
    read_json,
    type_name,
)
from moeplace.errors import InputError
from moeplace.placement.permute import _AXIS0, _BLOCK, _PER_EXPERT, layer_permutations
from moeplace.placement.placement import Placement

SIDECAR = "moeplace-permutation.json"
INDEX = "model.safetensors.index.json"
_ROUTER = re.compile(_BLOCK + r"\.(?:gate|router)\.weight$")


# Bits per element of each safetensors dtype (the format's list, sub-byte floats included).
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
               "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
               "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100 << 20  # the safetensors reference implementation's limit


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict in file order, byte offset where the data starts), after checking it as the
    safetensors format requires: a JSON object of tensor entries, each with a known dtype, a
    shape of non-negative ints and ``data_offsets`` [begin, end] whose span is dtype x shape,
    the spans sorted, adjacent and covering the data exactly (no overlap, no hole, no byte
    outside the file)."""
    fix = "pass a checkpoint written by save_pretrained"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise InputError(path, "header", "shorter than the 8-byte header length", fix)
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or n > size - 8:
                raise InputError(path, "header", f"declares a {n}-byte header in a {size}-byte "
                                 "file", "the file is truncated or not safetensors")
            text = fh.read(n)
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc.strerror or exc})",
                         "check the checkpoint") from None
    header = loads_json(text, path, "header", fix)
    if not isinstance(header, dict):
        raise InputError(path, "header", f"a JSON {type_name(header)}, not an object", fix)
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                    isinstance(v, str) for v in entry.values()):
                raise InputError(path, "__metadata__", "is not an object of strings", fix)
            continue
        if not isinstance(entry, dict):
            raise InputError(path, name, f"a JSON {type_name(entry)}, not a tensor entry", fix)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise InputError(path, f"{name}.{key}", "missing", fix)
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
            raise InputError(path, f"{name}.dtype", f"{dtype!r:.40} is not a safetensors dtype",
                             fix)
        shape = as_int_list(entry["shape"], path, f"{name}.shape", lo=0, hi=1 << 62, max_len=64)
        offs = as_int_list(entry["data_offsets"], path, f"{name}.data_offsets", lo=0,
                           hi=1 << 62, max_len=2)
        if len(offs) != 2 or offs[0] > offs[1]:
            raise InputError(path, f"{name}.data_offsets", f"{offs} is not [begin, end] with "
                             "begin <= end", fix)
        bits = _DTYPE_BITS[dtype] * int(np.prod(shape, dtype=object))
        if bits % 8 or offs[1] - offs[0] != bits // 8:
            raise InputError(path, f"{name}.data_offsets", f"spans {offs[1] - offs[0]} bytes, "
                             f"but {dtype} {shape} needs {bits / 8:g}", fix)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise InputError(path, f"{name}.data_offsets", f"starts at {begin}, but the previous "
                             f"tensor ends at {pos} ({'overlap' if begin < pos else 'hole'})",
                             "the header is corrupt; re-save the checkpoint")
        pos = end
    if pos != data_size:
        raise InputError(path, "data_offsets", f"tensors cover {pos} bytes, the file holds "
                         f"{data_size} after the header",
                         "the file is truncated or corrupt; re-download or re-save it")
    return header, 8 + n


def _inside(ckpt: Path, name: object, source: Path) -> Path:
    """The shard ``name`` of an index, resolved and refused unless it stays inside ``ckpt``
    (no absolute path, no ``..``, no symlink leading out)."""
    if not isinstance(name, str) or not name:
        raise InputError(source, "weight_map", f"{name!r:.60} is not a file name",
                         "map tensor names to shard file names")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(source, "weight_map", f"{name!r:.80} points outside the checkpoint",
                         "shard names must be files inside the checkpoint directory")
    target = (ckpt / rel).resolve()
    root = ckpt.resolve()
    if root not in target.parents:
        raise InputError(source, "weight_map", f"{name!r:.80} resolves to {target}, outside the "
                         "checkpoint (a symlink leads out)",
                         "copy the real shard files into the directory (cp -L)")
    return ckpt / rel


def _shards(ckpt: Path) -> list[Path]:
    index = ckpt / INDEX
    if index.is_file():
        fix = "re-save the checkpoint with save_pretrained"
        d = read_json(index, "file", fix)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(index, "weight_map", "missing or not an object of names", fix)
        # Names relative to the checkpoint, so a relative --checkpoint is not prefixed twice.
        names = sorted({_inside(ckpt, v, index).relative_to(ckpt).as_posix()
                        for v in weight_map.values()})
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
    return [_inside(ckpt, f.name, ckpt) for f in files]


def _group_limits(ckpt: Path) -> tuple[int, int]:
    """(n_group, topk_group) from config.json; (1, 1) when routing is not group-limited or
    there is no config. A config that is there but malformed is refused, not ignored: it
    decides whether a placement may split expert groups."""
    path = ckpt / "config.json"
    if not path.is_file():
        return 1, 1
    cfg = read_json(path, "file", "restore the model's config.json", max_bytes=64 << 20)
    if not isinstance(cfg, dict):
        raise InputError(path, "file", f"a JSON {type_name(cfg)}, not an object",
                         "restore the model's config.json")
    n = cfg.get("n_group")
    n = 1 if n is None else as_int(n, path, "n_group", lo=1, hi=MAX_EXPERTS)
    k = cfg.get("topk_group")
    k = n if k is None else as_int(k, path, "topk_group", lo=1, hi=n,
                                   fix="topk_group must lie in 1..n_group")
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
                shape = entry["shape"]
                if len(shape) != 2 or shape[0] < 1:
                    raise InputError(p, f"{name}.shape", f"{shape} is not [experts, hidden]",
                                     "the checkpoint is corrupt or not a MoE model")
                layers[int(m["layer"])] = int(shape[0])
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
                if (end - begin) % N:
                    raise InputError(src, name, f"{end - begin} bytes do not split into {N} "
                                     "expert rows", "the checkpoint is corrupt")
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
    for h, perm in (current or {}).items():
        if layers.get(h) != len(perm):
            raise InputError(sidecar, f"perm.{h}", f"a permutation of {len(perm)} experts for "
                             f"layer {h}, which has {layers.get(h, 'no')} experts",
                             "the sidecar belongs to another checkpoint; restore the right one")
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
        if len(set(ids)) != len(ids):
            dup = next(h for i, h in enumerate(ids) if h in ids[:i])
            raise InputError("--moe-layers" if moe_layer_ids else placement.source,
                             "moe_layer_ids", f"layer {dup} is named twice",
                             "name each MoE layer once, in the placement's layer order")
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
        if layers[min(layers)] % n_group:
            raise InputError(ckpt / "config.json", "n_group", f"{n_group} groups do not divide "
                             f"{layers[min(layers)]} experts", "restore the model's config.json")
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
    for h, perm in perms.items():
        if h not in layers or layers[h] != N or len(perm) != N:
            raise InputError(sidecar if current and h in current else ckpt, f"layer {h}",
                             f"a permutation of {len(perm)} experts for a layer with "
                             f"{layers.get(h, 'no')} experts (others have {N})",
                             "the sidecar or placement is for another checkpoint")
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
    """{hidden layer: permutation} from the sidecar, every entry checked (a truncated or edited
    sidecar would otherwise scramble experts on --invert or a second apply)."""
    fix = "restore the sidecar written by moeplace apply"
    d = read_json(path, "file", fix, max_bytes=256 << 20)
    if not isinstance(d, dict):
        raise InputError(path, "file", f"a JSON {type_name(d)}, not an object", fix)
    if d.get("format", "moeplace.checkpoint-permutation") != "moeplace.checkpoint-permutation":
        raise InputError(path, "format", f"{d.get('format')!r:.60} is not a moeplace sidecar", fix)
    raw = d.get("perm")
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, "perm", "missing or not an object of permutations", fix)
    perms: dict[int, np.ndarray] = {}
    for key, val in raw.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) < 7):
            raise InputError(path, f"perm.{key:.20}", "key is not a layer number", fix)
        p = as_int_list(val, path, f"perm.{key}", lo=0, hi=MAX_EXPERTS, max_len=MAX_EXPERTS,
                        fix=fix)
        if sorted(p) != list(range(len(p))):
            raise InputError(path, f"perm.{key}", "not a permutation", fix)
        perms[int(key)] = np.asarray(p, np.int64)
    return perms


def _copy_others(src: Path, dst: Path, skip: set[str]) -> None:
    """Config, tokenizer and every other file, except weights, index and an old sidecar."""
    for p in src.iterdir():
        if p.name in skip or p.name in (INDEX, SIDECAR):
            continue
        if p.is_symlink():
            # Kept as a link, not followed: a link to a file outside the checkpoint (a Hub
            # cache blob, or something that should never be copied) is not read.
            os.symlink(os.readlink(p), dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True)
        elif p.is_file():
            shutil.copy2(p, dst / p.name)
        # anything else (a FIFO, a socket, a device) is not checkpoint content: skipped


def _rewrite_index(src: Path, dst: Path, renamed: dict[str, str]) -> None:
    d = json.loads(src.read_text())
    old = d["weight_map"]
    d["weight_map"] = {k: old[renamed.get(k, k)] for k in old}
    dst.write_text(json.dumps(d, indent=2))

"""The Placement type: per-layer ``phy2log`` slot maps on a GPU/node cluster, validated, saved as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._fileio import atomic_path
from moeplace._limits import check_memory
from moeplace._validate import (
    MAX_EXPERTS,
    MAX_GPUS,
    MAX_LAYERS,
    as_int,
    as_int_list,
    int_array,
    read_json,
    type_name,
)
from moeplace.errors import InfeasibleError, InputError

FORMAT = "moeplace.placement"
VERSION = 1


@dataclass
class Placement:
    """Where every expert copy lives: ``phy2log[l, slot]`` = logical expert in that slot.

    Slots are GPU-major and contiguous (DeepSeek EPLB, vLLM, SGLang): with ``S`` slots per GPU,
    slot p is on GPU ``p // S``; GPU g is on node ``g // (num_gpus // num_nodes)``.
    ``moe_layer_ids`` maps the layer axis to hidden layers when known. ``colocated`` allows two
    copies of one expert on one GPU, as DeepSeek's EPLB produces and vLLM and SGLang load (a
    token uses one copy, so such copies split their GPU's share); moeplace's own solvers never
    produce it.
    """

    phy2log: np.ndarray
    num_gpus: int
    num_nodes: int = 1
    num_experts: int | None = None
    moe_layer_ids: tuple[int, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    source: str = "placement"
    colocated: bool = False

    def __post_init__(self) -> None:
        p = np.asarray(self.phy2log)
        src = self.source
        if p.dtype.kind not in "iu":
            raise InputError(src, "phy2log", f"dtype {p.dtype} is not integer",
                             "slots hold integer expert ids")
        if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
            raise InputError(src, "phy2log", f"shape {p.shape} is not [layers, slots]",
                             "give one non-empty slot list per layer")
        self.phy2log = p.astype(np.int64)
        if self.num_experts is None:
            self.num_experts = int(self.phy2log.max()) + 1
        self.num_gpus, self.num_nodes = int(self.num_gpus), int(self.num_nodes)
        if self.moe_layer_ids is not None:
            self.moe_layer_ids = tuple(int(x) for x in self.moe_layer_ids)
        self.validate()

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_replicas(self) -> int:
        """Redundant copies per layer (slots beyond one per expert)."""
        return self.num_slots - int(self.num_experts)  # type: ignore[arg-type]

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def validate(self) -> None:
        """Raise ``InputError`` unless every expert is placed, GPUs hold equal slots, and (unless
        ``colocated``) no GPU holds two copies of one expert."""
        src, G, M = self.source, self.num_gpus, self.num_nodes
        N = int(self.num_experts)  # type: ignore[arg-type]
        L, P = self.phy2log.shape
        if G < 1 or M < 1 or G % M:
            raise InputError(src, "num_nodes", f"{G} GPUs do not split evenly into {M} nodes",
                             "use a node count that divides the GPU count")
        if P % G:
            raise InputError(src, "phy2log", f"{P} slots per layer do not split evenly over "
                             f"{G} GPUs", "every GPU must hold the same number of slots")
        if P < N:
            raise InputError(src, "phy2log", f"{P} slots cannot hold {N} experts",
                             "give at least one slot per expert")
        lo, hi = int(self.phy2log.min()), int(self.phy2log.max())
        if lo < 0 or hi >= N:
            raise InputError(src, "phy2log", f"expert id {lo if lo < 0 else hi} outside 0..{N - 1}",
                             "slots hold logical expert ids")
        counts = self.logcnt()
        missing = np.argwhere(counts == 0)
        if missing.size:
            l, e = missing[0]
            raise InputError(src, "phy2log", f"layer {l} places no copy of expert {e}",
                             "every expert needs at least one slot")
        S = P // G
        per_gpu = self.phy2log.reshape(L, G, S)
        srt = np.sort(per_gpu, axis=2)
        dup = np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)) if S > 1 else []
        if len(dup) and not self.colocated:
            l, g = dup[0]
            raise InputError(src, "phy2log", f"layer {l}: GPU {g} holds two copies of one expert",
                             "put replicas of an expert on distinct GPUs (or set "
                             '"colocated_copies": true for a DeepSeek EPLB layout)')
        if self.moe_layer_ids is not None and len(self.moe_layer_ids) != L:
            raise InputError(src, "moe_layer_ids", f"{len(self.moe_layer_ids)} ids for {L} layers",
                             "give one hidden-layer id per MoE layer")

    # ---- derived maps ------------------------------------------------------------------------
    def logcnt(self) -> np.ndarray:
        """``[L, N]`` number of copies of each expert."""
        L = self.num_layers
        N = int(self.num_experts)  # type: ignore[arg-type]
        flat = (self.phy2log + (np.arange(L) * N)[:, None]).ravel()
        return np.bincount(flat, minlength=L * N).reshape(L, N)

    def log2phy(self) -> np.ndarray:
        """``[L, N, max_copies]`` slot ids of each expert, padded with -1 (EPLB convention)."""
        L, P = self.phy2log.shape
        N = int(self.num_experts)  # type: ignore[arg-type]
        cnt = self.logcnt()
        out = np.full((L, N, int(cnt.max())), -1, np.int64)
        order = np.argsort(self.phy2log, axis=1, kind="stable")
        for l in range(L):
            e_sorted = self.phy2log[l, order[l]]
            rank = np.arange(P) - np.searchsorted(e_sorted, e_sorted)
            out[l, e_sorted, rank] = order[l]
        return out

    def slot_gpu(self) -> np.ndarray:
        """``[P]`` GPU of each slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def expert_gpu(self) -> np.ndarray:
        """``[L, N]`` GPU of each expert; only for placements without replicas."""
        if self.num_replicas:
            raise InputError(self.source, "phy2log", "has replicas: an expert has several GPUs",
                             "use incidence() for replicated placements")
        L, N = self.num_layers, int(self.num_experts)  # type: ignore[arg-type]
        out = np.empty((L, N), np.int64)
        out[np.arange(L)[:, None], self.phy2log] = self.slot_gpu()[None, :]
        return out

    def incidence(self) -> np.ndarray:
        """``[L, N, G]`` boolean: GPU g holds a copy of expert e at layer l."""
        L, N, G = self.num_layers, int(self.num_experts), self.num_gpus  # type: ignore[arg-type]
        inc = np.zeros((L, N, G), bool)
        inc[np.arange(L)[:, None], self.phy2log, self.slot_gpu()[None, :]] = True
        return inc

    def gpu_experts(self, layer: int) -> list[list[int]]:
        """Logical experts held by each GPU at one layer, in local slot order."""
        S = self.slots_per_gpu
        return [self.phy2log[layer, g * S:(g + 1) * S].tolist() for g in range(self.num_gpus)]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Placement) and self.num_gpus == other.num_gpus
                and self.num_nodes == other.num_nodes and self.num_experts == other.num_experts
                and self.phy2log.shape == other.phy2log.shape
                and bool((self.phy2log == other.phy2log).all())
                and self.moe_layer_ids == other.moe_layer_ids)

    __hash__ = None  # type: ignore[assignment]

    # ---- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "num_layers": self.num_layers,
            "num_experts": int(self.num_experts),  # type: ignore[arg-type]
            "num_replicas": self.num_replicas,
            "slots_per_gpu": self.slots_per_gpu,
            "phy2log": self.phy2log.tolist(),
        }
        if self.moe_layer_ids is not None:
            d["moe_layer_ids"] = list(self.moe_layer_ids)
        if self.colocated:
            d["colocated_copies"] = True
        if self.info:
            d["info"] = self.info
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write versioned JSON atomically."""
        text = json.dumps(self.to_dict(), separators=(",", ":"), default=_json_default)
        with atomic_path(path) as tmp:
            tmp.write_text(text + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: Any, source: str = "placement") -> Placement:
        """Build from a parsed placement JSON, checking each field's type and range first."""
        fix = "save with moeplace solve --out / Placement.save"
        if not isinstance(d, dict):
            raise InputError(source, "file", f"a JSON {type_name(d)}, not an object", fix)
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise InputError(source, "format", f"{fmt!r:.60} is not {FORMAT!r}",
                             "convert it with moeplace export/import")
        version = as_int(d.get("version", 1), source, "version", lo=1, fix=fix)
        if version > VERSION:
            raise InputError(source, "version", f"{version} is newer than {VERSION}",
                             "upgrade moeplace")
        for key in ("num_gpus", "phy2log"):
            if key not in d:
                raise InputError(source, key, "missing", fix)
        G = as_int(d["num_gpus"], source, "num_gpus", lo=1, hi=MAX_GPUS)
        M = as_int(d.get("num_nodes", 1), source, "num_nodes", lo=1, hi=G,
                   fix="num_nodes must lie in 1..num_gpus")
        if G % M:
            raise InputError(source, "num_nodes", f"{G} GPUs do not split evenly into {M} nodes",
                             "use a node count that divides the GPU count")
        rows = d["phy2log"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise InputError(source, "phy2log", "is not a non-empty list of lists of expert ids",
                             "give one slot list per layer")
        if len({len(r) for r in rows}) != 1:
            raise InputError(source, "phy2log", "rows have different lengths",
                             "give the same slot count for every layer")
        check_memory(8 * len(rows) * len(rows[0]), f"phy2log of {len(rows)} x {len(rows[0])}",
                     source, "phy2log")
        for i, r in enumerate(rows):
            bad = [v for v in r if isinstance(v, bool) or not isinstance(v, int)][:1]
            if bad:
                bad = bad[0]
                raise InputError(source, f"phy2log[{i}]", f"{bad!r:.40} ({type_name(bad)}) is "
                                 "not an expert id", "slots hold integer expert ids")
        phy = int_array(rows, source, "phy2log")
        if phy.ndim != 2:
            raise InputError(source, "phy2log", f"shape {phy.shape} is not [layers, slots]",
                             "give one slot list per layer")
        L, P = phy.shape
        N = d.get("num_experts")
        if N is not None:
            N = as_int(N, source, "num_experts", lo=1, hi=min(P, MAX_EXPERTS),
                       fix="num_experts must lie in 1..slots per layer")
        for key, val in (("num_layers", L), ("slots_per_gpu", P // G if P % G == 0 else None),
                         ("num_replicas", P - N if N is not None else None)):
            if key in d:
                got = as_int(d[key], source, key, lo=0)
                if val is None or got != val:
                    raise InputError(source, key, f"says {got}, but phy2log has {L} layers x {P}"
                                     f" slots on {G} GPUs" + (" (a GPU is over- or "
                                     "under-filled)" if key == "slots_per_gpu" else ""),
                                     "make the declared sizes match phy2log")
        ids = d.get("moe_layer_ids")
        if ids is not None:
            ids = as_int_list(ids, source, "moe_layer_ids", lo=0, hi=MAX_LAYERS, distinct=True,
                              fix="list each MoE layer's hidden-layer id once")
        info = d.get("info", {})
        if not isinstance(info, dict):
            raise InputError(source, "info", f"a JSON {type_name(info)}, not an object", fix)
        return cls(phy2log=phy, num_gpus=G, num_nodes=M, num_experts=N,
                   moe_layer_ids=None if ids is None else tuple(ids), info=dict(info),
                   source=source, colocated=d.get("colocated_copies") is True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Placement:
        """Read a placement JSON file (see ``from_dict`` for what is checked)."""
        d = read_json(path, "file", "save with moeplace solve --out", max_bytes=64 << 20)
        return cls.from_dict(d, source=str(path))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


# ---- constructors ---------------------------------------------------------------------------
def _check_cluster(num_experts: int, num_gpus: int, num_nodes: int, replicas: int) -> int:
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
        raise InfeasibleError(f"{num_gpus} GPUs do not split evenly into {num_nodes} nodes")
    if replicas < 0:
        raise InfeasibleError(f"replicas must be >= 0, got {replicas}")
    P = num_experts + replicas
    if P % num_gpus:
        raise InfeasibleError(f"{num_experts} experts + {replicas} replicas = {P} slots do not "
                              f"split evenly over {num_gpus} GPUs")
    S = P // num_gpus
    if replicas and S > num_experts:
        raise InfeasibleError(f"{S} slots per GPU exceed {num_experts} distinct experts")
    return S


def from_gpu_lists(layers: list[list[list[int]]], num_nodes: int = 1, num_experts: int | None = None,
                   **kw: Any) -> Placement:
    """Build from ``layers[l][g]`` = experts on GPU g (all GPUs the same length)."""
    phy = np.array([[e for gpu in layer for e in gpu] for layer in layers], dtype=np.int64)
    return Placement(phy, num_gpus=len(layers[0]), num_nodes=num_nodes, num_experts=num_experts,
                     **kw)


def contiguous(num_layers: int, num_experts: int, num_gpus: int, num_nodes: int = 1,
               replicas: int = 0, **kw: Any) -> Placement:
    """vLLM ``linear`` / SGLang ``trivial``: ``phy2log[l] = [0..N-1, 0..R-1]`` (cyclic if R > N)."""
    _check_cluster(num_experts, num_gpus, num_nodes, replicas)
    row = np.arange(num_experts + replicas) % num_experts
    return Placement(np.tile(row, (num_layers, 1)), num_gpus, num_nodes, num_experts, **kw)


def round_robin(num_layers: int, num_experts: int, num_gpus: int, num_nodes: int = 1,
                **kw: Any) -> Placement:
    """vLLM ``round_robin``: GPU r holds r, r+G, r+2G, ... (no replicas)."""
    _check_cluster(num_experts, num_gpus, num_nodes, 0)
    row = np.concatenate([np.arange(r, num_experts, num_gpus) for r in range(num_gpus)])
    return Placement(np.tile(row, (num_layers, 1)), num_gpus, num_nodes, num_experts, **kw)


def random_placement(num_layers: int, num_experts: int, num_gpus: int, num_nodes: int = 1,
                     replicas: int = 0, seed: int = 0, **kw: Any) -> Placement:
    """Uniformly random permutation per layer; replicas of random experts on other GPUs."""
    S = _check_cluster(num_experts, num_gpus, num_nodes, replicas)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        perm = rng.permutation(num_experts)
        # At most one copy of an expert per GPU: draw extras from G-1 spare copies per expert.
        pool = np.repeat(np.arange(num_experts), num_gpus - 1)
        extra = rng.choice(pool, size=replicas, replace=False)
        rows.append(_fill_distinct(np.concatenate([perm, extra]), num_gpus, S, rng))
    return Placement(np.array(rows), num_gpus, num_nodes, num_experts, **kw)


def _fill_distinct(items: np.ndarray, G: int, S: int, rng: np.random.Generator) -> np.ndarray:
    """Deal expert copies onto G GPUs of S slots with no GPU holding an expert twice."""
    gpus: list[list[int]] = [[] for _ in range(G)]
    # Most-replicated experts first, each copy to a distinct GPU with room and most free slots.
    vals, cnt = np.unique(items, return_counts=True)
    for e in vals[np.argsort(-cnt, kind="stable")]:
        c = int(cnt[vals == e][0])
        free = np.array([S - len(g) for g in gpus], dtype=float) + rng.random(G) * 0.5
        choice = np.argsort(-free)[:c]
        if len(choice) < c:
            raise InfeasibleError(f"{c} copies of expert {e} exceed {G} GPUs")
        for g in choice:
            if len(gpus[g]) >= S or e in gpus[g]:
                raise InfeasibleError("cannot place replicas on distinct GPUs")
            gpus[g].append(int(e))
    for g in gpus:
        rng.shuffle(g)
    return np.array([e for g in gpus for e in g])

"""Read aggregate count files (moeplace stats, derived_counts, per-layer expert counts) as RoutingStats."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from moeplace.errors import InputError
from moeplace.traces.stats import RoutingStats
from moeplace.traces.trace import TraceMeta

_TRANSITION_KEYS = ("transitions", "transitions_all", "transitions_between_logged_layers")
_LAYER_KEYS = ("moe_layer_ids", "encoder_layer_ids", "layer_ids")


def read_counts_npz(path: str | os.PathLike[str], model: str = "") -> RoutingStats:
    """``.npz`` with a moeplace header, or ``load``/``counts`` ``[L, N]`` (+ ``transitions``)."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(p, "file", f"not a readable .npz archive ({exc})", "check the path") from None
    if "header" in z.files:
        return RoutingStats.load_npz(p)
    key = "load" if "load" in z.files else "counts" if "counts" in z.files else None
    if key is None:
        raise InputError(p, "load", "array missing", "the archive must hold load [layers, experts]")
    load = z[key]
    if load.ndim != 2 or load.dtype.kind not in "iu" or (load < 0).any():
        raise InputError(p, key, f"shape {load.shape} dtype {load.dtype} is not non-negative "
                         "integer [layers, experts]", "give per-layer expert counts")
    L, N = load.shape
    trans = next((z[k] for k in _TRANSITION_KEYS if k in z.files), None)
    if trans is not None and trans.shape != (L - 1, N, N):
        raise InputError(p, "transitions", f"shape {trans.shape}, expected {(L - 1, N, N)}",
                         "give [layers-1, experts, experts]")
    layer_ids = next((tuple(int(x) for x in z[k]) for k in _LAYER_KEYS if k in z.files),
                     tuple(range(L)))
    # Each token adds k to a layer's load and k*k to a transition slice, so k = pairs / load.
    top_k, tokens = 1, 0
    if trans is not None and load[0].sum() > 0:
        top_k = max(1, round(trans[0].sum() / load[0].sum()))
        tokens = int(load[0].sum() // top_k)
    elif "encoder_layer_ids" in z.files or load.sum(axis=1).std() == 0:
        tokens = int(load[0].sum())
    meta = TraceMeta(num_experts=N, top_k=top_k, moe_layer_ids=layer_ids, model=model or p.stem,
                     source=str(p))
    return RoutingStats(meta=meta, num_tokens=tokens, load=load.astype(np.int64),
                        transitions=None if trans is None else trans.astype(np.int64))

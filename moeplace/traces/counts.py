"""Read aggregate count files (moeplace stats, derived_counts, per-layer expert counts) as RoutingStats."""

from __future__ import annotations

import os
from pathlib import Path

from moeplace._limits import check_memory
from moeplace._validate import MAX_EXPERTS, MAX_LAYERS, NpzMembers, as_int, as_int_list
from moeplace.errors import InputError
from moeplace.traces.stats import RoutingStats, _counts
from moeplace.traces.trace import TraceMeta

_TRANSITION_KEYS = ("transitions", "transitions_all", "transitions_between_logged_layers")
_LAYER_KEYS = ("moe_layer_ids", "encoder_layer_ids", "layer_ids")


def read_counts_npz(path: str | os.PathLike[str], model: str = "") -> RoutingStats:
    """``.npz`` with a moeplace header, or ``load``/``counts`` ``[L, N]`` (+ ``transitions``).

    Shapes and dtypes are checked from the member headers, and the memory they imply against
    the cap, before any member is read. Per-layer totals that differ (records lost at some
    layers, as in the Mixtral sample) are kept as given and flagged ``extra['inexact_totals']``.
    """
    p = Path(path)
    with NpzMembers(p) as z:
        if "header" in z.files:
            z.close()
            return RoutingStats.load_npz(p)
        key = "load" if "load" in z else "counts" if "counts" in z else None
        if key is None:
            raise InputError(p, "load", "array missing",
                             "the archive must hold load [layers, experts]")
        shape, dtype = z.header(key)
        if len(shape) != 2 or 0 in shape or dtype.kind not in "iu":
            raise InputError(p, key, f"shape {shape} dtype {dtype} is not non-negative integer "
                             "[layers, experts]", "give per-layer expert counts")
        L, N = shape
        as_int(N, p, key, hi=MAX_EXPERTS, fix="check the experts axis")
        tkey = next((k for k in _TRANSITION_KEYS if k in z), None)
        if tkey is not None:
            tshape, tdtype = z.header(tkey)
            if tshape != (L - 1, N, N) or tdtype.kind not in "iu":
                raise InputError(p, tkey, f"shape {tshape} dtype {tdtype}, expected integer "
                                 f"{(L - 1, N, N)}", "give [layers-1, experts, experts]")
        check_memory(8 * (L * N + (L * N * N if tkey else 0)) * 2,
                     f"counts for {L} layers x {N} experts", p, key)
        load = _counts(z.read(key), p, key)
        trans = None if tkey is None else _counts(z.read(tkey), p, tkey)
        lkey = next((k for k in _LAYER_KEYS if k in z), None)
        if lkey is not None:
            raw = z.read(lkey)
            if raw.ndim != 1 or raw.dtype.kind not in "iu":
                raise InputError(p, lkey, f"{raw.dtype} array of shape {raw.shape} is not a list "
                                 "of layer ids", "store one integer per layer")
            layer_ids = tuple(as_int_list([int(x) for x in raw], p, lkey, lo=0, hi=MAX_LAYERS,
                                          distinct=True))
            if len(layer_ids) != L:
                raise InputError(p, lkey, f"{len(layer_ids)} ids for {L} layers",
                                 "give one id per layer")
        else:
            layer_ids = tuple(range(L))
        encoder = "encoder_layer_ids" in z
    # Each token adds k to a layer's load and k*k to a transition slice, so k = pairs / load.
    top_k, tokens = 1, 0
    sums = load.sum(axis=1)
    if trans is not None and sums[0] > 0:
        top_k = min(N, max(1, round(int(trans[0].sum()) / int(sums[0]))))
        tokens = int(sums[0] // top_k)
    elif encoder or sums.std() == 0:
        tokens = int(sums[0])
    extra = {} if (sums == tokens * top_k).all() else {"inexact_totals": True}
    meta = TraceMeta(num_experts=N, top_k=top_k, moe_layer_ids=layer_ids, model=model or p.stem,
                     source=str(p), extra=extra)
    return RoutingStats(meta=meta, num_tokens=tokens, load=load, transitions=trans)

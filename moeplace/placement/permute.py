"""Permute a model's expert axis (state dict tensors and names) so contiguous EP sharding realises a placement.

After the rewrite, new expert index i of hidden layer h holds old expert ``phy2log[l][i]``, so
the default contiguous split (vLLM ``linear``, SGLang ``trivial``, transformers EP, Megatron)
puts exactly the planned experts on each GPU. Routing is permutation-equivariant when the
router's rows, its biases (DeepSeek's ``e_score_correction_bias`` too) and the expert weights
move together, so the model's outputs do not change. Works on torch tensors and numpy arrays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.placement.placement import Placement

_BLOCK = r"(?P<block>.*?layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))"
# Tensors whose first axis is the expert axis (router rows, fused 5.x experts, GPT-OSS biases).
_AXIS0 = re.compile(_BLOCK + r"\.(?:(?:gate|router)\.(?:weight|bias|e_score_correction_bias)"
                    r"|experts\.(?:gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias))$")
# Hub checkpoints keep one tensor per expert: experts.{e}.(gate_proj|up_proj|down_proj|w1|w2|w3).
_PER_EXPERT = re.compile(_BLOCK + r"\.experts\.(?P<expert>\d+)\.(?P<rest>.+)$")


def layer_permutations(placement: Placement, moe_layer_ids: list[int] | None = None
                       ) -> dict[int, np.ndarray]:
    """``{hidden layer: perm}`` with ``perm[i]`` = old expert placed at new index i."""
    if placement.num_replicas:
        raise InputError(placement.source, "phy2log", f"{placement.num_replicas} replicas per "
                         "layer: a rewritten checkpoint holds each expert once",
                         "serve replicas through 'moeplace export' instead")
    ids = list(moe_layer_ids) if moe_layer_ids is not None else (
        list(placement.moe_layer_ids) if placement.moe_layer_ids is not None else None)
    if ids is None or len(ids) != placement.num_layers:
        raise InputError(placement.source, "moe_layer_ids", "hidden-layer ids of the MoE layers "
                         "are unknown or of the wrong length", "pass --moe-layers")
    return {int(h): placement.phy2log[j].copy() for j, h in enumerate(ids)}


def _take(t: Any, perm: np.ndarray) -> Any:
    if hasattr(t, "index_select"):  # torch tensor
        import torch

        return t.index_select(0, torch.as_tensor(perm, device=t.device)).contiguous()
    return np.ascontiguousarray(np.asarray(t)[perm])


def permute_state_dict(state_dict: Mapping[str, Any], placement: Placement, *,
                       moe_layer_ids: list[int] | None = None,
                       invert: bool = False) -> dict[str, Any]:
    """A new state dict with every MoE layer's expert axis permuted (``invert`` undoes it)."""
    perms = layer_permutations(placement, moe_layer_ids)
    if invert:
        perms = {h: np.argsort(p) for h, p in perms.items()}
    N = int(placement.num_experts)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for key, t in state_dict.items():
        m = _AXIS0.match(key)
        if m and int(m["layer"]) in perms:
            h = int(m["layer"])
            if t.shape[0] != N:
                raise InputError(key, "shape", f"expert axis {t.shape[0]} != {N} experts",
                                 "the placement is for another model")
            out[key] = _take(t, perms[h])
            seen.add(h)
            continue
        m = _PER_EXPERT.match(key)
        if m and int(m["layer"]) in perms:
            h, e = int(m["layer"]), int(m["expert"])
            if e >= N:
                raise InputError(key, "expert", f"expert {e} >= {N}", "the placement is for "
                                 "another model")
            new = int(np.argsort(perms[h])[e])  # old expert e moves to this index
            out[f"{m['block']}.experts.{new}.{m['rest']}"] = t
            seen.add(h)
            continue
        out[key] = t
    missing = sorted(set(perms) - seen)
    if missing:
        raise InputError("state_dict", f"layers.{missing[0]}", "no router or expert tensors for "
                         "this MoE layer", "check --moe-layers against the model")
    return out

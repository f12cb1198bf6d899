"""Find a model's MoE routers and, for each, how to read the chosen experts out of its output.

Conventions (../shared/docs/serving-formats.md, section transformers), detected from the
installed transformers version and each module's class, never guessed from output shapes:

- 5.x: every router (``*TopKRouter``; DeepSeek-V3's ``DeepseekV3TopkRouter``) returns
  ``(logits or probabilities, top-k weights, top-k indices)``. DeepSeek-V3's indices already
  respect its group limit, so recording them records what the router selected.
- 5.0.0 only: the DeepSeek-V3 gate returns logits alone; the MoE block's
  ``route_tokens_to_experts(logits) -> (indices, weights)`` makes the choice, so that call is
  what is recorded.
- 4.57: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE gates are ``nn.Linear`` returning logits (the
  block takes the top-k of their softmax); DeepSeek-V3's gate returns ``(indices, weights)``;
  GPT-OSS's router returns ``(dense scores, indices)``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeplace.errors import InputError

# (indices [tokens, k], weights [tokens, k] or None) from a router's output.
Extract = Callable[[Any], Any]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_TOPK_ROUTER_RE = re.compile(r"Top[Kk]Router$")
# 4.57 blocks whose gate is a bare nn.Linear producing logits.
_LINEAR_GATE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                       "OlmoeSparseMoeBlock")


@dataclass
class Router:
    """One hooked router: where it sits, which hidden layer it serves, how to read its output.

    ``hook_method``: when set, the recorder wraps this method of ``module`` (a plain function
    attribute) instead of hooking the module's forward.
    """

    name: str
    module: Any
    layer_id: int
    num_experts: int
    top_k: int
    extract: Extract
    hook_method: str | None = None


def transformers_version() -> tuple[int, int, int] | None:
    """Installed transformers version as (major, minor, patch), or None without it."""
    try:
        import transformers
    except ImportError:
        return None
    nums = [int(x) for x in re.findall(r"\d+", transformers.__version__)[:3]]
    return tuple([*nums, 0, 0, 0][:3])  # type: ignore[return-value]


def _triple(out: Any) -> tuple[Any, Any]:
    return out[2], out[1]


def _first_pair(out: Any) -> tuple[Any, Any]:
    return out[0], out[1]


def _dense_then_indices(out: Any) -> tuple[Any, Any]:
    """4.57 GPT-OSS: (dense scores [tokens, N], indices); the weights are the chosen scores."""
    return out[1], out[0].gather(-1, out[1])


def _linear_logits(top_k: int, norm: bool) -> Extract:
    """4.57 gates: the block takes the top-k of the gate's softmax (and may renormalise)."""

    def extract(logits: Any) -> tuple[Any, Any]:
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if norm:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w

    return extract


def _layer_id(name: str, ordinal: int) -> int:
    found = _LAYER_RE.findall(name)
    return int(found[-1]) if found else ordinal


def _count(module: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and v > 0:
            return v
    w = getattr(module, "weight", None)
    return int(w.shape[0]) if w is not None and getattr(w, "ndim", 0) == 2 else None


def _builtin(model: Any, version: tuple[int, int, int]) -> list[Router]:
    """Routers of the transformers architectures moeplace knows, by version and class."""
    modules = dict(model.named_modules())
    found: list[Router] = []
    for name, mod in modules.items():
        cls = type(mod).__name__
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        pcls = type(parent).__name__ if parent is not None else ""
        n_exp = _count(mod, "num_experts", "n_routed_experts")
        k = getattr(mod, "top_k", None) or getattr(parent, "top_k", None)
        ordinal = len(found)
        if version >= (5, 0, 0):
            if not _TOPK_ROUTER_RE.search(cls) or n_exp is None or not k:
                continue
            if version[:3] == (5, 0, 0) and cls == "DeepseekV3TopkRouter":
                # 5.0.0: the gate returns logits; the block's route_tokens_to_experts chooses.
                if parent is None or not hasattr(parent, "route_tokens_to_experts"):
                    continue
                found.append(Router(name, parent, _layer_id(name, ordinal), n_exp, int(k),
                                    _first_pair, hook_method="route_tokens_to_experts"))
                continue
            found.append(Router(name, mod, _layer_id(name, ordinal), n_exp, int(k), _triple))
            continue
        # 4.57 conventions.
        if cls == "Linear" and name.endswith(".gate") and pcls in _LINEAR_GATE_BLOCKS:
            n_exp = int(mod.weight.shape[0])
            norm = pcls == "MixtralSparseMoeBlock" or bool(getattr(parent, "norm_topk_prob", False))
            found.append(Router(name, mod, _layer_id(name, ordinal), n_exp, int(k),
                                _linear_logits(int(k), norm)))
        elif cls == "DeepseekV3TopkRouter" and n_exp and k:
            found.append(Router(name, mod, _layer_id(name, ordinal), n_exp, int(k), _first_pair))
        elif cls == "GptOssTopKRouter" and n_exp and k:
            found.append(Router(name, mod, _layer_id(name, ordinal), n_exp, int(k), _dense_then_indices))
    return found


def _custom(model: Any, pattern: str, extract: Extract, num_experts: int | None,
            top_k: int | None) -> list[Router]:
    found: list[Router] = []
    for name, mod in model.named_modules():
        if not name or not fnmatch.fnmatchcase(name, pattern):
            continue
        n_exp = num_experts or _count(mod, "num_experts", "n_routed_experts")
        k = top_k or getattr(mod, "top_k", None)
        if not n_exp or not k:
            raise InputError(name, "num_experts" if not n_exp else "top_k",
                             "cannot be read from the router module",
                             "pass num_experts= and top_k= to record()")
        found.append(Router(name, mod, _layer_id(name, len(found)), int(n_exp), int(k), extract))
    if not found:
        raise InputError(type(model).__name__, "routers", f"no module name matches {pattern!r}",
                         "give a glob over model.named_modules() names, e.g. 'layers.*.gate'")
    return found


def find_routers(model: Any, *, routers: str | None = None, extract: Extract | None = None,
                 num_experts: int | None = None, top_k: int | None = None) -> list[Router]:
    """The model's MoE routers in forward order.

    Built-in architectures are found automatically. For a custom torch MoE model, ``routers``
    is a glob over module names and ``extract(output)`` returns the top-k indices (or
    ``(indices, weights)``) from each matching module's output.
    """
    if routers is not None or extract is not None:
        if routers is None or extract is None:
            raise InputError("record", "routers" if routers is None else "extract",
                             "custom routers need both a module glob and an extract function",
                             "pass routers='layers.*.gate' and extract=lambda out: out[1]")
        found = _custom(model, routers, extract, num_experts, top_k)
    else:
        version = transformers_version() or (5, 0, 1)
        found = _builtin(model, version)
        if not found:
            raise InputError(type(model).__name__, "routers", "no MoE router recognised "
                             "(looked for transformers *TopKRouter modules, 4.57 SparseMoeBlock "
                             "gates, DeepSeek-V3 and GPT-OSS routers)",
                             "pass routers='glob' and extract=fn for a custom model")
    shapes = {(r.num_experts, r.top_k) for r in found}
    if len(shapes) > 1:
        raise InputError(type(model).__name__, "routers", f"routers disagree on (experts, top-k): "
                         f"{sorted(shapes)}", "select routers of one kind with routers='glob'")
    return found


def shared_experts(model: Any) -> int:
    """Always-active shared experts per MoE layer, from the config or the block's modules."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "n_shared_experts", None) if cfg is not None else None
    if isinstance(n, int):
        return n
    if cfg is not None and getattr(cfg, "shared_expert_intermediate_size", 0):
        return 1
    return 0

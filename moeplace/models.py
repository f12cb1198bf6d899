"""Layer layouts of MoE models: which hidden layers are MoE, how many there are, expert groups.

Serving stacks index placements by hidden-layer id (SGLang, TensorRT-LLM) or by MoE-layer
position (vLLM, EPLB); a placement is only loaded right when its MoE layers carry the model's
real ids. ``ModelLayout`` holds them, from a Hugging Face ``config.json`` (``from_hf_config``)
or for a known model (``known_layout``); ``check_layer_ids`` refuses a mismatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplace._validate import loads_json
from moeplace.errors import InputError


@dataclass(frozen=True)
class ModelLayout:
    """Hidden layers, the ids of the MoE ones (0-based), experts, top-k and expert groups."""

    name: str
    num_hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    n_group: int | None = None

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)


def _dense_first(name: str, H: int, first_dense: int, N: int, k: int,
                 n_group: int | None = None) -> ModelLayout:
    return ModelLayout(name, H, tuple(range(first_dense, H)), N, k, n_group)


# From each model's config.json on the Hugging Face Hub (first_k_dense_replace,
# decoder_sparse_step, n_group); FLAME-MoE from its trace dataset card (9 layers, the first dense).
KNOWN: dict[str, ModelLayout] = {m.name: m for m in (
    _dense_first("deepseek-v3", 61, 3, 256, 8, 8),
    _dense_first("deepseek-r1", 61, 3, 256, 8, 8),
    _dense_first("deepseek-v2", 60, 1, 160, 6, 8),
    _dense_first("deepseek-v2-lite", 27, 1, 64, 6, 1),
    _dense_first("kimi-k2", 61, 1, 384, 8, 1),
    _dense_first("qwen3-30b-a3b", 48, 0, 128, 8),
    _dense_first("qwen3-235b-a22b", 94, 0, 128, 8),
    _dense_first("qwen1.5-moe-a2.7b", 24, 0, 60, 4),
    _dense_first("mixtral-8x7b", 32, 0, 8, 2),
    _dense_first("flame-moe-290m", 9, 1, 64, 6),
)}
_ALIASES = {"mixtral": "mixtral-8x7b", "qwen15-moe": "qwen1.5-moe-a2.7b",
            "qwen1.5-moe": "qwen1.5-moe-a2.7b", "deepseek-r1": "deepseek-r1"}


def guess_model(name: str | None) -> str | None:
    """The known model a trace's or placement's model name refers to, if any."""
    if not name:
        return None
    m = name.lower().replace("_", "-")
    for key in sorted([*KNOWN, *_ALIASES], key=len, reverse=True):
        if key in m:
            return _ALIASES.get(key, key)
    return None


def known_layout(name: str) -> ModelLayout:
    """The layout of a known model (``deepseek-v3``, ``mixtral-8x7b``, ...)."""
    key = _ALIASES.get(name, name)
    if key not in KNOWN:
        raise InputError("--model-shape", "name", f"unknown model {name!r}",
                         f"use one of {sorted(KNOWN)} or pass --config config.json")
    return KNOWN[key]


# No model has more layers or routed experts than this; a config declaring more is corrupt or
# hostile, and would drive per-layer tables of that size.
MAX_CONFIG_COUNT = 1 << 20
MAX_CONFIG_LAYERS = 100_000  # exports hold one row per hidden layer


def _int(cfg: dict[str, Any], key: str, src: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CONFIG_COUNT:
        raise InputError(src, key, f"{v!r:.40} is not an integer in 0..{MAX_CONFIG_COUNT}",
                         "pass the model's own config.json")
    return v


def from_hf_config(path: str | os.PathLike[str]) -> ModelLayout:
    """Layout from a Hugging Face ``config.json`` (DeepSeek/Kimi ``first_k_dense_replace`` and
    ``moe_layer_freq``, Qwen ``decoder_sparse_step`` and ``mlp_only_layers``, Mixtral: every
    layer; multimodal configs through their ``text_config``)."""
    p = Path(path)
    try:
        if p.is_dir():
            p = p / "config.json"
        if p.stat().st_size > 16 << 20:
            raise InputError(p, "file", "larger than 16 MiB: not a model config",
                             "pass the model's config.json")
        cfg = loads_json(p.read_bytes(), p, "file", "pass the model's config.json")
    except OSError as exc:
        raise InputError(p, "file", f"cannot read ({exc.strerror})", "check the path") from None
    if not isinstance(cfg, dict):
        raise InputError(p, "file", "not a JSON object", "pass the model's config.json")
    if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        cfg = cfg["text_config"]
    src = str(p)
    if "num_hidden_layers" not in cfg:
        raise InputError(src, "num_hidden_layers", "missing", "pass the model's config.json")
    H = _int(cfg, "num_hidden_layers", src)
    if H > MAX_CONFIG_LAYERS:
        raise InputError(src, "num_hidden_layers", f"{H} is more layers than any model has",
                         f"at most {MAX_CONFIG_LAYERS:,}; pass the model's own config.json")
    N = next((_int(cfg, k, src) for k in ("n_routed_experts", "num_local_experts", "num_experts")
              if isinstance(cfg.get(k), int)), None)
    if not N:
        raise InputError(src, "n_routed_experts", "no routed-expert count "
                         "(n_routed_experts, num_local_experts or num_experts)",
                         "pass the config of an MoE model")
    k = next((_int(cfg, key, src) for key in ("num_experts_per_tok", "num_experts_per_token",
                                              "top_k")
              if isinstance(cfg.get(key), int)), 0)
    freq = cfg.get("moe_layer_freq", 1)
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        first = _int(cfg, "first_k_dense_replace", src, 0)
        if isinstance(freq, list):  # Megatron style: one 0/1 per layer
            if len(freq) != H:
                raise InputError(src, "moe_layer_freq", f"{len(freq)} entries for {H} layers",
                                 "pass the model's own config.json")
            ids = [l for l in range(H) if freq[l] and l >= first]
        else:
            f = _int(cfg, "moe_layer_freq", src, 1) or 1
            ids = [l for l in range(first, H) if l % f == 0]
    elif "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:
        step = _int(cfg, "decoder_sparse_step", src, 1) or 1
        dense = cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(isinstance(x, int) for x in dense):
            raise InputError(src, "mlp_only_layers", f"{dense!r} is not a list of layer ids",
                             "pass the model's own config.json")
        skip = set(dense)
        ids = [l for l in range(H) if l not in skip and (l + 1) % step == 0]
    elif isinstance(cfg.get("interleave_moe_layer_step"), int):  # Llama 4
        step = _int(cfg, "interleave_moe_layer_step", src) or 1
        ids = [l for l in range(H) if (l + 1) % step == 0]
    else:
        ids = list(range(H))
    n_group = cfg.get("n_group") if isinstance(cfg.get("n_group"), int) else None
    return ModelLayout(str(cfg.get("model_type", p.parent.name)), H, tuple(ids), int(N),
                       int(k), n_group)


def check_layer_ids(layout: ModelLayout, moe_layer_ids: tuple[int, ...] | list[int] | None,
                    num_layers: int, source: str, num_hidden_layers: int | None = None
                    ) -> tuple[int, list[int]]:
    """``(num_hidden_layers, moe_layer_ids)`` to export with, or ``InputError`` when the
    placement's ids or layer count disagree with the model's layout.

    Every id must be one of the model's MoE layers (a placement may cover some of them, e.g. a
    trace that recorded five layers); without ids the placement must cover all MoE layers, which
    then get the model's ids.
    """
    want = list(layout.moe_layer_ids)
    span = f"{want[0]}..{want[-1]} of {layout.num_hidden_layers}" if want else "none"
    if num_hidden_layers is not None and num_hidden_layers != layout.num_hidden_layers:
        raise InputError("--num-hidden-layers", "value", f"{num_hidden_layers}, but "
                         f"{layout.name} has {layout.num_hidden_layers} hidden layers",
                         "drop --num-hidden-layers or fix it")
    if moe_layer_ids is None:
        if num_layers != len(want):
            raise InputError(source, "phy2log", f"{num_layers} MoE layers without hidden-layer "
                             f"ids, but {layout.name} has {len(want)} (hidden layers {span})",
                             "pass --moe-layers, or solve from a trace that records them")
        return layout.num_hidden_layers, want
    got = [int(x) for x in moe_layer_ids]
    if len(got) != num_layers:
        raise InputError(source, "moe_layer_ids", f"{len(got)} ids for {num_layers} MoE layers",
                         "give one hidden-layer id per MoE layer")
    stray = [h for h in got if h not in set(want)]
    if stray or len(set(got)) != len(got):
        what = (f"hidden layer {stray[0]} is not an MoE layer of {layout.name}" if stray
                else "an id appears twice")
        raise InputError(source, "moe_layer_ids", f"{what} (ids here {got[0]}..{got[-1]}, "
                         f"model's MoE layers {span})", "re-record the trace with the model's "
                         "real layer ids, or pass --moe-layers with them")
    return layout.num_hidden_layers, got


__all__ = ["KNOWN", "ModelLayout", "check_layer_ids", "from_hf_config", "guess_model",
           "known_layout"]

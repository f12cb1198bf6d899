"""Place a live transformers 5.x MoE model's experts on the planned devices, and dispatch each
token's expert work to them and back.

Each fused experts module (``experts.gate_up_proj [N, ...]`` and friends) is replaced by a
``PlacedExperts`` holding, per GPU of the placement, a copy of the original module cut down to
that GPU's experts and moved to its device. A (token, expert) pair is computed by the part that
holds the expert (with replicas, copies take tokens in turn), through the original module's own
forward, so every architecture's expert math (GPT-OSS biases and clamping included) is kept.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from moeplace.errors import InputError, MissingDependencyError
from moeplace.placement.permute import _BLOCK
from moeplace.placement.placement import Placement

_EXPERTS = re.compile(_BLOCK + r"\.experts$")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "apply_to_model", "torch") from None
    return torch


def _cut(experts: Any, keep: list[int], device: Any, num_experts: int) -> Any:
    """A shallow copy of ``experts`` whose expert-axis parameters hold only ``keep``, on ``device``."""
    torch = _torch()
    part = experts.__class__.__new__(experts.__class__)
    part.__dict__ = experts.__dict__.copy()
    part._parameters = {}
    part._buffers = {}
    part._modules = dict(experts._modules)
    idx = torch.as_tensor(keep, dtype=torch.long)
    for name, p in experts._parameters.items():
        if p is not None and p.ndim >= 1 and p.shape[0] == num_experts:
            data = p.detach().index_select(0, idx.to(p.device)).to(device)
            part._parameters[name] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
        else:
            part._parameters[name] = p
    for name, b in experts._buffers.items():
        part._buffers[name] = b.to(device) if b is not None else None
    if hasattr(part, "num_experts"):
        part.num_experts = len(keep)
    return part


@functools.cache
def _placed_experts_class() -> type:
    """The module class, defined on first use so importing moeplace never imports torch."""
    torch = _torch()

    class _PlacedExperts(torch.nn.Module):
        """Experts split over devices as planned; same call and result as the module it replaces."""

        def __init__(self, experts: Any, gpu_experts: list[list[int]], devices: list[Any],
                     num_experts: int) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleList(
                [_cut(experts, keep, devices[g], num_experts) for g, keep in enumerate(gpu_experts)])
            self.devices = list(devices)
            self.num_experts = num_experts
            copies: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
            for g, keep in enumerate(gpu_experts):
                for local, e in enumerate(keep):
                    copies[e].append((g, local))
            width = max(len(c) for c in copies)
            gpu = np.zeros((num_experts, width), np.int64)
            local = np.zeros((num_experts, width), np.int64)
            for e, c in enumerate(copies):
                for r in range(width):
                    gpu[e, r], local[e, r] = c[r % len(c)]
            self.register_buffer("_count", torch.tensor([len(c) for c in copies]), persistent=False)
            self.register_buffer("_gpu", torch.from_numpy(gpu), persistent=False)
            self.register_buffer("_local", torch.from_numpy(local), persistent=False)

        def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            n, k = top_k_index.shape
            expert = top_k_index.reshape(-1).to(self._gpu.device)
            token = torch.arange(n, device=expert.device).repeat_interleave(k)
            weight = top_k_weights.reshape(-1, 1)
            replica = token % self._count[expert]  # copies of a hot expert take tokens in turn
            gpu = self._gpu[expert, replica]
            local = self._local[expert, replica]
            out = torch.zeros_like(hidden_states)
            for g, part in enumerate(self.parts):
                sel = (gpu == g).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                dev = self.devices[g]
                t = token[sel]
                y = part(hidden_states[t.to(hidden_states.device)].to(dev), local[sel].to(dev)[:, None],
                         weight[sel.to(weight.device)].to(dev))
                out.index_add_(0, t.to(out.device), y.to(out.device, out.dtype))
            return out

    return _PlacedExperts


def apply_to_model(model: Any, placement: Placement, devices: list[Any], *,
                   main_device: Any = None) -> dict[str, Any]:
    """Put each MoE layer's experts on ``devices[g]`` for the GPU g the placement gives them.

    The rest of the model goes to ``main_device`` (default ``devices[0]``), except that a model
    already dispatched by accelerate (``from_pretrained(device_map=...)``, which sets
    ``hf_device_map``) keeps its layout unless ``main_device`` is given. Tokens travel to the
    experts' devices and back inside each layer, and the outputs equal the original model's up
    to floating-point summation order. Replicas are served too (copies share the tokens).
    Returns an accelerate-style ``device_map`` of where every part now lives.
    """
    torch = _torch()
    if len(devices) != placement.num_gpus:
        raise InputError("apply_to_model", "devices", f"{len(devices)} devices for "
                         f"{placement.num_gpus} GPUs", "give one device per GPU of the placement")
    devs = [torch.device(d) for d in devices]
    main = torch.device(main_device) if main_device is not None else devs[0]
    found = {int(m["layer"]): name for name, _ in model.named_modules()
             if (m := _EXPERTS.match(name))}
    ids = list(placement.moe_layer_ids) if placement.moe_layer_ids is not None else sorted(found)
    if len(ids) != placement.num_layers or sorted(ids) != sorted(found):
        raise InputError(placement.source, "moe_layer_ids", f"placement layers {ids} do not "
                         f"match the model's experts modules at layers {sorted(found)}",
                         "solve for this model (or set placement.moe_layer_ids)")
    cls = _placed_experts_class()
    dispatched = getattr(model, "hf_device_map", None)
    if dispatched and main_device is None:
        device_map: dict[str, Any] = dict(dispatched)
    else:
        model.to(main)
        device_map = {"": main}
    for j, h in enumerate(ids):
        name = found[h]
        experts = model.get_submodule(name)
        n = getattr(experts, "num_experts", None)
        fused = [p for p in experts._parameters.values() if p is not None and p.ndim == 3]
        if not fused:
            raise InputError(name, "experts", "not a fused experts module (transformers 5.x)",
                             "use transformers >= 5, or rewrite the checkpoint with apply")
        n = n or int(fused[0].shape[0])
        if n != placement.num_experts:
            raise InputError(placement.source, "num_experts", f"{placement.num_experts} experts, "
                             f"the model has {n} at {name}", "solve for this model")
        placed = cls(experts, placement.gpu_experts(j), devs, n)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, placed)
        for g in range(placement.num_gpus):
            device_map[f"{name}.parts.{g}"] = devs[g]
    return device_map

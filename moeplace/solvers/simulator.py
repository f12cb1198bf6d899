"""Estimated step time of a placement on a trace (metric 4): roofline expert compute plus alpha-beta
dispatch/combine communication per layer, slowest GPU per layer, from hardware profiles as data.

Per step (a window of ``tokens_per_step`` consecutive tokens) and MoE layer, GPU g's time is
``sum over its active experts of max(weight bytes / HBM rate, FLOPs / matmul rate) + launch``
(so at decode sizes a GPU's cost follows how many distinct experts it activates, at prefill sizes
its token count) plus its communication: tokens it sends to and receives from other GPUs (static
home model: a token's activation goes to each remote GPU holding one of its experts and the
result comes back), each direction ``alpha + bytes / bandwidth`` on NVLink inside a node and on
the network across nodes. The layer takes the slowest GPU's time; a step adds the non-MoE part.
GPUs of unequal speed (``gpu_speeds``, in the hardware JSON or as an argument; relative to the
profile's GPU) divide their expert compute time by their speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._validate import as_finite, read_json
from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers.cost import parse_gpu_speeds
from moeplace.traces import Trace

_DATA = "data/hardware"


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links (see the JSON profiles for each number's source)."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    matmul_efficiency: float
    memory_efficiency: float
    nvlink_bytes_per_s: float
    nvlink_alpha_s: float
    network_bytes_per_s: float
    network_alpha_s: float
    network_efficiency: float
    expert_launch_s: float
    # Optional: per-GPU speed factors in rank order (checked against the GPU count when used).
    gpu_speeds: tuple[float, ...] | None = None
    source: str = ""
    # Optional: per dispatch kernel, fitted "dispatch"/"combine" parameters (solvers.dispatch).
    kernels: dict[str, Any] | None = None

    _OPTIONAL = ("gpu_speeds", "source", "kernels")

    @classmethod
    def load(cls, name_or_path: str) -> Hardware:
        """A bundled profile (``h100-nvlink``, ``h100-ib``, ``h800-ib``) or a user JSON file."""
        p = Path(name_or_path)
        if not p.exists():
            p = Path(str(resources.files("moeplace") / _DATA / f"{name_or_path}.json"))
        if not p.exists():
            raise InputError(name_or_path, "hardware", "no such profile",
                             "use h100-nvlink, h100-ib, h800-ib or a JSON file with the same keys")
        fix = "copy a bundled profile"
        d = read_json(p, "file", fix, max_bytes=1 << 20)
        if not isinstance(d, dict):
            raise InputError(p, "file", "not a JSON object", fix)
        vals: dict[str, Any] = {"source": str(p)}
        if d.get("gpu_speeds") is not None:
            sp = d["gpu_speeds"]
            if not isinstance(sp, list) or not sp:
                raise InputError(p, "gpu_speeds", "is not a non-empty list of numbers",
                                 "give one speed per GPU in rank order, e.g. [1, 1, 0.7, 0.7]")
            vals["gpu_speeds"] = tuple(float(x) for x in parse_gpu_speeds(sp, len(sp), p,
                                                                         "gpu_speeds"))
        if d.get("kernels") is not None:
            vals["kernels"] = _check_kernels(d["kernels"], p)
        for k in cls.__dataclass_fields__:
            if k in cls._OPTIONAL:
                continue
            if k not in d:
                raise InputError(p, k, "missing", fix)
            if k == "name":
                if not isinstance(d[k], str):
                    raise InputError(p, k, "is not a string", fix)
                vals[k] = d[k]
                continue
            v = as_finite(d[k], p, k, fix)
            # Rates and efficiencies divide: zero or negative would give inf or negative times.
            latency = k.endswith(("_alpha_s", "_launch_s"))  # may be 0; rates may not
            if v < 0 or (v == 0 and not latency):
                raise InputError(p, k, f"{v} is {'negative' if v < 0 else 'zero'}",
                                 "latencies are >= 0, rates and efficiencies > 0")
            vals[k] = v
        return cls(**vals)


def _check_kernels(d: Any, p: Path) -> dict[str, Any]:
    """A profile's ``kernels`` entry: {kernel: {"dispatch"|"combine": {param: number >= 0}}}."""
    fix = "see moeplace/data/hardware/h800-ib.json"
    if not isinstance(d, dict):
        raise InputError(p, "kernels", "not a JSON object", fix)
    out: dict[str, Any] = {}
    for name, entry in d.items():
        if name.startswith("_"):  # notes (the fit's residuals), kept as given
            out[name] = entry
            continue
        if not isinstance(entry, dict):
            raise InputError(p, f"kernels.{name}", "not a JSON object", fix)
        out[name] = {}
        for stage in ("dispatch", "combine"):
            par = entry.get(stage)
            if not isinstance(par, dict):
                raise InputError(p, f"kernels.{name}.{stage}", "missing", fix)
            vals = {}
            for k, v in par.items():
                x = as_finite(v, p, f"kernels.{name}.{stage}.{k}", fix)
                if x < 0 or (x == 0 and k.endswith("_gbps")):
                    raise InputError(p, f"kernels.{name}.{stage}.{k}", f"{x} out of range",
                                     "bandwidths > 0, latencies >= 0")
                vals[k] = x
            out[name][stage] = vals
    return out


@dataclass(frozen=True)
class ModelShape:
    """Expert size and the non-MoE cost per layer."""

    hidden_size: int
    moe_intermediate_size: int
    bytes_per_param: float = 2.0
    dense_layer_s: float = 40e-6
    activation_bytes: float = 2.0

    @classmethod
    def named(cls, name: str) -> ModelShape:
        d = json.loads((resources.files("moeplace") / _DATA / "models.json").read_text())
        if name not in d or name.startswith("_"):
            raise InputError("--model-shape", "name", f"unknown model {name!r}",
                             f"use one of {sorted(k for k in d if not k.startswith('_'))}")
        return cls(**{k: v for k, v in d[name].items() if k in cls.__dataclass_fields__})

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size


def guess_shape(model: str) -> str | None:
    """Map a trace's model name to a bundled model shape, if one matches."""
    m = model.lower().replace("_", "-")
    for key in ("deepseek-v2-lite", "deepseek-v3", "kimi-k2", "mixtral", "qwen1.5-moe",
                "qwen15-moe", "flame-moe-290m", "switch"):
        if key in m:
            return {"mixtral": "mixtral-8x7b", "qwen15-moe": "qwen1.5-moe-a2.7b",
                    "qwen1.5-moe": "qwen1.5-moe-a2.7b", "switch": "switch-base-128"}.get(key, key)
    return None


def step_time(trace: Trace, placement: Placement, hw: Hardware, shape: ModelShape,
              tokens_per_step: int = 4096,
              gpu_speeds: str | np.ndarray | list[float] | None = None, *,
              kernel: str | None = None) -> dict[str, Any]:
    """Mean estimated step time (s) over windows, with its compute and communication parts.

    ``gpu_speeds`` (else the profile's ``gpu_speeds``, else equal) divides each GPU's expert
    compute time by its speed. ``kernel`` (``solvers.dispatch.KERNELS``) prices each layer's
    dispatch and combine by that kernel's counting rule and the profile's fitted parameters
    (``dispatch.price``, the model ``moeplace simulate`` reports), and adds ``dispatch_s`` and
    ``combine_s`` (the slowest rank's, mean per layer); without it, the alpha-beta rule above."""
    from moeplace.solvers.dispatch import check_kernel, price, volumes
    from moeplace.solvers.evaluator import _Resolver, check_compatible, home_gpus

    if kernel is not None:
        check_kernel(kernel, "--dispatch")

    check_compatible(placement, trace.num_layers, trace.num_experts, trace.meta.source or "trace")
    if tokens_per_step < 1:
        raise InputError("simulate", "tokens_per_step", f"{tokens_per_step} < 1", "use >= 1")
    G, n = placement.num_gpus, placement.gpus_per_node
    L, N = trace.num_layers, trace.num_experts
    if gpu_speeds is not None:
        flag = isinstance(gpu_speeds, str)
        speeds = parse_gpu_speeds(gpu_speeds, G, "--gpu-speeds" if flag else "simulate",
                                  "value" if flag else "gpu_speeds")
    elif hw.gpu_speeds is not None:
        speeds = parse_gpu_speeds(list(hw.gpu_speeds), G, hw.source or hw.name, "gpu_speeds")
    else:
        speeds = np.ones(G)
    w_time = shape.expert_params * shape.bytes_per_param / (hw.hbm_bytes_per_s * hw.memory_efficiency)
    flop_rate = hw.bf16_flops * hw.matmul_efficiency
    tok_bytes = shape.hidden_size * shape.activation_bytes
    homes = home_gpus(trace.request_ids(), G)  # the evaluator's static-model homes
    res = _Resolver(placement)
    totals = {"step_s": 0.0, "compute_s": 0.0, "comm_s": 0.0}
    if kernel is not None:
        totals |= {"dispatch_s": 0.0, "combine_s": 0.0}
    M = G // n
    steps = 0
    for s0 in range(0, trace.num_tokens, tokens_per_step):
        e = trace.experts[s0:s0 + tokens_per_step]
        h = homes[s0:s0 + tokens_per_step]
        step = L * shape.dense_layer_s
        comp_sum = comm_sum = 0.0
        for l in range(L):
            g = res.layer(l, e[:, l], h)  # [T, k] GPU serving each expert
            # tokens per (GPU, expert) -> per-expert roofline time
            key = g * N + e[:, l].astype(np.int64)
            cnt = np.bincount(key.ravel(), minlength=G * N).reshape(G, N)
            t_exp = np.where(cnt > 0, np.maximum(w_time, 2 * shape.expert_params * cnt / flop_rate)
                             + hw.expert_launch_s, 0.0)
            compute = t_exp.sum(axis=1) / speeds
            if kernel is not None:
                vol = volumes(g, h, G, n, kernel)
                t_d = price(vol, kernel, hw, shape.hidden_size, "dispatch", M)
                t_c = price(vol, kernel, hw, shape.hidden_size, "combine", M)
                totals["dispatch_s"] += float(t_d.max()) / L
                totals["combine_s"] += float(t_c.max()) / L
                total = compute + t_d + t_c
                slow = int(np.argmax(total))
                step += total[slow]
                comp_sum += compute[slow]
                comm_sum += t_d[slow] + t_c[slow]
                continue
            # distinct remote GPUs per token: one activation out and one result back each
            srt = np.sort(g, axis=1)
            first = np.ones_like(srt, bool)
            first[:, 1:] = srt[:, 1:] != srt[:, :-1]
            remote = first & (srt != h[:, None])
            dst = srt[remote]
            src = np.repeat(h, remote.sum(axis=1))
            same_node = (dst // n) == (src // n)
            out_nv = np.bincount(src[same_node], minlength=G)
            out_net = np.bincount(src[~same_node], minlength=G)
            in_nv = np.bincount(dst[same_node], minlength=G)
            in_net = np.bincount(dst[~same_node], minlength=G)
            # dispatch + combine: each GPU both sends and receives in each phase
            nv = np.maximum(out_nv, in_nv) * tok_bytes / hw.nvlink_bytes_per_s
            net = np.maximum(out_net, in_net) * tok_bytes / (
                hw.network_bytes_per_s * hw.network_efficiency)
            comm = 2 * (np.where(out_nv + in_nv > 0, hw.nvlink_alpha_s, 0) + nv
                        + np.where(out_net + in_net > 0, hw.network_alpha_s, 0) + net)
            total = compute + comm
            slow = int(np.argmax(total))
            step += total[slow]
            comp_sum += compute[slow]
            comm_sum += comm[slow]
        totals["step_s"] += step
        totals["compute_s"] += comp_sum
        totals["comm_s"] += comm_sum
        steps += 1
    return {k: v / steps for k, v in totals.items()} | {"steps": steps,
                                                        "tokens_per_step": tokens_per_step,
                                                        "kernel": kernel}


def speedup(trace: Trace, placement: Placement, baseline: Placement, hw: Hardware,
            shape: ModelShape, tokens_per_step: int = 4096) -> float:
    """Estimated step-time speedup of ``placement`` over ``baseline`` (> 1 is faster)."""
    a = step_time(trace, placement, hw, shape, tokens_per_step)["step_s"]
    b = step_time(trace, baseline, hw, shape, tokens_per_step)["step_s"]
    return b / a

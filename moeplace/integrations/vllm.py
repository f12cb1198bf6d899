"""vLLM general plug-in: make vLLM's EPLB call moeplace's online policy.

Loaded by vLLM itself in every process (``vllm.general_plugins`` entry point ``moeplace``).
It does nothing unless ``MOEPLACE_VLLM_POLICY`` is set (``1``, or a placement JSON to land at
the first rebalance). Launch::

    MOEPLACE_VLLM_POLICY=1 vllm serve MODEL --enable-expert-parallel --enable-eplb \\
        --eplb-config '{"window_size":1000,"step_interval":3000,"num_redundant_experts":32}'

Hook: vLLM 0.34.0 validates ``--eplb-config '{"policy": ...}'`` against
``EPLBPolicyOption = Literal["default"]`` (and async EPLB requires ``"default"``), so a new
policy name cannot be selected; ``EplbState.add_model`` looks the class up at run time as
``EPLB_POLICIES[policy]``. The plug-in therefore replaces the ``"default"`` entry with a class
that has vLLM's ``AbstractEplbPolicy.rebalance_experts`` signature. Every EP rank calls the
policy with the same all-reduced load and current map, so the policy must be deterministic.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

ENV = "MOEPLACE_VLLM_POLICY"
SUPPORTED = ("0.34.0",)
SIGNATURE = ("cls", "weight", "num_replicas", "num_groups", "num_nodes", "num_ranks",
             "old_global_expert_indices")


class UnsupportedEngineError(RuntimeError):
    """The installed vLLM's EPLB interface is not one this plug-in knows."""


def check_interface() -> Any:
    """The installed ``vllm.distributed.eplb.policy`` module, after checking its version and
    the ``rebalance_experts`` signature; ``UnsupportedEngineError`` (one line) otherwise."""
    import vllm
    from vllm.distributed.eplb import policy as pol

    version = getattr(vllm, "__version__", "unknown")
    where = f"vLLM {version}"
    if version not in SUPPORTED:
        raise UnsupportedEngineError(f"moeplace: error: {where}: EPLB policy interface is not "
                                     f"known (supported: vLLM {', '.join(SUPPORTED)})")
    base = getattr(pol, "AbstractEplbPolicy", None)
    table = getattr(pol, "EPLB_POLICIES", None)
    fn = getattr(base, "rebalance_experts", None)
    if not isinstance(table, dict) or "default" not in table or fn is None:
        raise UnsupportedEngineError(f"moeplace: error: {where}: no EPLB_POLICIES['default'] / "
                                     f"AbstractEplbPolicy.rebalance_experts (supported: vLLM "
                                     f"{', '.join(SUPPORTED)})")
    params = tuple(inspect.signature(base.__dict__["rebalance_experts"].__func__).parameters)
    if params != SIGNATURE:
        raise UnsupportedEngineError(f"moeplace: error: {where}: rebalance_experts{params} differs "
                                     f"from {SIGNATURE} (supported: vLLM {', '.join(SUPPORTED)})")
    return pol


def register() -> None:
    """vLLM entry point: install moeplace's policy when ``MOEPLACE_VLLM_POLICY`` is set."""
    spec = os.environ.get(ENV, "").strip()
    if not spec or spec == "0":
        return
    try:
        pol = check_interface()
    except UnsupportedEngineError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None
    if getattr(pol.EPLB_POLICIES["default"], "_moeplace", False):
        return  # plug-ins may load several times per process
    pol.EPLB_POLICIES["default"] = make_policy_class(pol.AbstractEplbPolicy,
                                                     None if spec == "1" else spec)
    from moeplace.solvers import _online_kernels

    _online_kernels.warm()  # at start-up, not at the first rebalance


def make_policy_class(base: type, placement_path: str | None) -> type:
    """A subclass of vLLM's ``AbstractEplbPolicy`` whose ``rebalance_experts`` runs moeplace's
    online policy, one instance per cluster shape per process (its decayed history persists
    across calls). A call with no load (vLLM's profile run) carries no information: it returns
    the current map (or the pending placement) and teaches the policy nothing."""
    import numpy as np
    import torch

    target: dict[str, Any] = {"phy2log": None}
    if placement_path is not None:
        from moeplace.placement import Placement
        target["phy2log"] = Placement.load(placement_path).phy2log
    policies: dict[tuple[int, ...], Any] = {}

    def rebalance(cls: type, weight: torch.Tensor, num_replicas: int, num_groups: int,
                  num_nodes: int, num_ranks: int,
                  old_global_expert_indices: torch.Tensor | None = None) -> torch.Tensor:
        load = weight.float().cpu().numpy().astype(np.float64)
        L, N = load.shape
        cur = None
        if old_global_expert_indices is not None:
            c = old_global_expert_indices.cpu().numpy().astype(np.int64)
            if c.shape == (L, num_replicas) and (c >= 0).all():
                cur = c
        want = target["phy2log"]
        if want is not None:
            if want.shape != (L, num_replicas) or int(want.max()) >= N:
                raise ValueError(f"moeplace: error: {placement_path}: phy2log: shape "
                                 f"{tuple(want.shape)} does not match vLLM's [{L}, {num_replicas}]"
                                 f" over {N} experts (solve for this model and cluster)")
            if load.sum() > 0 or (cur is not None and (cur == want).all()):
                target["phy2log"] = None
            return torch.from_numpy(want.copy())
        if load.sum() <= 0:
            return torch.from_numpy(cur.copy() if cur is not None
                                    else np.arange(num_replicas)[None, :].repeat(L, 0) % N)
        if num_groups % num_nodes:  # vLLM's default falls back to a flat solve here too
            num_groups, num_nodes = 1, 1
        key = (L, N, num_replicas, num_groups, num_nodes, num_ranks)
        if key not in policies:
            from moeplace.solvers.online import OnlinePolicy
            policies[key] = OnlinePolicy(num_ranks, num_nodes, num_groups,
                                         allow_colocated_copies=True)
        if cur is None:
            cur = np.arange(num_replicas)[None, :].repeat(L, 0) % N
        d = policies[key].step(load, cur)
        return torch.from_numpy(np.asarray(d.phy2log, dtype=np.int64).copy())

    return type("MoeplaceEplbPolicy", (base,), {"_moeplace": True,
                                                "rebalance_experts": classmethod(rebalance)})

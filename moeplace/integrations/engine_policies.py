"""The serving engines' own EPLB algorithms as replay policies (``moeplace replay --policy
vllm|sglang``).

Each adapter imports the installed engine's module and calls its function; nothing of the
engines' code is copied here. When the engine cannot be imported (not installed, or installed
without what its EPLB module needs) or its interface is not the one this adapter knows, the
policy is refused with one line (``InputError`` on ``--policy``), never replaced by a look-alike.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.solvers.replay import ENGINE_POLICIES, Observation, ReplayPolicy, builtin_policy
from moeplace.traces.phase import PhaseSelection

__all__ = ["SglangPolicy", "VllmDefaultPolicy", "make_policy"]

VLLM_SIGNATURE = ("weight", "num_replicas", "num_groups", "num_nodes", "num_ranks",
                  "old_global_expert_indices")
SGLANG_SIGNATURE = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts",
                    "num_groups", "num_nodes", "algorithm")


def _refuse(engine: str, why: str, fix: str) -> InputError:
    return InputError("--policy", engine, why, fix)


class VllmDefaultPolicy:
    """vLLM's ``DefaultEplbPolicy.rebalance_experts`` from the installed vLLM, called as
    ``EplbState.rearrange`` calls it: the window's load, the physical slot count, the model's
    groups, nodes, ranks and the current map (its slot preservation on)."""

    name = "vllm"

    def __init__(self) -> None:
        try:
            import torch
            import vllm
            from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
        except Exception as exc:  # any import failure means: not runnable here
            raise _refuse("vllm", f"the installed vLLM cannot be imported ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})",
                          "install vllm (0.34.0 tested) or put its directory on PYTHONPATH"
                          ) from None
        params = tuple(inspect.signature(DefaultEplbPolicy.rebalance_experts).parameters)
        if params != VLLM_SIGNATURE:
            raise _refuse("vllm", f"vLLM {vllm.__version__}: rebalance_experts{params} differs "
                          f"from {VLLM_SIGNATURE}", "use vLLM 0.34.0")
        self._torch = torch
        self._cls = DefaultEplbPolicy
        self.source = (f"vLLM {vllm.__version__} DefaultEplbPolicy.rebalance_experts (the "
                       "installed engine's own code)")

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        torch = self._torch
        _L, P = obs.current.shape
        out = self._cls.rebalance_experts(torch.from_numpy(obs.window.astype(np.float32)), P,
                                          obs.num_groups, obs.num_nodes, obs.num_gpus,
                                          torch.from_numpy(obs.current.copy()))
        return np.asarray(out.cpu().numpy(), np.int64), True


class SglangPolicy:
    """SGLang's ``eplb_algorithms.rebalance_experts`` from the installed SGLang (its
    ``deepseek`` algorithm, hierarchical where the groups divide over the nodes, as SGLang's
    ``auto`` picks), on the window's load. SGLang keeps no slots: its map is used as returned."""

    name = "sglang"

    def __init__(self) -> None:
        try:
            import sglang
            import torch
            from sglang.srt.eplb import eplb_algorithms as alg
        except Exception as exc:
            raise _refuse("sglang", f"the installed SGLang cannot be imported ({type(exc).__name__}"
                          f": {str(exc).splitlines()[0] if str(exc) else ''})",
                          "install sglang (0.5.23 tested) or put its directory on PYTHONPATH"
                          ) from None
        fn = getattr(alg, "rebalance_experts", None)
        params = tuple(inspect.signature(fn).parameters) if fn is not None else ()
        if params != SGLANG_SIGNATURE or not hasattr(alg, "EplbAlgorithm"):
            raise _refuse("sglang", f"SGLang {getattr(sglang, '__version__', '?')}: "
                          f"rebalance_experts{params} differs from {SGLANG_SIGNATURE}",
                          "use SGLang 0.5.23")
        self._torch, self._alg = torch, alg
        self.source = (f"SGLang {getattr(sglang, '__version__', '?')} eplb_algorithms."
                       "rebalance_experts (the installed engine's own code)")

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        _L, P = obs.current.shape
        hier = obs.num_groups % obs.num_nodes == 0 and obs.num_nodes > 1
        algo = self._alg.EplbAlgorithm.deepseek_hierarchical if hier else \
            self._alg.EplbAlgorithm.deepseek
        out = self._alg.rebalance_experts(self._torch.from_numpy(obs.window.astype(np.float32)),
                                          P, P // obs.num_gpus, obs.num_groups, obs.num_nodes,
                                          algo)
        phy = out[0] if isinstance(out, tuple) else out
        return np.asarray(phy.cpu().numpy(), np.int64), True


def make_policy(name: str, num_gpus: int, num_nodes: int, num_groups: int, *,
                expert_bytes: int = 0, hardware: Any = None,
                phase: str = "prefill") -> ReplayPolicy:
    """A replay policy by its ``--policy`` name: the engines' own here, the rest built in
    (``phase`` goes to moeplace's policy; the engines' EPLB has no phase)."""
    if name == "vllm":
        return VllmDefaultPolicy()
    if name == "sglang":
        return SglangPolicy()
    assert name not in ENGINE_POLICIES
    return builtin_policy(name, num_gpus, num_nodes, num_groups, expert_bytes=expert_bytes,
                          hardware=hardware, phase=phase)


def run_replay(source: Any, policies: str, *, num_gpus: int, num_nodes: int = 1,
               replicas: int = 0, num_groups: int | None = None, interval: int = 4096,
               window: int | None = None, order: str = "arrival", expert_bytes: int = 0,
               hardware: str = "h100-nvlink", out: str | None = None,
               plot_path: str | None = None, phase: PhaseSelection | None = None) -> Any:
    """``moeplace replay``: build the named policies (comma separated), replay ``source``
    through all of them in one pass, write ``out`` and ``plot_path`` if given; returns the
    ``ReplayResult``. ``phase``: the instance replayed (``moeplace.traces.select_phase``; its
    ``source`` is what is replayed), recorded in the result's setup and given to moeplace's
    policy."""
    from moeplace.solvers.replay import POLICIES, check_shape, plot, replay, write_placements
    from moeplace.solvers.simulator import Hardware

    names = [p.strip() for p in policies.split(",")]
    for n in names:
        if n not in POLICIES:
            raise InputError("--policy", "value", f"{n!r} is not a policy",
                             f"use one or several of {','.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise InputError("--policy", "value", "a policy is named twice", "name each once")
    hw = Hardware.load(hardware)
    if plot_path is not None:  # before any work, so a missing extra leaves nothing written
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from moeplace.errors import MissingDependencyError

            raise MissingDependencyError("matplotlib", "--plot", "plot") from None
    meta = source.meta
    check_shape(num_gpus, num_nodes, replicas, meta.num_layers, meta.num_experts,
                meta.source or "trace")  # before an engine's slow import
    groups = 1 if num_groups is None else int(num_groups)
    pols = [make_policy(n, num_gpus, num_nodes, groups, expert_bytes=expert_bytes, hardware=hw,
                        phase="prefill" if phase is None else phase.phase) for n in names]
    res = replay(source, pols, num_gpus=num_gpus, num_nodes=num_nodes, replicas=replicas,
                 num_groups=num_groups, interval=interval, window=window, order=order,
                 expert_bytes=expert_bytes, hardware=hw)
    if phase is not None:  # before summary.json is written
        res.setup["phase"] = phase.as_dict()
    if out is not None:
        write_placements(res, out)
    if plot_path is not None:
        plot(res, plot_path)
    return res

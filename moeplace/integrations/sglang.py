"""SGLang: make SGLang's EPLB run moeplace's online policy.

Two ways in, both ending in the same hook:

* the ``sglang.srt.plugins`` entry point ``moeplace`` (SGLang calls ``load_plugins()`` in the
  engine and in every scheduler process), active when ``MOEPLACE_SGLANG_POLICY`` is set
  (``1``, or a placement JSON that the first rebalance lands);
* ``python -m moeplace.integrations.sglang <sglang.launch_server arguments>``, which sets
  ``MOEPLACE_SGLANG_POLICY=1`` unless it is set, checks the installed SGLang, installs the hook
  in its own process and runs ``sglang.launch_server``. The scheduler processes SGLang spawns
  re-import everything, so there the entry point (installed with the package) re-installs it.

Hook: ``ExpertLocationMetadata.init_by_eplb`` (every rebalance of ``--enable-eplb``, and
``--init-expert-location`` given a ``logical_count``) does ``from sglang.srt.eplb import
eplb_algorithms`` and calls ``eplb_algorithms.rebalance_experts(tokens_per_expert=...,
num_physical_experts=..., num_local_physical_experts=..., num_groups=..., num_nodes=...,
algorithm=...)`` at call time, expecting ``(phy2log [L, P], log2phy [L, N, K], logcnt [L, N])``
over the model's hidden layers. SGLang has no registry for ``--eplb-algorithm`` (an enum), so
the hook replaces that module attribute; ``--eplb-algorithm`` is then ignored. SGLang passes
no current map: the hook reads the one being served (``get_global_expert_location_metadata``)
and falls back to the last map it returned. Every rank computes with the same all-reduced
counts, and the policy is deterministic, so ranks agree.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

ENV = "MOEPLACE_SGLANG_POLICY"
SUPPORTED = ("0.5.23",)
ALGORITHM_SIGNATURE = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts",
                       "num_groups", "num_nodes", "algorithm")
INIT_BY_EPLB_SIGNATURE = ("model_config", "logical_count", "use_flat_topology")


class UnsupportedEngineError(RuntimeError):
    """The installed SGLang's EPLB interface is not one this hook knows."""


def _refuse(where: str, problem: str) -> UnsupportedEngineError:
    return UnsupportedEngineError(f"moeplace: error: {where}: {problem} (supported: SGLang "
                                  f"{', '.join(SUPPORTED)})")


def check_interface() -> Any:
    """The installed ``sglang.srt.eplb.eplb_algorithms`` module, after checking SGLang's version,
    ``rebalance_experts``' parameters and ``ExpertLocationMetadata.init_by_eplb``'s (the caller
    that looks the function up at call time); ``UnsupportedEngineError`` (one line) otherwise."""
    try:
        import sglang
        version = getattr(sglang, "__version__", "unknown")
    except Exception as e:  # SGLang absent or broken: same one line
        raise _refuse("SGLang", f"cannot be imported ({type(e).__name__}: {e})") from None
    where = f"SGLang {version}"
    if version not in SUPPORTED:
        raise _refuse(where, "EPLB algorithm interface is not known")
    try:
        from sglang.srt.eplb import eplb_algorithms as ea
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    except Exception as e:
        raise _refuse(where, f"EPLB modules do not import ({type(e).__name__}: {e})") from None
    fn = getattr(ea, "_moeplace_original", getattr(ea, "rebalance_experts", None))
    init = getattr(ExpertLocationMetadata, "init_by_eplb", None)
    if fn is None or init is None:
        raise _refuse(where, "no eplb_algorithms.rebalance_experts / "
                      "ExpertLocationMetadata.init_by_eplb")
    params = tuple(inspect.signature(fn).parameters)
    if params != ALGORITHM_SIGNATURE:
        raise _refuse(where, f"rebalance_experts{params} differs from {ALGORITHM_SIGNATURE}")
    params = tuple(inspect.signature(init).parameters)
    if params != INIT_BY_EPLB_SIGNATURE:
        raise _refuse(where, f"init_by_eplb{params} differs from {INIT_BY_EPLB_SIGNATURE}")
    return ea


def register() -> None:
    """SGLang entry point (``sglang.srt.plugins``): install the hook when ``MOEPLACE_SGLANG_POLICY``
    is set. SGLang logs and swallows exceptions from plug-ins, so a refusal exits the process
    with the one line, rather than serving silently with SGLang's own algorithm."""
    spec = os.environ.get(ENV, "").strip()
    if not spec or spec == "0":
        return
    try:
        install(None if spec == "1" else spec)
    except UnsupportedEngineError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None
    from moeplace.solvers import _online_kernels

    _online_kernels.warm()  # at start-up, not at the first rebalance


def install(placement_path: str | None = None) -> None:
    """Replace ``eplb_algorithms.rebalance_experts`` with moeplace's policy (idempotent)."""
    ea = check_interface()
    if getattr(ea.rebalance_experts, "_moeplace", False):
        return
    fn = make_algorithm(placement_path)
    ea._moeplace_original = ea.rebalance_experts
    ea.rebalance_experts = fn


def _served_map(L: int, P: int) -> Any:
    """The phy2log SGLang serves now, or None outside a running server."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
        m = get_global_expert_location_metadata()
        cur = m.physical_to_logical_map_cpu.numpy()
    except Exception:  # no runtime context (offline init) or no metadata yet
        return None
    return cur if cur.shape == (L, P) and (cur >= 0).all() else None


def make_algorithm(placement_path: str | None) -> Any:
    """A function with ``eplb_algorithms.rebalance_experts``' signature running moeplace's
    online policy (one instance per cluster shape per process; its history persists)."""
    import numpy as np
    import torch

    target: dict[str, Any] = {"phy2log": None, "last": None}
    if placement_path is not None:
        from moeplace.placement import Placement
        target["phy2log"] = Placement.load(placement_path).phy2log
    policies: dict[tuple[int, ...], Any] = {}

    def rebalance_experts(tokens_per_expert: torch.Tensor, num_physical_experts: int,
                          num_local_physical_experts: int, num_groups: int | None, num_nodes: int,
                          algorithm: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = tokens_per_expert
        load = (t.sum(dim=0) if t.dim() == 3 else t).double().cpu().numpy()
        L, N = load.shape
        P = int(num_physical_experts)
        G = P // int(num_local_physical_experts)
        cur = _served_map(L, P)
        if cur is None and target["last"] is not None and target["last"].shape == (L, P):
            cur = target["last"]
        want = target["phy2log"]
        if want is not None:
            if want.shape != (L, P) or int(want.max()) >= N:
                raise ValueError(f"moeplace: error: {placement_path}: phy2log: shape "
                                 f"{tuple(want.shape)} does not match SGLang's [{L}, {P}] over {N}"
                                 " experts (solve for this model and cluster, num_hidden_layers rows)")
            target["phy2log"] = None
            new = np.asarray(want, np.int64)
        else:
            groups, nodes = int(num_groups or 1), int(num_nodes)
            if groups % nodes:  # SGLang's ``auto`` goes flat here too
                groups, nodes = 1, 1
            key = (L, N, P, G, groups, nodes)
            if key not in policies:
                from moeplace.solvers.online import OnlinePolicy
                policies[key] = OnlinePolicy(G, nodes, groups, allow_colocated_copies=True,
                                             num_slots=P)
            if load.sum() <= 0 and cur is not None:
                new = cur
            else:
                new = np.asarray(policies[key].step(load, cur).phy2log, np.int64)
        target["last"] = new.copy()
        return _as_sglang(new, N)

    rebalance_experts._moeplace = True  # type: ignore[attr-defined]
    return rebalance_experts


def _as_sglang(phy2log: Any, num_logical: int) -> tuple[Any, Any, Any]:
    """``(phy2log, log2phy, logcnt)`` as SGLang's deepseek algorithm returns them: int64, log2phy
    padded with -1 to the largest copy count, an expert's slots in increasing order."""
    import numpy as np
    import torch

    phy = np.asarray(phy2log, np.int64)
    L, P = phy.shape
    cnt = np.zeros((L, num_logical), np.int64)
    np.add.at(cnt, (np.arange(L)[:, None], phy), 1)
    log2phy = np.full((L, num_logical, int(cnt.max())), -1, np.int64)
    fill = np.zeros((L, num_logical), np.int64)
    for p in range(P):
        e = phy[:, p]
        log2phy[np.arange(L), e, fill[np.arange(L), e]] = p
        fill[np.arange(L), e] += 1
    return torch.from_numpy(phy.copy()), torch.from_numpy(log2phy), torch.from_numpy(cnt)


def main(argv: list[str] | None = None) -> None:
    """``python -m moeplace.integrations.sglang ARGS``: ``sglang.launch_server ARGS`` with
    moeplace's policy as SGLang's EPLB algorithm."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault(ENV, "1")
    spec = os.environ[ENV].strip()
    try:
        install(None if spec in ("1", "") else spec)
    except UnsupportedEngineError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None
    if "--enable-eplb" not in args and not {"-h", "--help"} & set(args):
        print("moeplace: warning: without --enable-eplb SGLang never rebalances; moeplace's "
              "policy runs only at launch with --init-expert-location", file=sys.stderr)
    import runpy
    sys.argv = ["sglang.launch_server", *args]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

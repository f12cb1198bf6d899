"""The service's rebalancing decision: the same online policy the engines run
(``moeplace.solvers.online.OnlinePolicy``), fed the deployment's recent windows oldest first, from
the placement marked current. ``drift`` reports it (``online``; ``method=online`` makes it the
recommendation) and scheduled re-solves store its map as a new version only when it rebalances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.online import OnlinePolicy


def online_decision(window_loads: list[np.ndarray], current: Placement, spec: dict[str, Any]
                    ) -> tuple[dict[str, Any], Placement]:
    """``(answer, map)``: the policy's decision after observing each of ``window_loads``
    (``[L, N]`` counts, oldest first) while ``current`` is served. ``answer`` has
    ``rebalance``, ``recommendation`` (``rebalance``/``keep``), ``moved_copies`` (copies a GPU
    receives, vLLM's count), ``moves`` (the minimal move set: every slot whose expert changes,
    ``{layer, slot, gpu, from_expert, to_expert}``), ``expected_gain``, ``stall_s``,
    ``reason``, ``cpu_s``, ``decay``, ``windows``."""
    pol = OnlinePolicy(current.num_gpus, current.num_nodes, expert_bytes=int(spec.get("expert_bytes") or 0),
                       hardware=spec.get("hardware") or None, allow_colocated_copies=current.colocated)
    cur = current.phy2log
    d = None
    for load in window_loads:
        d = pol.step(np.asarray(load, np.float64), cur)  # decisions before the last are not taken
    assert d is not None, "no window to decide on"
    new = np.asarray(d.phy2log, np.int64)
    S = current.slots_per_gpu
    layers, slots = np.nonzero(new != cur)
    moves = [{"layer": int(l), "slot": int(p), "gpu": int(p // S), "from_expert": int(cur[l, p]),
              "to_expert": int(new[l, p])} for l, p in zip(layers, slots, strict=True)]
    answer = {
        "rebalance": bool(d.rebalance), "recommendation": "rebalance" if d.rebalance else "keep",
        "moved_copies": int(d.moved_copies), "moves": moves,
        "expected_gain": float(d.expected_gain), "stall_s": float(d.stall_s),
        "reason": d.reason, "cpu_s": float(d.cpu_s), "decay": float(d.info.get("decay", 0.0)),
        "windows": len(window_loads),
    }
    plc = Placement(new, current.num_gpus, current.num_nodes, current.num_experts,
                    current.moe_layer_ids, colocated=current.colocated)
    return answer, plc

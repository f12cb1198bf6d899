"""The objective every solver optimises, scored from statistics: weighted load, traffic and migration.

The traffic terms follow the engine the placement is for (``ENGINES``):

- ``sglang``, ``vllm``, ``trtllm`` (static home, DeepEP dispatch; the default):
  ``traffic * traffic_static / k + node * traffic_static_remote_nodes / min(k, M - 1)``, remote
  GPUs and nodes per token and layer, estimated on the statistics' token sample
  (``solvers.static``);
- ``exflow`` (follow home, MoETuner's cross-layer view): ``traffic * cross-GPU pair fraction
  + node * cross-node pair fraction``.

Both add ``load * mean_l(max GPU load / mean GPU load) + coact * co-activation spread
+ migration * (expert copies moved / slots)``. The co-activation spread is the share of a
token's within-layer expert pairs on different GPUs. Each term is also reported alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.cost import expert_cost
from moeplace.solvers.evaluator import (
    coactivation_spread,
    gpu_loads_from_stats,
    imbalance,
    migration,
    pair_fractions,
)
from moeplace.solvers.static import static_terms
from moeplace.traces import RoutingStats

STATIC_ENGINES = ("sglang", "vllm", "trtllm")
ENGINES = (*STATIC_ENGINES, "exflow")
DEFAULT_ENGINE = "sglang"


def check_engine(engine: str) -> None:
    """One-line error for an unknown engine name."""
    from moeplace.errors import InputError

    if engine not in ENGINES:
        raise InputError("solve", "--engine", f"unknown engine {engine!r}",
                         f"use one of {', '.join(ENGINES)}")


@dataclass(frozen=True)
class Weights:
    """Weights of the objective's terms (all dimensionless)."""

    load: float = 1.0
    traffic: float = 1.0
    node: float = 1.0
    migration: float = 0.0
    coact: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Weights:
        """Parse ``"load=1,traffic=2,node=1,migration=0.1"`` (omitted keys keep defaults)."""
        from moeplace.errors import InputError

        if not text:
            return cls()
        vals: dict[str, float] = {}
        for part in text.split(","):
            key, _, val = part.partition("=")
            key = key.strip()
            if key not in cls.__dataclass_fields__:
                raise InputError("--weights", key or part, "unknown term",
                                 "use load=,traffic=,node=,coact=,migration=")
            try:
                vals[key] = float(val)
            except ValueError:
                raise InputError("--weights", key, f"{val!r} is not a number",
                                 "e.g. --weights load=1,traffic=2") from None
            if not math.isfinite(vals[key]) or vals[key] < 0:
                raise InputError("--weights", key, f"{val!r} is not a finite number >= 0",
                                 "weights are finite and >= 0")
        return cls(**vals)


@dataclass
class ObjectiveValue:
    """The objective's total and each term."""

    total: float
    load_imbalance_mean: float
    cross_gpu_pair_fraction: float
    cross_node_pair_fraction: float
    migration_fraction: float
    coactivation_spread: float = 0.0
    traffic_static: float = 0.0
    traffic_static_remote_nodes: float = 0.0
    engine: str = "exflow"
    # phase "decode": the load term is the expected per-step active-experts imbalance instead
    active_experts_imbalance: float | None = None
    phase: str = "prefill"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(stats: RoutingStats, placement: Placement, weights: Weights = Weights(),
          current: Placement | None = None, engine: str = "exflow", phase: str = "prefill",
          tokens_per_step: int = 4096, gpu_speeds: np.ndarray | None = None) -> ObjectiveValue:
    """Objective of ``placement`` on ``stats`` for ``engine`` (replica loads split evenly
    across copies). Every term is computed whatever the engine; the engine picks which traffic
    terms make up the total. ``phase="decode"`` balances the expected active experts per step
    of ``tokens_per_step`` tokens (``cost.expert_cost``) instead of tokens; ``gpu_speeds``
    makes both imbalances speed-aware (``max_g(x_g / s_g) / (sum x / sum s)``)."""
    imb = float(imbalance(gpu_loads_from_stats(stats.load, placement), gpu_speeds).mean())
    act = None
    if phase == "decode":
        cost = expert_cost(stats, phase, tokens_per_step)
        act = float(imbalance(gpu_loads_from_stats(cost, placement), gpu_speeds).mean())
    ts = static_terms(stats, placement)
    rg, rn = ts if ts is not None else (0.0, 0.0)
    cg = cn = 0.0
    if stats.transitions is not None and stats.num_layers > 1:
        pf = pair_fractions(stats.transitions, placement)
        tot = float(pf["pairs"].sum())
        if tot:
            cg = float(pf["cross_gpu_pairs"].sum()) / tot
            cn = float(pf["cross_node_pairs"].sum()) / tot
    co = coactivation_spread(stats.coactivation, placement) if stats.coactivation is not None else 0.0
    mig = 0.0
    if current is not None:
        mig = migration(placement, current)["copies_transferred"] / placement.phy2log.size
    if engine in STATIC_ENGINES:
        k = max(stats.meta.top_k, 1)
        M = placement.num_nodes
        traffic = weights.traffic * rg / k + (weights.node * rn / min(k, M - 1) if M > 1 else 0.0)
    else:
        traffic = weights.traffic * cg + weights.node * cn
    balance = imb if act is None else act
    total = weights.load * balance + traffic + weights.migration * mig + weights.coact * co
    return ObjectiveValue(total, imb, cg, cn, mig, co, rg, rn, engine, act, phase)


def layer_pair_totals(stats: RoutingStats) -> np.ndarray:
    """Transition pairs per consecutive layer pair (denominators of the traffic terms)."""
    t = stats.require_transitions()
    return t.sum(axis=(1, 2)).astype(np.float64)

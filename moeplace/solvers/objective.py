"""The objective every solver optimises, scored from statistics: weighted load, traffic and migration.

``total = load * mean_l(max GPU load / mean GPU load) + traffic * cross-GPU pair fraction
+ node * cross-node pair fraction + coact * co-activation spread + migration * (expert copies
moved / slots)``. The co-activation spread is the share of a token's within-layer expert pairs
on different GPUs (what the ``static`` home model pays for). Each term is also reported alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.evaluator import (
    coactivation_spread,
    gpu_loads_from_stats,
    imbalance,
    migration,
    pair_fractions,
)
from moeplace.traces import RoutingStats


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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(stats: RoutingStats, placement: Placement, weights: Weights = Weights(),
          current: Placement | None = None) -> ObjectiveValue:
    """Objective of ``placement`` on ``stats`` (replica loads split evenly across copies)."""
    imb = float(imbalance(gpu_loads_from_stats(stats.load, placement)).mean())
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
    total = (weights.load * imb + weights.traffic * cg + weights.node * cn
             + weights.migration * mig + weights.coact * co)
    return ObjectiveValue(total, imb, cg, cn, mig, co)


def layer_pair_totals(stats: RoutingStats) -> np.ndarray:
    """Transition pairs per consecutive layer pair (denominators of the traffic terms)."""
    t = stats.require_transitions()
    return t.sum(axis=(1, 2)).astype(np.float64)

"""Solvers: placement search, baselines, lower bounds, and the evaluator that scores placements."""

from moeplace.solvers.evaluator import (
    EvalResult,
    Evaluator,
    evaluate,
    evaluate_stats,
    migration,
    pair_fractions,
)

__all__ = ["EvalResult", "Evaluator", "evaluate", "evaluate_stats", "migration", "pair_fractions"]

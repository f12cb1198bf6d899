"""Solvers: placement search, baselines, lower bounds, and the evaluator that scores placements."""

from moeplace.solvers.evaluator import (
    EvalResult,
    Evaluator,
    evaluate,
    evaluate_many,
    evaluate_stats,
    migration,
    pair_fractions,
)

__all__ = ["EvalResult", "Evaluator", "evaluate", "evaluate_many", "evaluate_stats", "migration",
           "pair_fractions"]

from moeplace.solvers.baselines import eplb
from moeplace.solvers.bounds import lower_bound
from moeplace.solvers.objective import Weights, score
from moeplace.solvers.solve import Cluster, SolveReport, pareto, solve, solve_with_report

__all__ += ["Cluster", "SolveReport", "Weights", "eplb", "lower_bound", "pareto", "score", "solve",
            "solve_with_report"]

"""Exact methods on the Mixtral shape (32 layers x 8 experts, top-2, 4 GPUs): time to a proven
optimum for CP-SAT (partition-chain and expert-level models) against the layer-chain DP.

Usage: python benchmarks/bench_exact_mixtral.py [--shared ../shared] [--time-limit 120]
Prints a Markdown table; the numbers in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from moeplace.solvers.dp import solve_dp
from moeplace.solvers.exact import solve_cpsat
from moeplace.traces import compute_stats, import_trace, synthetic_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()
    print(f"Command: `python benchmarks/bench_exact_mixtral.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}.\n")
    cases = [("synthetic Mixtral (seed 0, 50,000 tokens)",
              compute_stats(synthetic_trace("mixtral", 50_000, seed=0), coactivation=False))]
    real = Path(args.shared) / "traces/mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz"
    if real.exists():
        tr = import_trace(real)
        fit, _ = tr.split_requests(0.5, seed=0)
        cases += [("real Mixtral-8x7B trace, whole", compute_stats(tr, coactivation=False)),
                  ("real Mixtral-8x7B trace, fitted half", compute_stats(fit, coactivation=False))]
    print("| statistics | method | status | objective | bound | gap | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, stats in cases:
        dp = solve_dp(stats, 4)
        runs = [("dp", dp)]
        for form in ("chain", "experts"):
            runs.append((f"cpsat ({form})", solve_cpsat(stats, 4, time_limit=args.time_limit,
                                                        formulation=form, hint=dp.placement
                                                        if form == "experts" else None)))
        for method, r in runs:
            print(f"| {name} | {method} | {r.status} | {r.objective:.6f} | {r.bound:.6f} | "
                  f"{r.gap:.2e} | {r.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

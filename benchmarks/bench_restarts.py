"""Restarts of the static engines' search (``solve --restarts R [--ray ...]``) against one run.

For each real trace: fit on 80% of the requests, then solve for ``--engine sglang`` once
(``--restarts 1``) and with R restarts, each restart given the same time limit as the one run
(what a Ray cluster with R free CPUs gives; here the restarts run one after another, so the
figures do not depend on how many cores this machine has). Restarts split the layers among
themselves first (each layer gets R times the time) and, beyond the number of layers, search
layers again from seeded perturbations; the driver keeps each layer's best candidate within the
held-back balance budget. Scored on the held-out 20% by the per-token evaluator, with EPLB
(the stacks' default, the strongest baseline on balance) for reference.

Usage: python benchmarks/bench_restarts.py [--time-limit 15] [--restarts 1,8,16]
       [--trace deepseek,qwen,flame] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from moeplace.solvers import Cluster, evaluate_many, solve_with_report
from moeplace.traces import compute_stats, import_trace

SHARED = Path(os.environ.get("MOEPLACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TRACES = {
    "deepseek": ("traces/deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz",
                 Cluster(8, 2)),
    "qwen": ("traces/qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz", Cluster(6, 2)),
    "flame": ("traces/flame-moe-290m/flame_moe_290m_prefill_2048tok.npz", Cluster(8, 2)),
}


def one_after_another(fn: Any, stats: Any, start: Any, restarts: int, seed: int,
                      kw: dict[str, Any]) -> list[Any]:
    """A restart runner that gives every restart the whole time limit, as R free CPUs would."""
    return [fn(stats, start, seed=seed + i, **kw) for i in range(restarts)]


def run(name: str, restarts: list[int], time_limit: float) -> list[dict[str, Any]]:
    path, cluster = TRACES[name]
    tr = import_trace(SHARED / path)
    fit, hold = tr.split_requests(0.2, seed=0)
    stats = compute_stats(fit)
    eplb, _ = solve_with_report(stats, cluster, method="eplb")
    plcs = [eplb]
    rows: list[dict[str, Any]] = [{"trace": name, "cluster": f"{cluster.num_gpus}/{cluster.num_nodes}",
                                   "restarts": "eplb", "seconds": 0.0, "fitted_total": float("nan"),
                                   "stopped": "-"}]
    for r in restarts:
        t0 = time.perf_counter()
        plc, rep = solve_with_report(stats, cluster, method="search", time_limit=time_limit,
                                     restarts=r, restart_runner=one_after_another if r > 1 else None)
        plcs.append(plc)
        rows.append({"trace": name, "cluster": f"{cluster.num_gpus}/{cluster.num_nodes}",
                     "restarts": r, "seconds": time.perf_counter() - t0,
                     "fitted_total": rep.objective["total"], "stopped": rep.details.get("stopped")})
    res = evaluate_many(hold, plcs, home="static")
    for row, e in zip(rows, res, strict=True):
        s = e.summary
        row.update(held_gpus=s["traffic_static"], held_nodes=s["traffic_static_remote_nodes"],
                   held_imb=s["load_imbalance_mean"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time-limit", type=float, default=15.0)
    ap.add_argument("--restarts", default="1,8,16")
    ap.add_argument("--trace", default="deepseek,qwen,flame")
    ap.add_argument("--out")
    a = ap.parse_args()
    restarts = [int(x) for x in a.restarts.split(",")]
    lines = [f"`python benchmarks/bench_restarts.py --time-limit {a.time_limit:g} --restarts "
             f"{a.restarts} --trace {a.trace}` on {platform.machine()} ({os.cpu_count()} cores), "
             f"Python {sys.version.split()[0]}; fitted on 80% of requests, scored on the other 20%.",
             "",
             "| trace | GPUs/nodes | restarts | stopped | fitted total | held-out remote GPUs "
             "/ token | remote nodes / token | load_imbalance_mean | vs 1 restart (GPUs) | "
             "seconds (all restarts) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.trace.split(","):
        rows = run(name, restarts, a.time_limit)
        base = rows[1]["held_gpus"]  # one restart
        for r in rows:
            fitted = "-" if r["restarts"] == "eplb" else f"{r['fitted_total']:.4f}"
            lines.append(f"| {r['trace']} | {r['cluster']} | {r['restarts']} | {r['stopped']} | "
                         f"{fitted} | {r['held_gpus']:.4f} | {r['held_nodes']:.4f} | "
                         f"{r['held_imb']:.4f} | {100 * (r['held_gpus'] / base - 1):+.2f}% | "
                         f"{r['seconds']:.0f} |")
        print("\n".join(lines[-len(rows):]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

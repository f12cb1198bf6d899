"""Engine-matched objective on real traffic: fitted on some requests, scored on the others.

For each trace and cluster: EPLB (the strongest baseline a user could run instead), the search
for the static engines (``--engine sglang``) at several ``--balance-slack`` values, and the
search for ``--engine exflow``, all fitted on the same requests and scored on the held-out
ones by the per-token evaluator (static home, requests round-robin over GPUs). Prints a
markdown table with ratios against EPLB.

Usage: python benchmarks/bench_engine.py [--time-limit 60] [--seeds 0,1] [--slacks 0,0.01,0.02]
       [--trace deepseek] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from moeplace.solvers import Cluster, evaluate_many, solve_with_report
from moeplace.traces import compute_stats, import_trace

SHARED = Path(os.environ.get("MOEPLACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TRACES = {
    "deepseek": ("traces/deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz",
                 {}, [Cluster(8, 2)]),
    "qwen": ("traces/qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz", {},
             [Cluster(6, 2)]),
}


def run(name: str, seeds: list[int], slacks: list[float], time_limit: float) -> list[dict]:
    path, kw, clusters = TRACES[name]
    tr = import_trace(SHARED / path, **kw)
    rows = []
    for seed in seeds:
        fit, hold = tr.split_requests(0.2, seed=seed)
        stats = compute_stats(fit)
        for c in clusters:
            plcs = {"eplb": solve_with_report(stats, c, method="eplb")[0]}
            secs = {}
            for s in slacks:
                t0 = time.perf_counter()
                plcs[f"sglang slack {s:g}"], _ = solve_with_report(
                    stats, c, method="search", balance_slack=s, time_limit=time_limit)
                secs[f"sglang slack {s:g}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            plcs["exflow"], _ = solve_with_report(stats, c, method="search", engine="exflow",
                                                  time_limit=time_limit)
            secs["exflow"] = time.perf_counter() - t0
            names = list(plcs)
            res = evaluate_many(hold, [plcs[n] for n in names])
            base = res[0].summary
            for n, r in zip(names, res, strict=True):
                s = r.summary
                rows.append({
                    "trace": name, "seed": seed, "cluster": f"{c.num_gpus}/{c.num_nodes}",
                    "placement": n, "seconds": secs.get(n, 0.0),
                    "load_imbalance_mean": s["load_imbalance_mean"],
                    "vs_eplb_imbalance": s["load_imbalance_mean"] - base["load_imbalance_mean"],
                    "traffic_static": s["traffic_static"],
                    "gpus_ratio": s["traffic_static"] / base["traffic_static"],
                    "traffic_static_remote_nodes": s["traffic_static_remote_nodes"],
                    "nodes_ratio": (s["traffic_static_remote_nodes"]
                                    / max(base["traffic_static_remote_nodes"], 1e-12)),
                    "cross_gpu_pair_fraction": s["cross_gpu_pair_fraction"],
                    "cross_node_pair_fraction": s["cross_node_pair_fraction"],
                })
                print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--slacks", default="0,0.01,0.02")
    ap.add_argument("--trace", default="deepseek", choices=sorted(TRACES))
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = run(a.trace, [int(x) for x in a.seeds.split(",")],
               [float(x) for x in a.slacks.split(",")], a.time_limit)
    cols = ["trace", "seed", "cluster", "placement", "seconds", "load_imbalance_mean",
            "vs_eplb_imbalance", "traffic_static", "gpus_ratio", "traffic_static_remote_nodes",
            "nodes_ratio", "cross_gpu_pair_fraction", "cross_node_pair_fraction"]
    lines = [f"`python benchmarks/bench_engine.py --trace {a.trace} --time-limit {a.time_limit:g} "
             f"--seeds {a.seeds} --slacks {a.slacks}` on {platform.node()} "
             f"({os.cpu_count()} cores), held-out 20% of requests:", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

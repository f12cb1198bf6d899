"""Lower bounds against the search's objective on the real traces in ../shared (issue 12).

For each trace and cluster: the search's objective (``solve_with_report(method="search")``), the
bound before issue 12 (kept below as ``old_lower_bound``, unchanged) and ``lower_bound`` now,
and both gaps ``(objective - bound) / objective``, plus the new bound given ``--long`` seconds
instead of its default 3 s (how far more time goes). Default weights (load, traffic, node = 1).
On a shared machine run with OPENBLAS_NUM_THREADS=1: the bound's small eigenproblems are
slower with threads fighting over cores, and its time limit then buys fewer steps.

Usage: python benchmarks/bench_bounds.py [--shared ../shared] [--time-limit 30] [--long 30]
       > bounds.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moeplace.solvers import Cluster, Weights, solve_with_report
from moeplace.solvers.bounds import lower_bound, static_bound
from moeplace.traces import RoutingStats, compute_stats, load_routing

CASES = [  # (title, file under traces/, clusters (G, M, R))
    ("DeepSeek-V2-Lite 26x64 top-6",
     "deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz",
     [(8, 1, 0), (8, 2, 0), (8, 1, 8), (8, 2, 8)]),
    ("FLAME-MoE-290M 8x64 top-6", "flame-moe-290m/flame_moe_290m_prefill_2048tok.npz",
     [(8, 1, 0), (8, 2, 0), (8, 1, 8), (8, 2, 8)]),
    ("Qwen1.5-MoE 5x60 top-4", "qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz",
     [(4, 1, 0), (4, 2, 0), (8, 1, 4), (8, 2, 4)]),
    ("Mixtral-8x7B 32x8 top-2", "mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz",
     [(8, 1, 0), (8, 2, 0), (4, 1, 0), (8, 1, 8)]),
]


def _old_top_sum(rows: np.ndarray, width: np.ndarray) -> float:
    srt = -np.sort(-rows, axis=1)
    csum = np.concatenate([np.zeros((rows.shape[0], 1)), np.cumsum(srt, axis=1)], axis=1)
    w = np.clip(width, 0, rows.shape[1]).astype(np.int64)
    return float(csum[np.arange(rows.shape[0]), w].sum())


def old_lower_bound(stats: RoutingStats, G: int, M: int, R: int, w: Weights) -> float:
    """The weighted total bound as moeplace computed it before issue 12 (for comparison)."""
    N = stats.num_experts
    S = (N + R) // G
    load = stats.load.astype(np.float64)
    mean = load.sum(axis=1) / G
    top = load.max(axis=1) / min(G, R + 1)
    if R == 0 and S > 1:
        top = top + np.sort(load, axis=1)[:, : S - 1].sum(axis=1)
    imb = float(np.divide(np.maximum(mean, top), mean, out=np.ones(len(mean)),
                          where=mean > 0).mean())

    def traffic(window: int) -> float:
        t = stats.transitions.astype(np.float64)
        same = 0.0
        for tl in t:
            width = np.full(N, window * min(G, R + 1))
            same += min(_old_top_sum(tl, width), _old_top_sum(tl.T, width), float(tl.sum()))
        return max(0.0, 1.0 - same / float(t.sum()))

    cg = traffic(S)
    cn = traffic(S * (G // M)) if M > 1 else 0.0
    return w.load * imb + w.traffic * cg + w.node * cn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--long", type=float, default=30.0, help="seconds for the long bound")
    args = ap.parse_args()
    w = Weights()
    print(f"Command: `python benchmarks/bench_bounds.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; search {args.time_limit:g} s per case; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}.\n")
    print(f"| trace | GPUs | nodes | replicas | search objective | old bound | new bound | "
          f"old gap | new gap | bound s | new bound terms (imbalance, cross-GPU, cross-node) | "
          f"search terms | bound, {args.long:g} s | gap, {args.long:g} s |")
    print("|" + "---|" * 14)
    static_rows = []
    for title, rel, clusters in CASES:
        path = Path(args.shared) / "traces" / rel
        if not path.exists():
            print(f"| {title} | skipped: {path} not found |" + " |" * 12)
            continue
        # The Mixtral trace marks lost records with 255 (its README).
        obj = load_routing(path, missing_id=255) if "mixtral" in rel else load_routing(path)
        stats = compute_stats(obj)
        for G, M, R in clusters:
            _plc, rep = solve_with_report(stats, Cluster(G, M, R), method="search",
                                          time_limit=args.time_limit)
            t0 = time.perf_counter()
            new = lower_bound(stats, G, M, R, w)
            secs = time.perf_counter() - t0
            old = old_lower_bound(stats, G, M, R, w)
            long = lower_bound(stats, G, M, R, w, time_limit=args.long).total
            o = rep.objective
            print(f"| {title} | {G} | {M} | {R} | {o['total']:.4f} | {old:.4f} | "
                  f"{new.total:.4f} | {100 * (o['total'] - old) / o['total']:.1f}% | "
                  f"{100 * (o['total'] - new.total) / o['total']:.1f}% | {secs:.2f} | "
                  f"{new.load_imbalance_mean:.4f}, {new.cross_gpu_pair_fraction:.4f}, "
                  f"{new.cross_node_pair_fraction:.4f} | {o['load_imbalance_mean']:.4f}, "
                  f"{o['cross_gpu_pair_fraction']:.4f}, {o['cross_node_pair_fraction']:.4f} | "
                  f"{long:.4f} | {100 * (o['total'] - long) / o['total']:.1f}% |", flush=True)
            if R == 0 and M == 2:
                S = stats.num_experts // G
                g, n = static_bound(stats.coactivation, stats.num_tokens, stats.meta.top_k,
                                    G, M, S)
                static_rows.append(f"| {title} | {G} | {M} | {g:.3f} | {n:.3f} |")
    print("\nStatic-model bounds (`static_bound`, uniform home, no replicas):\n")
    print("| trace | GPUs | nodes | traffic_static >= | traffic_static_remote_nodes >= |")
    print("|---|---|---|---|---|")
    print("\n".join(static_rows))


if __name__ == "__main__":
    main()

"""`solve --phase decode` and `solve --gpu-speeds` end to end: how the placement changes and what
the per-token evaluator says on held-out traffic, against EPLB (what the stacks run, token load,
speed-blind) and against the same search without the term.

Usage: python benchmarks/bench_phase.py [--time-limit 30] [--tokens-per-step 32]
       [--speeds 1,1,1,1,0.7,0.7,0.7,0.7]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np

from moeplace.solvers import Cluster, evaluate_many, solve_with_report
from moeplace.traces import compute_stats, import_trace

SHARED = Path(os.environ.get("MOEPLACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEEPSEEK = "traces/deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz"
QWEN = "traces/qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz"


def moved(a, b) -> float:  # type: ignore[no-untyped-def]
    """Share of (layer, expert) whose GPU differs between two placements without replicas."""
    return float((a.expert_gpu() != b.expert_gpu()).mean())


def split_time(tr, frac: float = 0.5):  # type: ignore[no-untyped-def]
    """First and second part of a trace in stream order (Qwen has no request ids)."""
    cut = int(tr.num_tokens * frac)
    return tr.select(slice(0, cut)), tr.select(slice(cut, None))


def row(name: str, s: dict, base: dict) -> str:
    cols = ["load_imbalance_mean", "active_experts_max", "active_experts_imbalance",
            "traffic_static", "traffic_static_remote_nodes"]
    return "| " + name + " | " + " | ".join(f"{s[c]:.3f}" for c in cols) + \
        f" | {s['traffic_static'] / base['traffic_static']:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--tokens-per-step", type=int, default=32)
    ap.add_argument("--speeds", default="1,1,1,1,0.7,0.7,0.7,0.7")
    a = ap.parse_args()
    head = ("| placement | load_imbalance_mean | active_experts_max | active_experts_imbalance | "
            "traffic_static | traffic_static_remote_nodes | traffic vs eplb |\n|" + "---|" * 7)
    print(f"`python benchmarks/bench_phase.py --time-limit {a.time_limit:g} --tokens-per-step "
          f"{a.tokens_per_step} --speeds {a.speeds}` on {platform.node()} ({os.cpu_count()} "
          "cores)\n")

    # Decode: Qwen1.5 vLLM decode steps, fitted on the first half in time, scored on the rest
    # with steps of --tokens-per-step tokens.
    tr = import_trace(SHARED / QWEN)
    fit, hold = split_time(tr)
    st = compute_stats(fit)
    c = Cluster(6, 2)
    plcs = {"eplb": solve_with_report(st, c, method="eplb")[0],
            "search (prefill)": solve_with_report(st, c, time_limit=a.time_limit,
                                                  balance_slack=0.02)[0],
            "search --phase decode": solve_with_report(
                st, c, time_limit=a.time_limit, balance_slack=0.02, phase="decode",
                tokens_per_step=a.tokens_per_step)[0]}
    res = evaluate_many(hold, list(plcs.values()), tokens_per_step=a.tokens_per_step)
    base = res[0].summary
    print(f"Decode, Qwen1.5-MoE (6 GPUs, 2 nodes; steps of {a.tokens_per_step} tokens), held-out "
          "second half:\n")
    print(head)
    for (n, _), r in zip(plcs.items(), res, strict=True):
        print(row(n, r.summary, base))
    print(f"\nexperts on another GPU, decode vs prefill search: "
          f"{moved(plcs['search --phase decode'], plcs['search (prefill)']):.0%}\n")

    # Unequal GPUs: DeepSeek-V2-Lite by requests.
    speeds = np.array([float(x) for x in a.speeds.split(",")])
    tr = import_trace(SHARED / DEEPSEEK)
    fit, hold = tr.split_requests(0.2, seed=0)
    st = compute_stats(fit)
    c = Cluster(len(speeds), 2)
    plcs = {"eplb": solve_with_report(st, c, method="eplb")[0],
            "search (equal speeds)": solve_with_report(st, c, time_limit=a.time_limit)[0],
            "search --gpu-speeds": solve_with_report(st, c, time_limit=a.time_limit,
                                                     gpu_speeds=speeds)[0]}
    res = evaluate_many(hold, list(plcs.values()), gpu_speeds=speeds)
    base = res[0].summary
    print(f"Unequal GPUs, DeepSeek-V2-Lite (speeds {a.speeds}, 2 nodes), held-out 20% of requests; "
          "imbalances speed-aware:\n")
    print(head)
    for (n, _), r in zip(plcs.items(), res, strict=True):
        print(row(n, r.summary, base))
    print(f"\nexperts on another GPU, speed-aware vs equal-speed search: "
          f"{moved(plcs['search --gpu-speeds'], plcs['search (equal speeds)']):.0%}")


if __name__ == "__main__":
    main()

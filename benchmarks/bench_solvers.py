"""Every placement method side by side on the real traces in ../shared and synthetic production
shapes: evaluator metrics, simulated speedup over contiguous, solve time, gap to the lower bound.

Usage: python benchmarks/bench_solvers.py [--shared ../shared] [--quick] > results.md
Per-token metrics are measured on held-out requests where the trace has request ids (fit on
the rest), else on the fitted trace itself (marked "fit").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd

from moeplace.placement import Placement
from moeplace.solvers import Cluster, evaluate, evaluate_stats, pareto, solve_with_report
from moeplace.solvers.simulator import Hardware, ModelShape, step_time
from moeplace.traces import SyntheticRouter, compute_stats, import_trace, load_routing
from moeplace.traces.synthetic import preset


def table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                     for v in r.tolist()) + " |")
    return "\n".join(out)


def run_case(name: str, fit, held, stats, cluster: Cluster, methods: list[str], shape: str | None,
             hw: Hardware, time_limit: float, tokens_per_step: int) -> pd.DataFrame:
    rows = []
    sim_shape = ModelShape.named(shape) if shape else None
    plcs: dict[str, Placement] = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            plc, rep = solve_with_report(stats, cluster, method=m, time_limit=time_limit)
        except Exception as exc:  # record why a method does not apply here
            rows.append({"method": m, "note": str(exc)[:60]})
            continue
        plcs[m] = plc
        row = {"method": m, "status": rep.status, "seconds": time.perf_counter() - t0,
               "gap": rep.gap}
        src = held if held is not None else fit
        if src is not None:
            s = evaluate(src, plc, show_progress=False).summary
            row.update(load_imbalance_mean=s["load_imbalance_mean"],
                       cross_gpu_pair_fraction=s["cross_gpu_pair_fraction"],
                       cross_node_pair_fraction=s["cross_node_pair_fraction"],
                       traffic_follow=s["traffic_follow"],
                       traffic_static=s["traffic_static"])
            if sim_shape is not None:
                row["step_ms"] = 1e3 * step_time(src, plc, hw, sim_shape, tokens_per_step)["step_s"]
        else:
            s = evaluate_stats(stats, plc)
            row.update(load_imbalance_mean=s["load_imbalance_mean"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if "step_ms" in df and "contiguous" in set(df["method"]):
        df["speedup"] = float(df.loc[df["method"] == "contiguous", "step_ms"].iloc[0]) / df["step_ms"]
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--quick", action="store_true", help="real traces only")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--only", help="run only the cases whose title contains this text")
    args = ap.parse_args()
    tr_dir = Path(args.shared) / "traces"
    hw = Hardware.load("h100-nvlink")
    print(f"Command: `python benchmarks/bench_solvers.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; simulator profile h100-nvlink, 4096 tokens per step.\n")
    base = ["contiguous", "round_robin", "random", "eplb", "eplb-distinct", "search"]
    cases = [
        ("DeepSeek-V2-Lite (26 x 64, top-6), 8 GPUs", "deepseek-v2-lite-puffin-prefill/"
         "deepseek_v2_lite_prefill_routing.npz", Cluster(8), base, "deepseek-v2-lite"),
        ("DeepSeek-V2-Lite, 8 GPUs in 2 nodes", "deepseek-v2-lite-puffin-prefill/"
         "deepseek_v2_lite_prefill_routing.npz", Cluster(8, 2), base, "deepseek-v2-lite"),
        ("DeepSeek-V2-Lite, 8 GPUs, 8 replicas (R = N/8)", "deepseek-v2-lite-puffin-prefill/"
         "deepseek_v2_lite_prefill_routing.npz", Cluster(8, 1, 8),
         ["contiguous", "random", "eplb", "eplb-distinct", "search"], "deepseek-v2-lite"),
        ("FLAME-MoE-290M (8 x 64, top-6), 8 GPUs", "flame-moe-290m/flame_moe_290m_prefill_2048tok.npz",
         Cluster(8), base, "flame-moe-290m"),
        ("Qwen1.5-MoE-A2.7B (5 logged layers x 60, top-4), 4 GPUs",
         "qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz", Cluster(4), base,
         "qwen1.5-moe-a2.7b"),
        ("Mixtral-8x7B (32 x 8, top-2), 4 GPUs", "mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz",
         Cluster(4), [*base, "dp", "cpsat", "ilp-highs"], "mixtral-8x7b"),
        ("Switch-base-128 encoder (6 x 128, top-1; loads only), 8 GPUs",
         "switch-base-128-encoder-loads/switch_base_128_encoder_expert_counts.npz", Cluster(8),
         ["contiguous", "round_robin", "random", "eplb", "eplb-distinct", "search"], None),
    ]
    for title, rel, cluster, methods, shape in cases:
        if args.only and args.only not in title:
            continue
        path = tr_dir / rel
        if not path.exists():
            print(f"## {title}\n\nskipped: {path} not found\n")
            continue
        # The Mixtral trace marks lost records with 255 (its README); nothing else declares one.
        obj = load_routing(path, missing_id=255) if "mixtral" in rel else load_routing(path)
        fit = held = None
        if hasattr(obj, "experts"):
            fit = obj
            if len(set(obj.request_ids().tolist())) > 3:
                fit, held = obj.split_requests(0.5, seed=0)
            stats = compute_stats(fit, coactivation=False)
        else:
            stats = obj
        note = "held-out half of the requests" if held is not None else (
            "fitted trace" if fit is not None else "statistics only")
        df = run_case(title, fit, held, stats, cluster, methods, shape, hw, args.time_limit, 4096)
        print(f"## {title}\n\nScored on: {note}.\n\n{table(df)}\n")
        if "replicas" not in title and "2 nodes" not in title and rel.startswith("deepseek"):
            front = pareto(stats, cluster, time_limit=args.time_limit / 4)
            fr = pd.DataFrame([{k: v for k, v in r.items() if k != "placement"} for r in front])
            print(f"Traffic-versus-balance frontier (search, fitted statistics):\n\n{table(fr)}\n")
    if args.quick:
        return
    for name, cluster in (("deepseek-v3", Cluster(64, 8)), ("kimi-k2", Cluster(64, 8)),
                          ("deepseek-v3", Cluster(64, 8, 64))):
        router = SyntheticRouter(preset(name), seed=0)
        fit_stats = compute_stats(router.sample(200_000), coactivation=False)
        held = import_trace_like(router)
        title = (f"synthetic {name} ({router.spec.num_layers} x {router.spec.num_experts}, top-"
                 f"{router.spec.top_k}), {cluster.num_gpus} GPUs in {cluster.num_nodes} nodes"
                 + (f", {cluster.replicas} replicas" if cluster.replicas else ""))
        df = run_case(title, None, held, fit_stats, cluster,
                      ["contiguous", "eplb", "eplb-distinct", "auto"], name, hw, args.time_limit,
                      4096)
        print(f"## {title}\n\nFitted on 200,000 tokens, scored on 20,000 fresh tokens.\n\n"
              f"{table(df)}\n")


def import_trace_like(router: SyntheticRouter):
    from moeplace.traces import Trace

    return Trace.concat(list(router.sample(20_000, seed=99)))


if __name__ == "__main__":
    _ = import_trace
    main()

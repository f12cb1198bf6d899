"""Decode cost and unequal GPUs on the real traces: EPLB on the decode cost against EPLB on token
load (``active_experts_*``), and the speed-aware balanced start against speed-blind EPLB
(speed-aware ``load_imbalance_mean``), each fitted on one part of a trace and scored on it and
on the held-out part.

Usage: python benchmarks/bench_decode.py [--shared ../shared]
Prints Markdown tables; the numbers in docs/benchmarks.md ("Decode term and unequal GPUs")
come from it.

Splits: DeepSeek-V2-Lite and Mixtral by whole requests (``Trace.split_requests(0.5, seed=0)``);
Qwen1.5 has no request ids, so it is split in time: decode steps 2-64 fitted, 65-128 held out
(its two prefill steps are left out of both).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

from moeplace.placement import contiguous
from moeplace.solvers import evaluate
from moeplace.solvers.baselines import balanced_placement, eplb
from moeplace.solvers.cost import expert_cost, speed_load_bound
from moeplace.solvers.evaluator import gpu_loads_from_stats, imbalance
from moeplace.traces import compute_stats, import_trace

QWEN = "qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz"
MIXTRAL = "mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz"
DEEPSEEK = "deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz"


def splits(shared: Path) -> list[tuple[str, object, object]]:
    out = []
    q = shared / "traces" / QWEN
    if q.exists():
        tr = import_trace(q)
        st = tr.tokens["step"]
        out.append(("Qwen1.5-MoE (vLLM decode steps)", tr.select((st >= 2) & (st <= 64)),
                    tr.select(st > 64)))
    m = shared / "traces" / MIXTRAL
    if m.exists():
        tr = import_trace(m, missing_id=255)
        fit, held = tr.split_requests(0.5, seed=0)
        out.append(("Mixtral-8x7B decode", fit, held))
    d = shared / "traces" / DEEPSEEK
    if d.exists():
        tr = import_trace(d)
        fit, held = tr.split_requests(0.5, seed=0)
        out.append(("DeepSeek-V2-Lite (prefill tokens as decode batches)", fit, held))
    return out


def decode_table(cases: list, configs: dict[str, list[tuple[int, int | None]]]) -> None:
    print("### EPLB on the decode cost vs EPLB on token load\n")
    print("| trace | GPUs | tokens per step | placement | fit decode-cost imbalance | "
          "fit active_experts_max | fit active_experts_imbalance | held-out active_experts_max "
          "| held-out active_experts_imbalance | held-out load_imbalance_mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, fit, held in cases:
        stats = compute_stats(fit, coactivation=False)
        for G, B in configs[name]:
            # B None: the trace's own steps; the cost needs a batch size: their mean size
            Bc = B or int(round(fit.num_tokens / len(np.unique(fit.tokens["step"]))))
            plcs = {
                "contiguous": contiguous(fit.num_layers, fit.num_experts, G),
                "eplb (token load)": eplb(stats.load, G),
                "eplb (decode cost)": eplb(expert_cost(stats, "decode", Bc), G),
                "balanced (decode cost)": balanced_placement(expert_cost(stats, "decode", Bc), G),
            }
            cost = expert_cost(stats, "decode", Bc)
            for pname, p in plcs.items():
                f = evaluate(fit, p, tokens_per_step=B).summary
                h = evaluate(held, p, tokens_per_step=B).summary
                proxy = imbalance(gpu_loads_from_stats(cost, p)).mean()
                steps = f"trace steps (mean {Bc})" if B is None else str(B)
                print(f"| {name} | {G} | {steps} | {pname} | {proxy:.3f} | "
                      f"{f['active_experts_max']:.3f} | "
                      f"{f['active_experts_imbalance']:.3f} | {h['active_experts_max']:.3f} | "
                      f"{h['active_experts_imbalance']:.3f} | {h['load_imbalance_mean']:.3f} |")


def speed_table(cases: list, configs: dict[str, list[int]], steps: dict[str, int | None]
                ) -> None:
    print("\n### Unequal GPUs: speed-aware balanced start vs EPLB (speed-blind)\n")
    print("| trace | GPUs | speeds | placement | fit load_imbalance_mean | bound (fit) | "
          "held-out load_imbalance_mean | held-out load_imbalance_max | "
          "held-out active_experts_imbalance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, fit, held in cases:
        stats = compute_stats(fit, coactivation=False)
        for G in configs[name]:
            sp = np.r_[np.ones(G // 2), np.full(G - G // 2, 0.7)]
            text = f"{G // 2} x 1, {G - G // 2} x 0.7"
            bound = speed_load_bound(stats.load, sp, fit.num_experts // G).mean()
            B = steps[name]
            Bc = B or int(round(fit.num_tokens / len(np.unique(fit.tokens["step"]))))
            plcs = {"eplb (speed-blind)": eplb(stats.load, G),
                    "balanced (speed-aware)": balanced_placement(stats.load, G, 1, sp),
                    "balanced (equal speeds)": balanced_placement(stats.load, G),
                    "balanced (speed-aware, decode cost)": balanced_placement(
                        expert_cost(stats, "decode", Bc), G, 1, sp)}
            for pname, p in plcs.items():
                f = evaluate(fit, p, gpu_speeds=sp, tokens_per_step=B).summary
                h = evaluate(held, p, gpu_speeds=sp, tokens_per_step=B).summary
                print(f"| {name} | {G} | {text} | {pname} | {f['load_imbalance_mean']:.3f} | "
                      f"{bound:.3f} | {h['load_imbalance_mean']:.3f} | "
                      f"{h['load_imbalance_max']:.3f} | {h['active_experts_imbalance']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    args = ap.parse_args()
    print(f"Command: `python benchmarks/bench_decode.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}.\n")
    cases = splits(Path(args.shared))
    names = [c[0] for c in cases]
    decode = {n: [] for n in names}
    speed = {n: [] for n in names}
    speed_steps: dict[str, int | None] = {}
    for n in names:
        if n.startswith("Qwen"):
            decode[n] = [(4, None), (6, None), (12, None)]
            speed[n] = [4, 12]
            speed_steps[n] = None
        elif n.startswith("Mixtral"):
            decode[n] = [(4, 4), (4, 8)]
            speed[n] = [4, 8]
            speed_steps[n] = 4
        else:
            decode[n] = [(8, 16), (8, 64), (16, 64)]
            speed[n] = [8, 16]
            speed_steps[n] = 16
    decode_table(cases, decode)
    speed_table(cases, speed, speed_steps)


if __name__ == "__main__":
    main()

"""Online rebalancing replays (issue 19): every real trace with a token order, in that order,
several intervals and cluster shapes, all policies side by side in one pass each; plus the
policy's CPU time per rebalance on the DeepSeek-V3 shape against vLLM's own default.

Each replay's numbers are rescored independently from the placements it wrote
(``placements.jsonl``: a naive per-token recount, no code shared with the replay), and the
ratios are against vLLM 0.34's ``DefaultEplbPolicy`` run from the installed engine in the same
replay. Needs vLLM importable (``PYTHONPATH=/work/main/.venv/engines/vllm``); without it the
ratios are against moeplace's re-implementation of the same algorithm (``eplb``) and say so.

Traces (``$MOEPLACE_SHARED/traces``; see their READMEs):

- ``deepseek``: DeepSeek-V2-Lite prefill, 999 Puffin prompts in arrival order (prompt, then
  position).
- ``deepseek-drift``: the same tokens, the prompts of one topic first (``code`` by
  ``bench_drift``'s keyword rule, 462 prompts, then the other 537): drift between request
  groups.
- ``mixtral``: Mixtral-8x7B decode, 4 problems (GSM8K then HumanEval) in arrival order.
- ``qwen``: Qwen1.5-MoE real continuous-batching steps, in step order.
- ``flame``: FLAME-MoE-290M, the first 10 positions of 64 sequences, in arrival order.

Usage::

    PYTHONPATH=$PWD:/work/main/.venv/engines/vllm python benchmarks/bench_replay.py \\
        --out replay.md [--only deepseek] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_drift import (
    DEEPSEEK,
    DEEPSEEK_TOKENS,
    FLAME_FIRST10,
    MIXTRAL,
    MIXTRAL_MISSING,
    QWEN,
    is_code,
    prompt_texts,
)
from moeplace.errors import InputError
from moeplace.integrations.engine_policies import make_policy
from moeplace.solvers.replay import replay, write_placements
from moeplace.traces import Trace, import_trace

SHARED = Path(os.environ.get("MOEPLACE_SHARED", "/work/shared"))
POLICIES = ("moeplace", "vllm", "sglang", "eplb", "eplb-cumulative", "static", "never")
# DeepSeek-V2-Lite: hidden 2048, moe_intermediate 1408, three bf16 matrices per expert.
EXPERT_BYTES = {"deepseek": 3 * 2048 * 1408 * 2, "deepseek-drift": 3 * 2048 * 1408 * 2,
                "mixtral": 3 * 4096 * 14336, "qwen": 3 * 2048 * 1408 * 2,
                "flame": 3 * 512 * 512 * 2}


def traces() -> dict[str, tuple[Trace, str, list[tuple[int, int, int]], list[int]]]:
    """name -> (trace, order, clusters (gpus, nodes, replicas), intervals)."""
    t = SHARED / "traces"
    ds = import_trace(t / DEEPSEEK)
    texts = prompt_texts(t / DEEPSEEK_TOKENS)
    req = ds.tokens["request"]
    code = np.isin(req, [p for p, x in texts.items() if is_code(x)])
    # code prompts first, each group in prompt order: renumber the requests
    _, new = np.unique(np.where(code, 0, 1) * 100_000 + req, return_inverse=True)
    drift = Trace(ds.experts, ds.meta, tokens={"request": new.astype(np.int64),
                                               "position": ds.tokens["position"]})
    shapes64 = [(8, 1, 0), (16, 2, 16), (8, 1, 8)]
    return {
        "deepseek": (ds, "arrival", shapes64, [4096, 2048]),
        "deepseek-drift": (drift, "arrival", shapes64, [4096, 2048]),
        "mixtral": (import_trace(t / MIXTRAL, missing_id=MIXTRAL_MISSING), "arrival",
                    [(4, 1, 0), (4, 1, 4), (8, 2, 8)], [64]),
        "qwen": (import_trace(t / QWEN), "step", [(4, 1, 4), (16, 2, 4)], [512]),
        "flame": (import_trace(t / FLAME_FIRST10), "arrival", [(8, 1, 0), (16, 2, 16)], [64]),
    }


def naive_rescore(trace: Trace, order: str, lines: list[dict], G: int) -> tuple[float, int]:
    """Mean next-interval imbalance and total moved copies from placements.jsonl alone."""
    if order == "arrival":
        perm = np.lexsort((trace.tokens["position"], trace.tokens["request"]))
    else:
        perm = np.lexsort((np.arange(trace.num_tokens), trace.tokens["step"]))
    e = trace.experts[perm].astype(np.int64)
    L, N = trace.num_layers, trace.num_experts
    imbs, moved, prev = [], 0, None
    for i, ln in enumerate(lines):
        m = np.array(ln["phy2log"])
        S = m.shape[1] // G
        a = ln["start_token"]
        b = lines[i + 1]["start_token"] if i + 1 < len(lines) else len(e)
        per_layer = []
        for l in range(L):
            load = np.bincount(e[a:b, l].ravel(), minlength=N).astype(float)
            cnt = np.bincount(m[l], minlength=N)
            gpu = np.zeros(G)
            for p, x in enumerate(m[l]):
                gpu[p // S] += load[x] / cnt[x]
            per_layer.append(gpu.max() / gpu.mean() if gpu.mean() else 1.0)
        imbs.append(float(np.mean(per_layer)))
        if prev is not None:
            moved += sum(len(set(m[l, g * S:(g + 1) * S]) - set(prev[l, g * S:(g + 1) * S]))
                         for l in range(L) for g in range(G))
        prev = m
    return float(np.mean(imbs)), moved


def run_replays(only: str | None) -> tuple[list[dict], dict[str, str]]:
    rows, sources = [], {}
    for name, (tr, order, shapes, intervals) in traces().items():
        if only and not name.startswith(only):
            continue
        for (G, M, R) in shapes:
            for interval in intervals:
                if tr.num_tokens <= interval:
                    continue
                pols = []
                for p in POLICIES:
                    try:
                        pols.append(make_policy(p, G, M, 1, expert_bytes=EXPERT_BYTES[name]))
                    except InputError as exc:
                        sources[p] = f"not run: {exc}"
                t0 = time.time()
                res = replay(tr, pols, num_gpus=G, num_nodes=M, replicas=R, interval=interval,
                             order=order, expert_bytes=EXPERT_BYTES[name])
                secs = time.time() - t0
                sources.update(res.sources)
                with tempfile.TemporaryDirectory() as d:
                    write_placements(res, Path(d) / "o")
                    for p in pols:
                        lines = [json.loads(x) for x in
                                 (Path(d) / "o" / p.name / "placements.jsonl").read_text().splitlines()]
                        imb, moved = naive_rescore(tr, order, lines, G)
                        s = res.summary[p.name]
                        assert abs(imb - s["load_imbalance_mean"]) < 1e-9 and moved == s["moved_copies"]
                        rows.append({"trace": name, "order": order, "gpus": G, "nodes": M,
                                     "replicas": R, "interval": interval,
                                     "intervals": s["intervals"], "policy": p.name,
                                     "load_imbalance_mean": imb, "moved_copies": moved,
                                     "moved_per_decision": s["moved_fraction_per_decision"],
                                     "rebalances": s["rebalances"], "stall_s": s["stall_s"],
                                     "cpu_ms": 1e3 * s["cpu_s_per_decision"], "seconds": secs})
                print(f"{name} G={G} M={M} R={R} I={interval}: {secs:.1f}s", file=sys.stderr)
    return rows, sources


def cpu_shape(G: int, R: int, steps: int = 6) -> dict:
    """CPU seconds per call on the DeepSeek-V3 shape (58 x 256): vLLM's default and moeplace's
    policy on the same load matrices, from the same maps, one process."""
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from moeplace.solvers.online import OnlinePolicy

    L, N = 58, 256
    P = N + R
    rng = np.random.default_rng(0)
    base = rng.gamma(0.8, 1, size=(L, N))
    drift = rng.gamma(0.8, 1, size=(L, N))
    cur = np.tile(np.arange(P) % N, (L, 1))
    pol = OnlinePolicy(G, 1, 1)
    ours, theirs = [], []
    for i in range(steps):
        mix = base * (1 - i / (2 * steps)) + drift * i / (2 * steps)
        load = rng.poisson(mix * 4096 * 8 / N * 4).astype(np.float64)  # ~4k tokens x top-8
        t = time.process_time()
        DefaultEplbPolicy.rebalance_experts(torch.from_numpy(load.astype(np.float32)), P, 1, 1,
                                            G, torch.from_numpy(cur))
        theirs.append(time.process_time() - t)
        t = time.process_time()
        d = pol.step(load, cur)
        ours.append(time.process_time() - t)
        cur = d.phy2log
    return {"gpus": G, "redundant": R, "vllm_s": theirs, "moeplace_s": ours}


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def report(rows: list[dict], sources: dict[str, str], cpu: list[dict], command: str,
           seconds: float) -> str:
    ref = "vllm" if any(r["policy"] == "vllm" for r in rows) else "eplb"
    keys = ("trace", "gpus", "nodes", "replicas", "interval")
    by = {}
    for r in rows:
        by.setdefault(tuple(r[k] for k in keys), {})[r["policy"]] = r
    summary = []
    for k, d in by.items():
        m, v = d["moeplace"], d[ref]
        limit = 0.3 if k[0].endswith("drift") else 0.15
        row = dict(zip(keys, k, strict=True))
        row.update({"intervals": m["intervals"], f"{ref}_imbalance": v["load_imbalance_mean"],
                    "moeplace_imbalance": m["load_imbalance_mean"],
                    "imbalance_ratio": m["load_imbalance_mean"] / v["load_imbalance_mean"],
                    f"{ref}_moved": v["moved_copies"], "moeplace_moved": m["moved_copies"],
                    "moves_ratio": m["moved_copies"] / max(v["moved_copies"], 1),
                    "limit": limit,
                    "meets": "yes" if (m["load_imbalance_mean"] <= v["load_imbalance_mean"]
                                       and m["moved_copies"] <= limit * v["moved_copies"])
                    else "NO"})
        summary.append(row)
    lines = [f"Command: `{command}`", "",
             f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs visible (shared), Python {platform.python_version()}; "
             f"{seconds:.0f} s in all.", "",
             "Policies (each replay runs all of them side by side, one pass):", ""]
    lines += [f"- `{n}`: {s}" for n, s in sources.items()]
    lines += ["", f"moeplace against `{ref}` (same replay; imbalance = mean over intervals of "
              "the next interval's load_imbalance, rescored from placements.jsonl; moves = "
              "copies moved in total; limit = the acceptance's moves ratio):", "",
              fmt_table(summary, list(summary[0])), "",
              "All policies:", "",
              fmt_table(rows, ["trace", "gpus", "nodes", "replicas", "interval", "policy",
                               "load_imbalance_mean", "moved_copies", "moved_per_decision",
                               "rebalances", "stall_s", "cpu_ms"])]
    if cpu:
        lines += ["", "CPU time per call on the DeepSeek-V3 shape (58 layers x 256 experts), "
                  "vLLM's DefaultEplbPolicy and moeplace's OnlinePolicy on the same load "
                  "matrices and the same current maps, one process (call 1 starts from the "
                  "initial map `p mod N`, later calls from moeplace's own previous map, with "
                  "the traffic drifting):", "",
                  "| GPUs | redundant | call | vLLM s | moeplace s | ratio |", "|---|---|---|---|---|---|"]
        for c in cpu:
            for i, (a, b) in enumerate(zip(c["vllm_s"], c["moeplace_s"], strict=True)):
                lines.append(f"| {c['gpus']} | {c['redundant']} | {i + 1} | {a:.3f} | {b:.3f} | "
                             f"{b / a:.2f} |")
            lines.append(f"| {c['gpus']} | {c['redundant']} | mean | {np.mean(c['vllm_s']):.3f} | "
                         f"{np.mean(c['moeplace_s']):.3f} | "
                         f"{np.mean(c['moeplace_s']) / np.mean(c['vllm_s']):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--only", help="only traces whose name starts with this")
    ap.add_argument("--skip-cpu", action="store_true", help="skip the DeepSeek-V3 CPU timing")
    a = ap.parse_args(argv)
    t0 = time.time()
    rows, sources = run_replays(a.only)
    cpu = []
    if not a.skip_cpu and "vllm" in sources and not sources["vllm"].startswith("not run"):
        cpu = [cpu_shape(64, 64), cpu_shape(32, 32)]
    cmd = "python benchmarks/bench_replay.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, sources, cpu, cmd.strip(), time.time() - t0)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

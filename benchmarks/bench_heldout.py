"""Held-back balance for every method (issue 20, part 4): fit on some requests, score on others
with ``moeplace evaluate``.

For each split of the real traces that carry request ids (``bench_drift``'s splits by request
groups: ``deepseek/topic``, ``deepseek/half``, ``mixtral/dataset``, ``flame/prefill-vs-first10``;
Qwen1.5's file has no request ids), in both directions: the two parts are written as Parquet,
every method is run through the CLI on the fit part,
``moeplace solve FIT --engine exflow --method M --gpus G --nodes M --time-limit T --out P --json``
(``--engine sglang`` for the ``default`` row, the CLI's default), and each placement is scored on
the other part with ``moeplace evaluate HELD P --json``; EPLB's placement (``--method eplb``)
the same way. ``search (no check)`` is the exflow search alone (``registry.get("search").solve``,
no held-back check), scored the same way: the number the issue reported.

Usage: ``PYTHONPATH=. MOEPLACE_SHARED=/work/shared python benchmarks/bench_heldout.py
--time-limit 10 --out heldout.md`` (``--only NAME`` runs the splits whose name contains NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_drift import DEFAULT_SHARED, build_splits  # noqa: E402
from moeplace.placement import Placement  # noqa: E402
from moeplace.solvers import Cluster, evaluate, registry  # noqa: E402
from moeplace.solvers.registry import SolveOptions  # noqa: E402
from moeplace.solvers.solve import default_groups  # noqa: E402
from moeplace.traces import compute_stats  # noqa: E402
from moeplace.traces.store import write_trace  # noqa: E402

SPLITS = ("deepseek/topic", "deepseek/half", "mixtral/dataset", "flame/prefill-vs-first10")
METHODS = ("search", "moetuner", "dp", "cpsat", "ilp-highs", "ilp-cbc")
# One cluster per model, without replicas (the exact methods and MoETuner place each expert
# once): 64 experts on 8 GPUs in 2 nodes; Mixtral's 8 on 4 GPUs in 2 nodes.
CLUSTERS = {"deepseek": (8, 2), "flame": (8, 2), "mixtral": (4, 2)}


def cli(*args: str) -> tuple[int, str]:
    """``moeplace ARGS`` with this checkout first on the path; (exit status, stdout or the
    error line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "moeplace", *args], capture_output=True, text=True,
                       env=env)
    return r.returncode, r.stdout if r.returncode == 0 else r.stderr.strip().splitlines()[-1]


def held_out(held: Path, plc: Path) -> tuple[float, float]:
    """(``load_imbalance_mean``, ``cross_gpu_pair_fraction``) of ``moeplace evaluate``."""
    code, out = cli("evaluate", str(held), str(plc), "--json")
    if code:
        raise SystemExit(f"evaluate failed: {out}")
    d = json.loads(out)
    return float(d["load_imbalance_mean"]), float(d["cross_gpu_pair_fraction"])


def run_direction(split: str, fit_label: str, held_label: str, fit_tr: Any, held_tr: Any,
                  gpus: int, nodes: int, time_limit: float, work: Path) -> list[dict[str, Any]]:
    tag = f"{split.replace('/', '_')}_{fit_label.replace(' ', '_')}"
    fit_p, held_p = work / f"{tag}_fit.parquet", work / f"{tag}_held.parquet"
    write_trace(fit_tr, fit_p)
    write_trace(held_tr, held_p)
    rows: list[dict[str, Any]] = []
    base = dict(split=split, fit=fit_label, scored=held_label, cluster=f"{gpus}/{nodes}")
    eplb_json = work / f"{tag}_eplb.json"
    code, out = cli("solve", str(fit_p), "--gpus", str(gpus), "--nodes", str(nodes),
                    "--method", "eplb", "--time-limit", str(time_limit), "--out", str(eplb_json),
                    "--json")
    if code:
        raise SystemExit(f"eplb failed: {out}")
    eplb, eplb_cross = held_out(held_p, eplb_json)
    runs = [(m, "exflow") for m in METHODS] + [("default", "sglang")]
    for method, engine in runs:
        out_json = work / f"{tag}_{method}.json"
        args = ["solve", str(fit_p), "--gpus", str(gpus), "--nodes", str(nodes), "--engine",
                engine, "--time-limit", str(time_limit), "--out", str(out_json), "--json"]
        if method != "default":
            args += ["--method", method]
        t0 = time.perf_counter()
        code, out = cli(*args)
        secs = time.perf_counter() - t0
        if code:
            rows.append({**base, "method": method, "note": out[:120]})
            continue
        rep = json.loads(out)["report"]
        h = rep.get("heldout") or {}
        imb, cross = held_out(held_p, out_json)
        rows.append({**base, "method": method if method != "default" else "default (sglang)",
                     "status": rep["status"], "held_out": imb, "eplb": eplb,
                     "minus_eplb": imb - eplb, "cross_gpu": cross, "eplb_cross_gpu": eplb_cross,
                     "fallback_layers": h.get("num_fallback_layers"),
                     "buckets_method": h.get("method_load_imbalance_mean"),
                     "buckets_returned": h.get("load_imbalance_mean"),
                     "buckets_eplb": h.get("reference_load_imbalance_mean"),
                     "seconds": round(secs, 1)})
    # The exflow search without the check, for the before column (library: the CLI always checks).
    stats = compute_stats(fit_tr, coactivation=False)
    c = Cluster(gpus, nodes)
    own, _ = registry.get("search").solve(stats, c, SolveOptions(
        time_limit=time_limit, engine="exflow", num_groups=default_groups(stats)).started())
    summ = evaluate(held_tr, Placement(own.phy2log, gpus, nodes, own.num_experts)).summary
    imb = float(summ["load_imbalance_mean"])
    rows.append({**base, "method": "search (no check)", "status": "local optimum",
                 "held_out": imb, "eplb": eplb, "minus_eplb": imb - eplb,
                 "cross_gpu": float(summ["cross_gpu_pair_fraction"]),
                 "eplb_cross_gpu": eplb_cross})
    return rows


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table (floats to 3 decimals, blanks for missing)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--only", help="run the splits whose name contains this")
    ap.add_argument("--out", type=Path, help="write the table as Markdown here")
    ap.add_argument("--csv", type=Path)
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for sp in build_splits(a.shared):
            if sp.name not in SPLITS or (a.only and a.only not in sp.name):
                continue
            gpus, nodes = CLUSTERS[sp.name.split("/")[0]]
            for fit_label, held_label, fit_tr, held_tr in sp.directions():
                rows += run_direction(sp.name, fit_label, held_label, fit_tr, held_tr, gpus,
                                      nodes, a.time_limit, Path(tmp))
                print(pd.DataFrame(rows[-8:]).to_string(), flush=True)
    df = pd.DataFrame(rows)
    ok = df.dropna(subset=["held_out"])
    checked = ok[~ok["method"].isin(["search (no check)"])]
    head = (f"{len(checked)} rows of checked methods; held-out imbalance at most EPLB's on "
            f"{int((checked['minus_eplb'] <= 1e-9).sum())}, largest excess "
            f"{checked['minus_eplb'].max():+.4f}; machine {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{time.perf_counter() - t0:.0f} s")
    print(head)
    if a.out:
        a.out.write_text(head + "\n\n" + markdown(df) + "\n")
    if a.csv:
        df.to_csv(a.csv, index=False)


if __name__ == "__main__":
    main()

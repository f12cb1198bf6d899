"""Production-size wall time and peak memory of every command, and the evaluator's throughput.

Usage:
    python benchmarks/bench_scale.py [--tokens 1000000 20000000] [--presets deepseek-v3 kimi-k2]
        [--workdir /tmp/moeplace-scale] [--streaming-only-above 5000000] [--time-limit 30]

For each (preset, size) it writes a synthetic trace with ``moeplace synth`` (kept in --workdir
for reruns), then runs ``analyze``, ``stats``, ``evaluate``, ``solve`` and ``convert`` as fresh
processes and reads each one's wall time and peak resident memory from ``os.wait4`` (the
child's own rusage). Above ``--streaming-only-above`` tokens ``solve`` is skipped when
``--skip-solve-large`` is given (the statistics pass dominates; the budget after it is the same).
The evaluator's throughput is measured in-process on up to 2 M tokens with 1 and 3 placements
(compile time excluded). Prints a Markdown table; goals from issue 10.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_RSS_MB = 2048
SHAPES = {"deepseek-v3": (64, 8), "kimi-k2": (64, 8)}  # (GPUs, nodes) for solve


def run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of one command in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_maxrss / 1024, proc.returncode


def evaluator_rate(path: Path, gpus: int, nodes: int, max_tokens: int = 2_000_000
                   ) -> dict[int, float]:
    """Token-layer records/s of the evaluator (one core), per number of placements compared."""
    from moeplace.placement import contiguous, random_placement
    from moeplace.solvers import evaluate_many
    from moeplace.traces import open_trace

    r = open_trace(path)
    L, N = r.meta.num_layers, r.meta.num_experts
    plcs = [contiguous(L, N, gpus, nodes)] + [random_placement(L, N, gpus, nodes, seed=i)
                                              for i in range(2)]

    def limited():  # type: ignore[no-untyped-def]
        n = 0
        for c in r.iter_chunks(1 << 16):
            if n >= max_tokens:
                return
            yield c
            n += c.num_tokens

    first = next(r.iter_chunks(4096))
    evaluate_many(first, plcs, show_progress=False)  # compile outside the timing
    out = {}
    for P in (1, 3):
        t0 = time.perf_counter()
        res = evaluate_many(limited(), plcs[:P], show_progress=False)
        dt = time.perf_counter() - t0
        out[P] = res[0].summary["tokens"] * L / dt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 20_000_000])
    ap.add_argument("--presets", nargs="+", default=["deepseek-v3", "kimi-k2"])
    ap.add_argument("--workdir", default="/tmp/moeplace-scale")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--commands", nargs="+",
                    default=["analyze", "stats", "evaluate", "solve", "convert"])
    ap.add_argument("--streaming-only-above", type=int, default=None,
                    help="Above this many tokens run only analyze, stats, evaluate, convert.")
    ap.add_argument("--keep-converted", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "moeplace.cli"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average at start {os.getloadavg()}", flush=True)
    rows = []
    rates = {}
    for preset in args.presets:
        gpus, nodes = SHAPES.get(preset, (8, 1))
        for T in args.tokens:
            trace = work / f"{preset}-{T}.parquet"
            if not trace.exists():
                wall, rss, rc = run([*py, "synth", "--preset", preset, "--tokens", str(T),
                                     "--out", str(trace)], work / "synth.log")
                rows.append((preset, T, "synth", wall, rss, rc, ""))
            plc = work / f"{preset}-contiguous.json"
            if not plc.exists():
                from moeplace.placement import contiguous
                from moeplace.traces import open_trace

                m = open_trace(trace).meta
                contiguous(m.num_layers, m.num_experts, gpus, nodes).save(plc)
            cmds = {
                "analyze": ["analyze", str(trace)],
                "stats": ["stats", str(trace), "--out", str(work / f"{preset}-{T}.npz")],
                "evaluate": ["evaluate", str(trace), str(plc)],
                "solve": ["solve", str(trace), "--gpus", str(gpus), "--nodes", str(nodes),
                          "--time-limit", f"{args.time_limit:g}", "--json"],
                "convert": ["convert", str(trace), str(work / f"{preset}-{T}-copy.parquet"),
                            "--model", f"{preset}-copy"],
            }
            for name in args.commands:
                if (args.streaming_only_above and T > args.streaming_only_above
                        and name == "solve"):
                    continue
                for p in (work / f"{preset}-{T}.npz", work / f"{preset}-{T}-copy.parquet"):
                    p.unlink(missing_ok=True)
                load = os.getloadavg()[0]
                wall, rss, rc = run([*py, *cmds[name]], work / f"{preset}-{T}-{name}.log")
                rows.append((preset, T, name, wall, rss, rc, f"{load:.1f}"))
                print(f"{preset} {T:>11,} {name:8s} {wall:7.1f} s {rss:7.0f} MB rc={rc} "
                      f"(load {load:.1f})", flush=True)
            if not args.keep_converted:
                (work / f"{preset}-{T}-copy.parquet").unlink(missing_ok=True)
            if T == min(args.tokens):
                rates[preset] = evaluator_rate(trace, gpus, nodes)
                print(f"{preset} evaluator: {rates[preset][1] / 1e6:.1f} M token-layer "
                      f"records/s (1 placement), {rates[preset][3] / 1e6:.1f} M "
                      "(3 placements in one pass)", flush=True)
    print("\n| shape | tokens | command | wall (s) | peak RSS (MB) | exit | load | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, T, name, wall, rss, rc, load in rows:
        goal = f"RSS <= {GOAL_RSS_MB}"
        if T == 1_000_000 and name == "solve":
            goal += f", wall <= 75 s (--time-limit {args.time_limit:g})"
        if T == 1_000_000 and name == "evaluate":
            goal += ", wall <= 15 s"
        ok = rss <= GOAL_RSS_MB and rc == 0
        print(f"| {preset} | {T:,} | {name} | {wall:.1f} | {rss:.0f}{'' if ok else ' (!)'} | "
              f"{rc} | {load} | {goal} |")
    for preset, r in rates.items():
        print(f"\n{preset}: evaluator {r[1] / 1e6:.1f} M token-layer records/s with one "
              f"placement, {r[3] / 1e6:.1f} M with three in one pass (goal >= 10 M, one core)")


if __name__ == "__main__":
    main()

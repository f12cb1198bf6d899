"""Stop latency of ``moeplace solve`` after SIGINT / SIGTERM / SIGHUP, per method and moment.

Run from the repository root: ``python benchmarks/bench_interrupts.py [--wall] [--methods ...]``.
One process at a time (SIGTERM and SIGHUP for the first method only), so the figures are the
mechanism's, not the machine's queue. The signal goes at 0.5, 2, 5 and 10 s into the process:
CPU seconds by default (the same phase whatever the load), wall-clock seconds with ``--wall``
(the acceptance criterion's reading). Prints a Markdown table: exit status, seconds from the
signal to the process's exit, what was left.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.solvers.test_interrupts as ti  # noqa: E402  (the test's process helpers)
from moeplace.traces.store import write_trace  # noqa: E402
from moeplace.traces.synthetic import preset, synthetic_trace  # noqa: E402

CASES = {  # method -> (trace, gpus, extra flags)
    "cpsat": ("wide", 8, []),
    "ilp-cbc": ("wide", 8, []),
    "ilp-highs": ("wide", 8, []),
    "moetuner": ("wide", 8, []),
    "dp": ("deep", 4, []),
    "search (sglang)": ("searched", 8, ["--engine", "sglang"]),
    "search (exflow)": ("searched", 8, ["--engine", "exflow", "--restarts", "8"]),
}


def _traces(d: Path) -> dict[str, Path]:
    shared = Path(os.environ.get("MOEPLACE_SHARED", ROOT.parent / "shared"))
    real = shared / "traces/flame-moe-290m/flame_moe_290m_prefill_2048tok.npz"
    wide = real if real.exists() else write_trace(
        synthetic_trace("flame-moe-290m", 2048, seed=0), d / "wide.parquet")
    L = 64
    deep = write_trace(synthetic_trace(preset("mixtral", num_layers=L, moe_layer_ids=tuple(range(L)),
                                              num_hidden_layers=L), 2000, seed=0), d / "deep.parquet")
    searched = write_trace(synthetic_trace("deepseek-v2-lite", 4000, seed=0), d / "searched.parquet")
    return {"wide": Path(wide), "deep": deep, "searched": searched}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wall", action="store_true", help="moments in wall-clock seconds")
    ap.add_argument("--methods", nargs="*", default=list(CASES))
    ap.add_argument("--moments", nargs="*", type=float, default=list(ti.MOMENTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        traces = _traces(d)
        print(f"| method | signal | at ({'wall' if args.wall else 'CPU'} s) | exit | stop (s) | "
              "left behind |")
        print("|---|---|---|---|---|---|")
        for j, name in enumerate(args.methods):
            trace, gpus, extra = CASES[name]
            method = name.split()[0]
            runs = [(m, signal.SIGINT) for m in args.moments]
            if j == 0:  # the other two signals take the same path: once each
                runs += [(5.0, signal.SIGTERM), (5.0, signal.SIGHUP)]
            for i, (moment, sig) in enumerate(runs):
                base = d / f"{method}-{i}"
                base.mkdir()
                o = ti._run([str(traces[trace]), "--gpus", str(gpus), "--method", method, *extra],
                            moment, sig, base, wall=args.wall)
                stop = "finished first" if o.finished_first else f"{o.stop_s:.2f}"
                left = ", ".join(o.leftovers + o.orphans) or "nothing"
                print(f"| {name} | {sig.name} | {moment:g} | {o.returncode} | {stop} | {left} |",
                      flush=True)


if __name__ == "__main__":
    main()

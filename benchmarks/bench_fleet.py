"""Fleet-scale statistics on Ray: records/s against the number of workers, and the projection
for an hour of a 64-GPU deployment and for a fleet of ten.

    python benchmarks/bench_fleet.py [--tokens 2000000] [--shards 16] [--workers 1,2]

Writes a DeepSeek-V3-shape synthetic trace as shards (once, under --dir), then counts it with
the single-process path and with ``stats_on_ray`` on local Ray instances of 1, 2, ... CPUs.
A record is one token at one MoE layer (the statistics kernel's unit of work). The projection:
an hour at ``--rate`` tokens/s over 58 MoE layers is ``rate * 3600 * 58`` records; its time on
W workers is records / (per-worker rate * W * efficiency), with the efficiency measured here at
the largest W (shards are independent, so it stays near the measured value until the driver's
summing of partial counts, ~0.1 s per task at this shape, dominates).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeplace.service.fleet import ray_session, stats_on_ray
from moeplace.traces import compute_stats
from moeplace.traces.store import TraceReader

LAYERS = 58


def make_shards(d: Path, tokens: int, shards: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = sorted(d.glob("*.parquet"))
    if len(files) == shards:
        return files
    per = tokens // shards
    for i in range(shards):
        out = d / f"part-{i:05d}.parquet"
        if not out.exists():
            subprocess.run([sys.executable, "-m", "moeplace.cli", "synth", "--preset",
                            "deepseek-v3", "--tokens", str(per), "--seed", str(i), "--out",
                            str(out)], check=True, stdout=subprocess.DEVNULL)
    return sorted(d.glob("*.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--dir", default="/tmp/moeplace-bench-fleet")
    ap.add_argument("--rate", type=float, default=100_000, help="tokens/s of one deployment")
    a = ap.parse_args()
    files = make_shards(Path(a.dir), a.tokens, a.shards)
    tokens = sum(TraceReader(f).num_tokens for f in files)
    records = tokens * LAYERS
    rows = []
    t0 = time.perf_counter()
    total = None
    for f in files:
        part = compute_stats(TraceReader(f), show_progress=False)
        total = part if total is None else total + part
    single = time.perf_counter() - t0
    rows.append(("single process", 1, single, records / single))
    starts = {}
    for w in [int(x) for x in a.workers.split(",")]:
        t0 = time.perf_counter()
        with ray_session("local", num_cpus=w):
            starts[w] = time.perf_counter() - t0
            t1 = time.perf_counter()
            st = stats_on_ray([str(f) for f in files], "local", show_progress=False)
            secs = time.perf_counter() - t1
        assert st.num_tokens == tokens and (st.load == total.load).all()
        rows.append((f"ray local, {w} CPU", w, secs, records / secs))
    per_worker = rows[0][3]
    best = rows[-1]
    eff = best[3] / (per_worker * best[1])
    hour = a.rate * 3600 * LAYERS
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{tokens:,} tokens x {LAYERS} layers = {records / 1e6:.0f} M records in {len(files)} "
          "shards (DeepSeek-V3 shape, top-8 of 256)\n")
    print("| path | workers | Ray start (s) | seconds | M records/s | vs single |")
    print("|---|---|---|---|---|---|")
    for name, w, secs, rate in rows:
        start = f"{starts[w]:.1f}" if name.startswith("ray") else "-"
        print(f"| {name} | {w} | {start} | {secs:.1f} | {rate / 1e6:.1f} | "
              f"{rate / per_worker:.2f}x |")
    print(f"\nprojection (per-worker {per_worker / 1e6:.1f} M records/s, efficiency {eff:.2f} "
          f"measured at {best[1]} workers): one hour of one deployment at {a.rate:,.0f} tokens/s "
          f"= {hour / 1e9:.1f} G records")
    for fleet in (1, 10):
        for w in (1, 16, 64):
            secs = fleet * hour / (per_worker * w * (1.0 if w == 1 else eff))
            print(f"  fleet of {fleet:>2}, {w:>2} workers: {secs / 60:.1f} min")


if __name__ == "__main__":
    main()

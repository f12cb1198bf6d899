"""Statistics throughput from Parquet and peak memory on a 20-million-token synthetic trace.

Usage: python benchmarks/bench_stats.py [--tokens 20000000] [--preset deepseek-v2-lite]
Writes a synthetic trace (streamed), then in fresh single-threaded subprocesses aggregates it
with each kernel backend and reports token-layer records per second and peak resident memory.
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

CHILD = r"""
import json, os, resource, sys, time
from moeplace.traces import compute_stats, open_trace
path, backend, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = open_trace(path)
chunks = r.iter_chunks(1 << 16, weights=False, token_fields=False)
if backend != "auto":
    from moeplace.traces.stats import RoutingStats
    # warm the JIT on a tiny chunk so compile time is not counted as throughput
    first = next(chunks)
    RoutingStats.zeros(r.meta).add_trace(first.select(slice(0, 64)), backend)
    def gen(first=first):
        yield first
        yield from chunks
    it = gen()
else:
    it = chunks
def limited(it):
    n = 0
    for c in it:
        if n >= limit:
            break
        yield c
        n += c.num_tokens
t = time.perf_counter()
s = compute_stats(limited(it), backend=backend, show_progress=False)
dt = time.perf_counter() - t
# VmHWM belongs to this process image; ru_maxrss would include the parent's peak (kept over exec).
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        rss = int(line.split()[1]) * 1024
print(json.dumps({"tokens": s.num_tokens, "layers": s.num_layers, "seconds": dt,
                  "records_per_s": s.num_tokens * s.num_layers / dt, "peak_rss_bytes": rss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--numpy-tokens", type=int, default=2_000_000,
                    help="tokens for the (slower) numpy fallback run")
    ap.add_argument("--keep", help="keep the trace at this path")
    args = ap.parse_args()
    from moeplace._progress import Progress
    from moeplace.traces import SyntheticRouter, TraceWriter
    from moeplace.traces.synthetic import preset

    tmp = tempfile.mkdtemp()
    path = Path(args.keep or Path(tmp) / "bench.parquet")
    router = SyntheticRouter(preset(args.preset), seed=0)
    t = time.perf_counter()
    bar = Progress(args.tokens, "write", "tokens")
    with TraceWriter(path, router.meta, token_fields=["request", "position", "phase"]) as w:
        for chunk in router.sample(args.tokens, chunk_tokens=1 << 18):
            w.write(chunk)
            bar.update(chunk.num_tokens)
    bar.close()
    write_s = time.perf_counter() - t
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    results = {}
    for backend, limit in (("numba", args.tokens), ("numpy", args.numpy_tokens)):
        # taskset pins the child to one core so the figure is a one-core figure
        cmd = ["taskset", "-c", "0", sys.executable, "-c", CHILD, str(path), backend, str(limit)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    report = {
        "command": "python benchmarks/bench_stats.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "preset": args.preset, "tokens": args.tokens, "parquet_bytes": path.stat().st_size,
        "write_seconds": write_s, "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

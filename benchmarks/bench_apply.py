"""Checkpoint rewriting: throughput and peak resident memory of ``moeplace apply`` on a
synthetic sharded safetensors checkpoint (fused 5.x expert tensors, bf16-sized rows).

Usage: python benchmarks/bench_apply.py [--layers 4] [--experts 64] [--hidden 2048]
       [--intermediate 512] [--dir /tmp/moeplace-bench-apply]
Prints Markdown; the numbers in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moeplace.placement import random_placement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--dir", default="/tmp/moeplace-bench-apply")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    src = root / "ckpt"
    src.mkdir(parents=True)
    L, N, H, I = args.layers, args.experts, args.hidden, args.intermediate
    rng = np.random.default_rng(0)
    weight_map, largest = {}, 0
    for l in range(L):
        # float16 stands in for bf16: both 2 bytes, and the rewriter never looks at values.
        t = {f"model.layers.{l}.mlp.gate.weight": rng.standard_normal((N, H), np.float32),
             f"model.layers.{l}.mlp.experts.gate_up_proj":
                 rng.standard_normal((N, 2 * I, H), np.float32).astype(np.float16),
             f"model.layers.{l}.mlp.experts.down_proj":
                 rng.standard_normal((N, H, I), np.float32).astype(np.float16)}
        name = f"model-{l + 1:05d}-of-{L:05d}.safetensors"
        save_file(t, src / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        largest = max(largest, *(v.nbytes for v in t.values()))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    plc_path = root / "plc.json"
    random_placement(L, N, 8, seed=0, moe_layer_ids=tuple(range(L))).save(plc_path)
    # The child reports VmHWM, its own address space's peak: Linux carries ru_maxrss across
    # fork and exec, so getrusage would report this process's generated tensors.
    child = ("import re, sys, time\n"
             "from moeplace.placement import Placement\n"
             "from moeplace.placement.checkpoint import rewrite_checkpoint\n"
             "t0 = time.perf_counter()\n"
             "rewrite_checkpoint(sys.argv[1], sys.argv[2], Placement.load(sys.argv[3]))\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print(time.perf_counter() - t0, hwm)")
    rows = []
    for run in ("first (just written)", "second"):
        shutil.rmtree(root / "placed", ignore_errors=True)
        os.sync()
        out = subprocess.run([sys.executable, "-c", child, str(src), str(root / "placed"),
                              str(plc_path)], check=True, capture_output=True, text=True).stdout
        secs, kib = (float(x) for x in out.split())
        rows.append((run, secs, kib * 1024))
    print("Command: `python benchmarks/bench_apply.py " + " ".join(sys.argv[1:]) + "`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}.\n")
    print("| checkpoint | largest tensor | run | rewrite time | throughput | peak RSS (whole process) |")
    print("|---|---|---|---|---|---|")
    for run, secs, peak in rows:
        print(f"| {L} shards, {total / 2**30:.2f} GiB | {largest / 2**20:.0f} MiB | {run} | "
              f"{secs:.1f} s | {total / 2**30 / secs:.2f} GiB/s | {peak / 2**20:.0f} MiB |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

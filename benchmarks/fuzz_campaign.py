"""The long fuzz campaign: mutated inputs of every format and random flag values through every
subcommand, each in a real process, judged by the promises (one stderr line and exit 2, or exit 0
with a valid output; no traceback; inputs unchanged; nothing left behind; no hang; peak RSS under
2 GB), for a wall-clock budget.

    python benchmarks/fuzz_campaign.py --budget 1800 --jobs 2 [--seed 7] [--report out.json]

Prints a summary table (cases, findings by kind, peak RSS, slowest case) and every finding with
the arguments that reproduce it; exit 1 if anything was found. The CI suite runs the same corpus
in-process for about two minutes (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import corpus
from tests.fuzz.harness import judge, run_subprocess, snapshot

INPUT_NAMES = {"parquet": "trace.parquet", "npz": "trace.npz", "stats": "stats.npz",
               "placement": "placement.json", "vllm": "vllm.jsonl", "sglang": "sglang.jsonl",
               "megatron": "router_trace_rank0.jsonl", "checkpoint": "ckpt"}


def one_case(seeds: Path, case_seed: int, timeout: float) -> dict:
    rng = random.Random(case_seed)
    work = Path(tempfile.mkdtemp(prefix="fuzzc-"))
    try:
        for p in seeds.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, work / p.name)
        paths = {"OUT": work / "out", "TRACE": work / "trace.parquet",
                 "PLACEMENT": work / "placement.json", "DECODE": work / "decode.json",
                 "CKPT": work / "ckpt"}
        if rng.random() < 0.25:
            kind = "flags"
            base, flags = rng.choice(corpus.FLAG_COMMANDS)
            args = list(base)
            for flag in rng.sample(flags, rng.randint(1, min(3, len(flags)))):
                value = rng.choice(corpus.FLAG_VALUES)
                if flag == "--tokens" and value not in ("-1", "0", "nan", "eight", ""):
                    continue
                args += [flag, value]
            args = corpus.fill(args, **paths)
        else:
            kind = rng.choice(sorted(INPUT_NAMES))
            target = work / f"in-{INPUT_NAMES[kind]}"
            if kind == "checkpoint":
                shutil.copytree(work / INPUT_NAMES[kind], target)
                corpus.mutate_checkpoint(target, rng)
            else:
                target.write_bytes(corpus.MUTATORS[kind](work / INPUT_NAMES[kind], rng))
            args = corpus.fill(rng.choice(corpus.COMMANDS[kind]), IN=target, **paths)
        before = snapshot(work)
        out = judge(run_subprocess(args, work, timeout), work, before, set(before))
        return {"seed": case_seed, "kind": kind, "args": [a.replace(str(work), "$W") for a in args],
                "exit": out.exit_code, "seconds": round(out.seconds, 2),
                "peak_rss_mb": round(out.peak_rss_mb, 1), "problems": out.problems}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget", type=float, default=600, help="wall-clock seconds")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cases", type=int, default=0, help="stop after this many (0: budget only)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds before a case is a hang")
    ap.add_argument("--report", help="write every case as JSON here")
    a = ap.parse_args()
    seeds = Path(tempfile.mkdtemp(prefix="fuzz-seeds-"))
    for make in corpus.SEEDS.values():
        make(seeds)
    t0 = time.monotonic()
    results: list[dict] = []
    next_seed = a.seed * 1_000_000
    with ThreadPoolExecutor(a.jobs) as pool:
        running = set()
        while True:
            done_budget = time.monotonic() - t0 > a.budget or (
                a.max_cases and next_seed - a.seed * 1_000_000 >= a.max_cases)
            while not done_budget and len(running) < a.jobs:
                running.add(pool.submit(one_case, seeds, next_seed, a.timeout))
                next_seed += 1
            if not running:
                break
            finished = {f for f in running if f.done()}
            if not finished:
                time.sleep(0.02)
                continue
            running -= finished
            for f in finished:
                results.append(f.result())
                if results[-1]["problems"]:
                    print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(seeds, ignore_errors=True)
    wall = time.monotonic() - t0
    bad = [r for r in results if r["problems"]]
    kinds = Counter(p.split(":")[0].split(" ")[0] for r in bad for p in r["problems"])
    exits = Counter(r["exit"] for r in results)
    slow = max(results, key=lambda r: r["seconds"]) if results else None
    print(f"\n{len(results)} cases in {wall:.0f} s ({a.jobs} jobs): "
          f"{sum(r['exit'] == 2 for r in results)} refused (exit 2), "
          f"{sum(r['exit'] == 0 for r in results)} accepted (exit 0), {len(bad)} with findings")
    print(f"by kind: {dict(Counter(r['kind'] for r in results))}")
    print(f"exit codes: {dict(exits)}; findings: {dict(kinds) or 'none'}")
    print(f"peak RSS of any case: {max((r['peak_rss_mb'] for r in results), default=0):.0f} MB; "
          f"slowest: {slow['seconds'] if slow else 0:.1f} s {slow['args'] if slow else ''}")
    if a.report:
        Path(a.report).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz every reader and every subcommand's flags (hypothesis, seeded, under a minute in CI).

Each case: a valid seed file of one format is mutated (truncation, byte flips, header and field
mutations, type swaps, huge declared sizes), then read by a command that takes that format. The
case passes when the command exits 2 with exactly one stderr line, or exits 0 with an output that
reads back; with no traceback, its inputs unchanged and nothing left behind. The longer campaign,
with real processes, peak RSS and hang detection, is ``benchmarks/fuzz_campaign.py --budget``.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import corpus
from tests.fuzz.harness import judge, run_inprocess, snapshot


def fuzz(examples: int) -> settings:
    """Seeded (the same cases every run, so CI is reproducible), no deadline, no database."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seeds")
    for make in corpus.SEEDS.values():
        make(d)
    return d


def _case(seeds: Path, kind: str, rng: random.Random) -> None:
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        for p in seeds.iterdir():  # valid companions beside the mutated input
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, work / p.name)
        ins = {"parquet": "trace.parquet", "npz": "trace.npz", "stats": "stats.npz",
               "placement": "placement.json", "vllm": "vllm.jsonl", "sglang": "sglang.jsonl",
               "megatron": "router_trace_rank0.jsonl", "checkpoint": "ckpt"}[kind]
        target = work / f"in-{ins}"
        if kind == "checkpoint":
            shutil.copytree(work / ins, target)
            corpus.mutate_checkpoint(target, rng)
        else:
            target.write_bytes(corpus.MUTATORS[kind](work / ins, rng))
        args = corpus.fill(rng.choice(corpus.COMMANDS[kind]), IN=target, OUT=work / "out",
                           TRACE=work / "trace.parquet", PLACEMENT=work / "placement.json",
                           DECODE=work / "decode.json", CKPT=work / "ckpt")
        before = snapshot(work)
        out = judge(run_inprocess(args), work, before, inputs=set(before))
        assert out.ok, f"{args}: {out.problems}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("kind,examples", [
    ("parquet", 250), ("npz", 300), ("stats", 200), ("placement", 250), ("vllm", 150),
    ("sglang", 150), ("megatron", 150), ("checkpoint", 250)])
def test_mutated_inputs(seeds, kind, examples):
    @fuzz(examples)
    @given(st.randoms(use_true_random=False))
    def inner(rng: random.Random) -> None:
        _case(seeds, kind, rng)

    inner()


@fuzz(500)
@given(st.randoms(use_true_random=False))
def test_flags(seeds, rng):
    base, flags = rng.choice(corpus.FLAG_COMMANDS)
    args = list(base)
    for flag in rng.sample(flags, rng.randint(1, min(3, len(flags)))):
        value = rng.choice(corpus.FLAG_VALUES)
        if flag == "--tokens" and value not in ("-1", "0", "nan", "eight", ""):
            continue  # a large token count is a valid (slow) request, not bad input
        if flag == "--gpus" and args[0] == "demo" and value in ("2147483648",):
            continue
        args += [flag, value]
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        for p in seeds.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, work / p.name)
        full = corpus.fill(args, OUT=work / "out", TRACE=work / "trace.parquet",
                           PLACEMENT=work / "placement.json", DECODE=work / "decode.json",
                           CKPT=work / "ckpt")
        before = snapshot(work)
        out = judge(run_inprocess(full), work, before, inputs=set(before))
        assert out.ok, f"{full}: {out.problems}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

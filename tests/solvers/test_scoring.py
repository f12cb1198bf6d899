"""Budgeted scoring and the streamed holdout split against their in-memory counterparts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from moeplace.placement import contiguous, random_placement
from moeplace.solvers import evaluate
from moeplace.solvers.scoring import held_requests, plan_sample, score_placements, split_stream
from moeplace.traces import Trace, open_trace, write_trace
from tests.conftest import random_trace


def test_streamed_split_equals_in_memory_split(tmp_path, rng):
    tr = random_trace(rng, 3000, 3, 16, 2, requests=40)
    tr.tokens["request"] = rng.permutation(tr.tokens["request"])  # interleaved requests
    path = write_trace(tr, tmp_path / "t.parquet", row_group_tokens=500)
    fit, hold = tr.split_requests(0.3, seed=5)
    held = held_requests(open_trace(path), 0.3, 5)
    for part, want in (("fit", fit), ("holdout", hold)):
        got = Trace.concat(list(split_stream(open_trace(path), held, part, chunk_tokens=700)))
        np.testing.assert_array_equal(got.experts, want.experts)
        np.testing.assert_array_equal(got.tokens["request"], want.tokens["request"])


def test_full_scoring_equals_evaluate(rng):
    tr = random_trace(rng, 900, 3, 16, 2, requests=9)
    plcs = {"a": contiguous(3, 16, 4, 2), "b": random_placement(3, 16, 4, 2, seed=3)}
    rep = score_placements(tr, plcs, total_tokens=900, num_layers=3, window=64)
    assert rep.scoring["sample_fraction"] == 1.0 and rep.scoring["tokens_scored"] == 900
    for name, p in plcs.items():
        want = evaluate(tr, p, window=64).summary
        for key in ("load_imbalance_mean", "window_imbalance_max", "cross_gpu_pair_fraction",
                    "traffic_follow", "traffic_static_total"):
            assert rep.summaries[name][key] == pytest.approx(want[key]), key


def test_short_budget_scores_a_stated_seeded_sample(rng):
    tr = random_trace(rng, 4000, 3, 16, 2, requests=9)
    plcs = {"a": contiguous(3, 16, 4, 2)}
    # pretend the trace is enormous for the plan: a tiny fraction of windows is scored
    frac = plan_sample(10**9, 3, 1, 1.0, compiled=True, window=10)
    assert 0 < frac < 0.01
    deadline = time.monotonic() + 5.0
    a = score_placements(tr, plcs, total_tokens=4000, num_layers=3, window=50,
                         deadline=deadline, seed=7)
    assert a.scoring["tokens_in_trace"] == 4000
    # a generous budget for 4000 tokens scores everything
    assert a.scoring["sample_fraction"] == 1.0
    # planned as if the trace were 10,000 times longer than it is: a small sample
    past = score_placements(tr, plcs, total_tokens=4 * 10**7, num_layers=3, window=10,
                            deadline=time.monotonic() + 1.0, seed=7)
    again = score_placements(tr, plcs, total_tokens=4 * 10**7, num_layers=3, window=10,
                             deadline=time.monotonic() + 1.0, seed=7)
    assert past.scoring["sample_fraction"] < 0.2
    assert 0 < past.scoring["tokens_scored"] < 4000
    assert past.scoring["tokens_scored"] % 10 == 0  # whole windows
    assert past.summaries == again.summaries  # seeded


def test_reader_sample_reads_only_chosen_row_groups(tmp_path, rng):
    """A Parquet trace is sampled by whole row groups; the result equals evaluating exactly
    those groups, and the holdout side is sampled the same way."""
    tr = random_trace(rng, 6000, 3, 16, 2, requests=30)
    path = write_trace(tr, tmp_path / "t.parquet", row_group_tokens=200)
    reader = open_trace(path)
    plcs = {"a": contiguous(3, 16, 4, 2)}
    rep = score_placements(reader, plcs, total_tokens=6 * 10**7, num_layers=3, window=50,
                           deadline=time.monotonic() + 1.0, seed=4)
    info = rep.scoring
    assert info["sample_unit"] == "row groups" and info["sample_fraction"] < 1.0
    from moeplace.solvers.scoring import sample_row_groups

    groups, n = sample_row_groups(reader, info["sample_fraction"], 4)
    assert info["tokens_scored"] == n and 0 < n < 6000 and n % 200 == 0
    sub = Trace.concat(list(reader.iter_chunks(row_groups=groups)))
    want = evaluate(sub, plcs["a"], window=50).summary
    assert rep.summaries["a"]["traffic_static_total"] == want["traffic_static_total"]
    held = held_requests(reader, 0.5, 1)
    hold = score_placements(reader, plcs, total_tokens=3 * 10**7, num_layers=3, window=50,
                            deadline=time.monotonic() + 1.0, seed=4, split=(held, "holdout"))
    assert 0 < hold.scoring["tokens_scored"] < n

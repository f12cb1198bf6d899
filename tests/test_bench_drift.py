"""The drift-split benchmark (benchmarks/bench_drift.py): its splits are real partitions of the
reference traces (checked against the files' own rows), and one small split runs end to end
with the held-out part, not the fitted one, scored. No timing and no verdict on the solver."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEEPSEEK, FLAME, MIXTRAL, QWEN, SHARED, shared_file

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_drift.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_drift", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_drift"] = mod
    spec.loader.exec_module(mod)
    return mod


def _raw(path: Path, name: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[name]


def _check_partition(split, files: dict[int, np.ndarray]) -> None:
    """Each pool token is one row of one source file (same experts), no row twice, and the
    two parts together hold exactly the pool."""
    pool, in_a = split.pool, split.in_a
    assert in_a.dtype == bool and in_a.shape == (pool.num_tokens,)
    a, b = split.parts()
    assert a.num_tokens + b.num_tokens == pool.num_tokens
    assert 0 < a.num_tokens < pool.num_tokens
    keys = split.origin["file"].astype(np.int64) * (1 << 40) + split.origin["row"]
    assert len(np.unique(keys)) == pool.num_tokens  # no source row twice: not in both parts
    assert not np.intersect1d(keys[in_a], keys[~in_a]).size
    for f, experts in files.items():
        m = split.origin["file"] == f
        np.testing.assert_array_equal(pool.experts[m], experts[split.origin["row"][m]])
    # Part A/B are the pool's tokens in pool order.
    np.testing.assert_array_equal(a.experts, pool.experts[in_a])
    np.testing.assert_array_equal(b.experts, pool.experts[~in_a])


def test_real_splits_are_partitions(bench):
    path = shared_file(DEEPSEEK)
    shared_file(MIXTRAL)
    shared_file(FLAME)
    shared_file(QWEN)
    splits = {s.name: s for s in bench.build_splits(SHARED, None)
              if not s.name.startswith("synthetic")}
    assert set(splits) == {n for n in bench.SPLIT_NAMES if not n.startswith("synthetic")}

    # DeepSeek: every token of the file is in the pool; whole prompts go to one side.
    ds = _raw(path, "experts")
    pid = _raw(path, "prompt_id")
    for name in ("deepseek/topic", "deepseek/half"):
        s = splits[name]
        assert s.pool.num_tokens == len(ds)  # nothing lost
        _check_partition(s, {0: ds})
        req = s.pool.tokens["request"]
        np.testing.assert_array_equal(req, pid[s.origin["row"]])
        assert not np.intersect1d(req[s.in_a], req[~s.in_a]).size
    half = splits["deepseek/half"]
    assert half.pool.tokens["request"][half.in_a].max() <= 500
    assert half.pool.tokens["request"][~half.in_a].min() > 500
    # The keyword rule on prompts read by hand: 510 asks about html/css, 4 about glycolysis.
    topic = splits["deepseek/topic"]
    code_ids = set(np.unique(topic.pool.tokens["request"][topic.in_a]).tolist())
    assert 510 in code_ids and 4 not in code_ids
    assert bench.is_code("how do i write a python loop") and not bench.is_code("a poem on rain")

    # Mixtral: complete decode rows only (the README's 255 marker), split by the file's dataset.
    mpath = SHARED / "traces" / MIXTRAL
    me = _raw(mpath, "experts")
    complete = ~(me == 255).any(axis=(1, 2))
    s = splits["mixtral/dataset"]
    assert s.pool.num_tokens == int(complete.sum())
    _check_partition(s, {0: me})
    dataset = _raw(mpath, "dataset")[s.origin["row"]]
    assert (dataset[s.in_a] == 0).all() and (dataset[~s.in_a] == 1).all()
    pe = _raw(mpath, "prefill_experts")
    s = splits["mixtral/phase"]
    _check_partition(s, {0: me, 1: pe})
    assert (s.origin["file"][s.in_a] == 1).all() and (s.origin["file"][~s.in_a] == 0).all()
    assert int(s.in_a.sum()) == int((~(pe == 255).any(axis=(1, 2))).sum())

    # FLAME: 2,048 rows of one file vs the other file's [seq, pos] rows minus the 4 sequences
    # that repeat rows of the first (its README).
    fa = _raw(SHARED / "traces" / FLAME, "experts")
    fb = _raw(SHARED / "traces" / "flame-moe-290m/flame_moe_290m_first10pos_64seq.npz",
              "experts")
    s = splits["flame/prefill-vs-first10"]
    _check_partition(s, {0: fa, 1: fb.reshape(-1, *fb.shape[2:])})
    assert int(s.in_a.sum()) == len(fa)
    assert int((~s.in_a).sum()) == (fb.shape[0] - 4) * fb.shape[1]

    # Qwen: every token, split by batching step.
    qe = _raw(SHARED / "traces" / QWEN, "experts")
    step = _raw(SHARED / "traces" / QWEN, "step")
    for name in ("qwen/early-late", "qwen/prefill-decode"):
        s = splits[name]
        assert s.pool.num_tokens == len(qe)
        _check_partition(s, {0: qe})
        st = step[s.origin["row"]]
        assert st[s.in_a].max() < st[~s.in_a].min()


def test_one_split_end_to_end(bench):
    shared_file(QWEN)
    (split,) = [s for s in bench.build_splits(SHARED, "qwen/prefill-decode")]
    G, M, R = 6, 2, 0
    df = bench.run_split(split, [(G, M, R)], time_limit=1.0, directions=(0,))
    a, b = split.parts()
    assert list(df["method"]) == list(bench.METHODS)
    assert (df["fit_tokens"] == a.num_tokens).all()
    assert (df["scored_tokens"] == b.num_tokens).all()  # the held-out part was scored
    for col in bench.METRICS:
        assert np.isfinite(df[col]).all() and np.isfinite(df[f"fit_{col}"]).all()
    # Independent count for contiguous (GPU g holds experts g*N/G .. (g+1)*N/G-1): per-layer
    # max/mean GPU load on the held-out part.
    N = b.num_experts
    loads = np.stack([np.bincount(b.experts[:, l].ravel() // (N // G), minlength=G)
                      for l in range(b.num_layers)])
    want = float((loads.max(axis=1) / loads.mean(axis=1)).mean())
    got = df.loc[df["method"] == "contiguous", "load_imbalance_mean"].item()
    assert got == pytest.approx(want, rel=1e-9)
    fit_loads = np.stack([np.bincount(a.experts[:, l].ravel() // (N // G), minlength=G)
                          for l in range(a.num_layers)])
    assert df.loc[df["method"] == "contiguous", "fit_load_imbalance_mean"].item() == \
        pytest.approx(float((fit_loads.max(axis=1) / fit_loads.mean(axis=1)).mean()), rel=1e-9)
    v = bench.verdicts(df)
    assert len(v) == 1 and v["verdict"].item() in ("PASS", "FAIL")
    assert v["default_minus_eplb"].item() == pytest.approx(
        v["default"].item() - v["eplb"].item())
    text = bench.report(df, [split], "cmd", 1.0, 1.0)
    assert "qwen/prefill-decode" in text and v["verdict"].item() in text


def test_synthetic_mixes_differ_in_subjects(bench):
    """The two synthetic mixes come from one model but different subjects: their layer-0 expert
    loads differ far more than two samples of one mix do."""
    s = bench.synthetic_split(tokens=4000)
    a, b = s.parts()
    assert a.num_tokens == b.num_tokens == 4000
    assert not np.intersect1d(a.tokens["request"], b.tokens["request"]).size
    N = a.num_experts

    def share(t):
        return np.bincount(t.experts[:, 0].ravel(), minlength=N) / t.num_tokens

    between = np.abs(share(a) - share(b)).sum()
    within = np.abs(share(a.select(slice(0, 2000))) - share(a.select(slice(2000, None)))).sum()
    assert between > 2 * within

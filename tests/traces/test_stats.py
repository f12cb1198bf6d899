from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.traces import RoutingStats, compute_stats, import_trace, write_trace
from moeplace.traces._kernels import HAVE_NUMBA
from tests.conftest import DEEPSEEK, DEEPSEEK_COUNTS, FLAME, FLAME_COUNTS, random_trace, shared_file

BACKENDS = ["numpy", "numba"] if HAVE_NUMBA else ["numpy"]


def brute_force(experts: np.ndarray, N: int):
    T, L, _k = experts.shape
    load = np.zeros((L, N), np.int64)
    trans = np.zeros((L - 1, N, N), np.int64)
    co = np.zeros((L, N, N), np.int64)
    for t in range(T):
        for l in range(L):
            for a in experts[t, l]:
                load[l, a] += 1
                for b in experts[t, l]:
                    co[l, a, b] += 1
                if l + 1 < L:
                    for b in experts[t, l + 1]:
                        trans[l, a, b] += 1
    return load, trans, co


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 40), L=st.integers(1, 4), N=st.integers(1, 9), k=st.integers(1, 3),
       seed=st.integers(0, 10**6))
def test_stats_equal_brute_force(backend, T, L, N, k, seed):
    k = min(k, N)
    tr = random_trace(np.random.default_rng(seed), T, L, N, k)
    s = compute_stats(tr, backend=backend)
    load, trans, co = brute_force(tr.experts, N)
    np.testing.assert_array_equal(s.load, load)
    np.testing.assert_array_equal(s.transitions, trans)
    np.testing.assert_array_equal(s.coactivation, co)
    assert s.num_tokens == T


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), cut=st.integers(1, 49))
def test_stats_of_shards_add_up_exactly(seed, cut):
    tr = random_trace(np.random.default_rng(seed), 50, 3, 6, 2)
    whole = compute_stats(tr)
    parts = compute_stats(tr.select(slice(0, cut))) + compute_stats(tr.select(slice(cut, None)))
    np.testing.assert_array_equal(parts.load, whole.load)
    np.testing.assert_array_equal(parts.transitions, whole.transitions)
    np.testing.assert_array_equal(parts.coactivation, whole.coactivation)
    assert parts.num_tokens == whole.num_tokens


def test_stats_npz_round_trip(tmp_path, rng):
    s = compute_stats(random_trace(rng, 30, 3, 5, 2))
    back = RoutingStats.load_npz(s.save(tmp_path / "s.npz"))
    for f in ("load", "transitions", "coactivation"):
        np.testing.assert_array_equal(getattr(back, f), getattr(s, f))
    assert back.num_tokens == s.num_tokens and back.meta == s.meta


def test_streaming_from_parquet_matches_in_memory(tmp_path, rng):
    tr = random_trace(rng, 3000, 4, 16, 3)
    p = write_trace(tr, tmp_path / "t.parquet", row_group_tokens=700)
    a, b = compute_stats(p, chunk_tokens=512), compute_stats(tr)
    np.testing.assert_array_equal(a.transitions, b.transitions)
    np.testing.assert_array_equal(a.coactivation, b.coactivation)


@pytest.mark.parametrize("trace,counts", [(DEEPSEEK, DEEPSEEK_COUNTS), (FLAME, FLAME_COUNTS)])
def test_stats_match_shared_derived_counts(trace, counts):
    s = compute_stats(import_trace(shared_file(trace)))
    ref = np.load(shared_file(counts))
    np.testing.assert_array_equal(s.load, ref["load"])
    np.testing.assert_array_equal(s.transitions, ref["transitions"])
    np.testing.assert_array_equal(np.einsum("laa->la", s.coactivation), s.load)

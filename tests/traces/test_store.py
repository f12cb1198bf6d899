from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.errors import InputError
from moeplace.traces import Trace, TraceMeta, TraceWriter, open_trace, read_trace, write_trace
from tests.conftest import random_trace


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 60), L=st.integers(1, 4), N=st.sampled_from([2, 7, 300]),
       k=st.integers(1, 2), weights=st.booleans(), req=st.booleans(), sharded=st.booleans(),
       seed=st.integers(0, 10**6))
def test_parquet_round_trip_lossless(tmp_path_factory, T, L, N, k, weights, req, sharded, seed):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, T, L, N, k, weights=weights, requests=3 if req else None)
    path = tmp_path_factory.mktemp("rt") / ("t" if sharded else "t.parquet")
    write_trace(tr, path, shard_tokens=7, row_group_tokens=5)
    back = read_trace(path)
    assert back.experts.dtype == tr.experts.dtype
    np.testing.assert_array_equal(back.experts, tr.experts)
    if weights:
        np.testing.assert_array_equal(back.weights, tr.weights)
    else:
        assert back.weights is None
    assert sorted(back.tokens) == sorted(tr.tokens)
    for k_ in tr.tokens:
        np.testing.assert_array_equal(back.tokens[k_], tr.tokens[k_])
    assert back.meta.to_dict() | {"source": ""} == tr.meta.to_dict() | {"source": ""}
    # Streaming gives the same tokens in order, in bounded chunks.
    chunks = list(open_trace(path).iter_chunks(chunk_tokens=4))
    assert all(c.num_tokens <= 4 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.experts for c in chunks]), tr.experts)


def test_sharded_writer_makes_several_files(tmp_path, rng):
    tr = random_trace(rng, 100, 3, 16, 2)
    out = tmp_path / "shards"
    write_trace(tr, out, shard_tokens=30)
    assert len(list(out.glob("part-*.parquet"))) == 4
    assert open_trace(out).num_tokens == 100


def test_writer_discards_everything_on_error(tmp_path, rng):
    tr = random_trace(rng, 10, 2, 8, 2)
    out = tmp_path / "x.parquet"
    with pytest.raises(RuntimeError), TraceWriter(out, tr.meta) as w:
        w.write(tr)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path, rng):
    tr = random_trace(rng, 2000, 3, 16, 2)
    good = write_trace(tr, tmp_path / "good.parquet")
    data = good.read_bytes()
    bad = tmp_path / "trunc.parquet"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.parquet: file: not a readable Parquet"):
        open_trace(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_text("hello")
    with pytest.raises(InputError) as ei:
        open_trace(junk)
    assert "\n" not in str(ei.value)
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(InputError, match="not a moeplace trace"):
        open_trace(other)


def test_trace_validation_errors():
    meta = TraceMeta(num_experts=4, top_k=2, moe_layer_ids=(0, 1))
    with pytest.raises(InputError, match="not an integer"):
        Trace(np.zeros((3, 2, 2), np.float32), meta)
    with pytest.raises(InputError, match="expert id 4 >= num_experts=4"):
        Trace(np.full((3, 2, 2), 4), meta)
    with pytest.raises(InputError, match="negative expert id"):
        Trace(np.full((3, 2, 2), -1), meta)
    with pytest.raises(InputError, match="no tokens"):
        Trace(np.zeros((0, 2, 2), np.int64), meta)
    with pytest.raises(InputError, match="top_k"):
        Trace(np.zeros((3, 2, 3), np.int64), meta)


def test_smallest_dtype():
    meta = TraceMeta(num_experts=300, top_k=1, moe_layer_ids=(0,))
    assert Trace(np.zeros((1, 1, 1), np.int64), meta).experts.dtype == np.uint16
    meta = TraceMeta(num_experts=256, top_k=1, moe_layer_ids=(0,))
    assert Trace(np.zeros((1, 1, 1), np.int64), meta).experts.dtype == np.uint8


def test_split_requests_keeps_requests_whole(rng):
    tr = random_trace(rng, 200, 2, 8, 2, requests=20)
    fit, hold = tr.split_requests(0.5, seed=3)
    assert fit.num_tokens + hold.num_tokens == 200
    assert not set(fit.request_ids()) & set(hold.request_ids())

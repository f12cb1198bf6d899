"""Parquet trace reader: header and columns checked before anything is trusted; sizes the
header declares are checked against the memory cap before allocating."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeplace.traces import compute_stats, open_trace, read_trace, write_trace
from moeplace.traces.store import META_KEY
from tests.bad_input import cli_fails, peak_rss_mb, raises_input
from tests.conftest import random_trace


@pytest.fixture
def good(tmp_path, rng):
    tr = random_trace(rng, 40, 3, 8, 2, weights=True, requests=4)
    return write_trace(tr, tmp_path / "good.parquet")


def _with_header(src, dst, edit):
    """Copy ``src`` with its JSON header replaced by ``edit(header)`` (a dict, or raw bytes)."""
    table = pq.read_table(src)
    header = json.loads(table.schema.metadata[META_KEY])
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    pq.write_table(table.replace_schema_metadata({META_KEY: raw}), dst)
    return dst


def _meta(**kw):
    def edit(h):
        h["meta"].update(kw)
        return h
    return edit


def _set(**kw):
    def edit(h):
        h.update(kw)
        return h
    return edit


def _drop_meta(key):
    def edit(h):
        del h["meta"][key]
        return h
    return edit


HEADER_CASES = [
    ("not JSON", lambda h: b"{nope", "not valid JSON", "schema metadata"),
    ("a list", lambda h: [h], "not an object", "schema metadata"),
    ("deep nesting", lambda h: b"[" * 50_000 + b"]" * 50_000, "nested too deeply",
     "schema metadata"),
    ("wrong format", _set(format="other"), "is not 'moeplace.trace'", "format"),
    ("version string", _set(version="x"), "is not an integer", "version"),
    ("version bool", _set(version=True), "is not an integer", "version"),
    ("version newer", _set(version=99), "newer", "version"),
    ("meta a list", _set(meta=[1, 2]), "not a JSON object", "meta"),
    ("meta missing", lambda h: {k: v for k, v in h.items() if k != "meta"},
     "not a JSON object", "meta"),
    ("num_experts string", _meta(num_experts="eight"), "is not an integer", "num_experts"),
    ("num_experts float", _meta(num_experts=8.0), "is not an integer", "num_experts"),
    ("num_experts null", _meta(num_experts=None), "is not an integer", "num_experts"),
    ("num_experts zero", _meta(num_experts=0), "below 1", "num_experts"),
    ("num_experts huge", _meta(num_experts=10**12), "is above", "num_experts"),
    ("num_experts missing", _drop_meta("num_experts"), "missing", "num_experts"),
    ("top_k zero", _meta(top_k=0), "below 1", "top_k"),
    ("top_k above N", _meta(top_k=9), "above 8", "top_k"),
    ("layer ids not list", _meta(moe_layer_ids="0,1,2"), "not a list", "moe_layer_ids"),
    ("layer ids repeated", _meta(moe_layer_ids=[0, 1, 1]), "appears twice", "moe_layer_ids"),
    ("layer id negative", _meta(moe_layer_ids=[0, -1, 2]), "below 0", "moe_layer_ids"),
    ("layer ids empty", _meta(moe_layer_ids=[]), "no layers", "moe_layer_ids"),
    ("hidden layers too few", _meta(num_hidden_layers=1), "below 2", "num_hidden_layers"),
    ("extra not object", _meta(extra=[1]), "not a JSON object", "extra"),
    ("dropped negative", _meta(extra={"dropped_tokens": -4}), "below 0", "dropped_tokens"),
    ("model not string", _meta(model=5), "not a string", "model"),
    ("dtype unknown", _set(experts_dtype="float32"), "uint8/16/32/64", "experts_dtype"),
    ("dtype too small", lambda h: _meta(num_experts=300, top_k=2)(h), "cannot hold",
     "experts_dtype"),
    ("has_weights not bool", _set(has_weights="yes"), "true/false", "has_weights"),
    ("has_weights disagrees", _set(has_weights=False), "disagree", "weights"),
    ("layers disagree with width", _meta(moe_layer_ids=[0, 1]), "does not match", "experts"),
]


@pytest.mark.parametrize("name,edit,needle,field", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header_is_one_typed_error(good, tmp_path, name, edit, needle, field):
    bad = _with_header(good, tmp_path / "bad.parquet", edit)
    raises_input(lambda: open_trace(bad), needle, field)
    cli_fails(["analyze", bad], needle)
    cli_fails(["stats", bad, "--out", tmp_path / "s.npz"], needle)
    assert not (tmp_path / "s.npz").exists()


def _table(good, drop=(), replace=None):
    t = pq.read_table(good)
    md = t.schema.metadata
    for name in drop:
        t = t.drop_columns([name])
    for name, arr in (replace or {}).items():
        t = t.set_column(t.schema.get_field_index(name), name, arr)
    return t.replace_schema_metadata(md)


def test_bad_columns(good, tmp_path):
    cases = {
        "no_experts": (_table(good, drop=["experts"]), "column missing"),
        "narrow": (_table(good, replace={"experts": pa.array(
            [b"\x00" * 5] * 40, pa.binary(5))}), "does not match"),
        "variable": (_table(good, replace={"experts": pa.array([b"\x00" * 6] * 40)}),
                     "does not match"),
        "float_req": (_table(good, replace={"request": pa.array(np.zeros(40))}),
                      "is not an integer"),
    }
    for name, (table, needle) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        raises_input(lambda n=name: read_trace(tmp_path / f"{n}.parquet"), needle)
        cli_fails(["analyze", tmp_path / f"{name}.parquet"], needle)


def test_nulls_and_out_of_range_ids(good, tmp_path):
    t = pq.read_table(good)
    req = pa.array([None, *range(39)], pa.int64())
    pq.write_table(t.set_column(t.schema.get_field_index("request"), "request", req),
                   tmp_path / "null.parquet")
    raises_input(lambda: read_trace(tmp_path / "null.parquet"), "null", "request")
    # An id >= num_experts in the data: refused per chunk, whichever chunk holds it.
    e = np.frombuffer(t.column("experts").combine_chunks().buffers()[1], np.uint8).copy()
    e[-1] = 200
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(6), 40, [None, pa.py_buffer(e)])
    pq.write_table(t.set_column(0, "experts", col), tmp_path / "id.parquet")
    raises_input(lambda: compute_stats(tmp_path / "id.parquet", chunk_tokens=7),
                 "expert id 200 >= num_experts=8")
    cli_fails(["analyze", tmp_path / "id.parquet"], "expert id 200")


def test_shards_must_share_schema(tmp_path, rng):
    a = random_trace(rng, 20, 3, 8, 2, requests=2)
    d = tmp_path / "sh"
    write_trace(a, d, shard_tokens=10)
    shards = sorted(d.glob("*.parquet"))
    # Same header, but the second shard lost its per-token columns.
    t = pq.read_table(shards[1])
    pq.write_table(t.drop_columns(["request", "position"]).replace_schema_metadata(
        t.schema.metadata), shards[1])
    raises_input(lambda: open_trace(d), "differ from the first shard")
    cli_fails(["analyze", d], "differ from the first shard")


def test_tiny_header_declaring_huge_model_refused_before_allocating(tmp_path, rng):
    """A 1-token trace whose header declares 500,000 experts: statistics would need
    L x N^2 x 8 bytes (terabytes). Refused with the estimate, in well under 2 GB."""
    tr = random_trace(rng, 1, 3, 8, 2)
    good = write_trace(tr, tmp_path / "g.parquet")
    bad = _with_header(good, tmp_path / "huge.parquet",
                       lambda h: {**_meta(num_experts=500_000)(h), "experts_dtype": "u4"})
    # The column width must match u4 for the header to pass the column check.
    t = pq.read_table(bad)
    e = np.zeros((1, 3 * 2), np.uint32)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(24), 1, [None, pa.py_buffer(e)])
    pq.write_table(t.set_column(0, "experts", col).replace_schema_metadata(t.schema.metadata),
                   bad)
    assert bad.stat().st_size < 10_000
    before = peak_rss_mb()
    raises_input(lambda: compute_stats(bad), "memory cap", "num_experts")
    line = cli_fails(["stats", bad, "--out", tmp_path / "s.npz"], "memory cap")
    assert "MOEPLACE_MAX_MEMORY" in line and "TiB" in line
    cli_fails(["solve", bad, "--gpus", "8"], "memory cap")
    assert peak_rss_mb() - before < 300


def test_declared_row_count_checked_before_read(tmp_path, rng, monkeypatch):
    tr = random_trace(rng, 5000, 4, 8, 2)
    path = write_trace(tr, tmp_path / "t.parquet")
    monkeypatch.setenv("MOEPLACE_MAX_MEMORY", "20K")
    raises_input(lambda: read_trace(path), "memory cap", "num_rows")
    monkeypatch.setenv("MOEPLACE_MAX_MEMORY", "1G")
    np.testing.assert_array_equal(read_trace(path).experts, tr.experts)

"""``select_phase`` keeps exactly the tokens whose phase column says the phase, streamed for
Parquet traces: checked against the same tokens picked by hand from the whole trace (counts,
experts, per-token fields, statistics, request ids), on shards with row groups that hold no
token of the phase, and its refusals are one ``InputError`` naming the file and ``phase``."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.errors import InputError
from moeplace.solvers.scoring import request_ids
from moeplace.traces import Trace, TraceMeta, compute_stats, open_trace, select_phase, write_trace
from moeplace.traces.phase import phase_code
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL, PHASE_UNKNOWN
from tests.bad_input import raises_input

T, L, N, K = 3000, 3, 16, 2


def _trace(phase: np.ndarray | None, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    e = np.argsort(rng.random((T, L, N)), axis=2)[:, :, :K]
    tokens = {"request": np.repeat(np.arange(T // 50), 50),
              "position": np.tile(np.arange(50), T // 50)}
    if phase is not None:
        tokens["phase"] = phase
    return Trace(e, TraceMeta(num_experts=N, top_k=K, moe_layer_ids=(1, 2, 3), model="m"),
                 weights=rng.random((T, L, K)).astype(np.float32), tokens=tokens)


def _mixed() -> np.ndarray:
    """Prefill for each request's first 20 positions, decode after, some unknown; the first
    1,000 tokens prefill only, so whole row groups hold no decode token."""
    pos = np.tile(np.arange(50), T // 50)
    ph = np.where(pos < 20, PHASE_PREFILL, PHASE_DECODE).astype(np.int8)
    ph[:1000] = PHASE_PREFILL
    ph[2000:2100] = PHASE_UNKNOWN
    return ph


@pytest.fixture
def sharded(tmp_path):
    tr = _trace(_mixed())
    path = tmp_path / "shards"
    write_trace(tr, path, shard_tokens=1100, row_group_tokens=250)
    return tr, path


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_reader_view_equals_tokens_picked_by_hand(sharded, phase):
    tr, path = sharded
    want = tr.tokens["phase"] == phase_code(phase)
    naive = tr.select(want)
    reader = open_trace(path)
    sel = select_phase(reader, phase)
    assert sel.column and sel.tokens == int(want.sum()) and sel.tokens_in_trace == T
    view = sel.source
    assert view.num_tokens == int(want.sum())
    assert sum(n for _fi, _g, n in view.row_groups()) == int(want.sum())
    chunks = list(view.iter_chunks(97))
    assert all(c.num_tokens <= 97 for c in chunks)
    got = Trace.concat(chunks)
    np.testing.assert_array_equal(got.experts, naive.experts)
    np.testing.assert_array_equal(got.weights, naive.weights)
    for f in ("request", "position", "phase"):
        np.testing.assert_array_equal(got.tokens[f], naive.tokens[f])
    # without per-token fields the chunks carry none, and the same routing
    bare = Trace.concat(list(view.iter_chunks(500, token_fields=False, weights=False)))
    assert bare.tokens == {} and bare.weights is None
    np.testing.assert_array_equal(bare.experts, naive.experts)
    a, b = compute_stats(view), compute_stats(naive)
    assert a.num_tokens == b.num_tokens == int(want.sum())
    np.testing.assert_array_equal(a.load, b.load)
    np.testing.assert_array_equal(a.transitions, b.transitions)
    np.testing.assert_array_equal(request_ids(view), np.unique(naive.tokens["request"]))
    np.testing.assert_array_equal(np.concatenate(list(view.iter_column("position"))),
                                  naive.tokens["position"])
    np.testing.assert_array_equal(view.read().experts, naive.experts)
    # the reader itself is untouched: still the whole trace
    assert reader.num_tokens == T and sum(len(v) for v in reader.iter_column("request")) == T


def test_row_groups_without_the_phase_are_not_read(sharded):
    _, path = sharded
    view = select_phase(open_trace(path), "decode").source
    read: list[tuple[int, list[int] | None]] = []
    for fi, pf in enumerate(view._pfs):
        orig = pf.iter_batches

        def spy(*a, _fi=fi, _orig=orig, **kw):
            read.append((_fi, kw.get("row_groups")))
            return _orig(*a, **kw)

        pf.iter_batches = spy
    assert sum(c.num_tokens for c in view.iter_chunks()) == view.num_tokens
    groups = {(fi, g) for fi, gs in read for g in gs}
    # tokens 0..999 are prefill: the first four 250-token groups of shard 0 hold no decode
    assert groups and not groups & {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert groups == {(fi, g) for fi, g, _n in view.row_groups()}


def test_in_memory_trace_selection():
    tr = _trace(_mixed())
    sel = select_phase(tr, "decode")
    want = tr.tokens["phase"] == PHASE_DECODE
    assert sel.tokens == int(want.sum()) and sel.tokens_in_trace == T
    np.testing.assert_array_equal(sel.source.experts, tr.experts[want])
    assert "by the trace's phase column" in sel.note("x.npz")
    assert sel.as_dict() == {"name": "decode", "tokens": int(want.sum()), "tokens_in_trace": T,
                             "phase_column": True}


@pytest.mark.parametrize("on_disk", [True, False])
def test_no_phase_column_uses_every_token(tmp_path, on_disk):
    tr = _trace(None)
    src = open_trace(write_trace(tr, tmp_path / "t.parquet")) if on_disk else tr
    sel = select_phase(src, "decode")
    assert sel.source is src and not sel.column and sel.tokens == sel.tokens_in_trace == T
    assert "no phase column" in sel.note("t") and "--phase decode" in sel.note("t")


@pytest.mark.parametrize("on_disk", [True, False])
def test_phase_column_without_the_phase_is_refused(tmp_path, on_disk):
    tr = _trace(np.full(T, PHASE_PREFILL, np.int8))
    src = open_trace(write_trace(tr, tmp_path / "t.parquet")) if on_disk else tr
    err = raises_input(lambda: select_phase(src, "decode"), "no decode token", "phase")
    assert "prefill 3,000" in str(err) and "--phase prefill" in err.fix
    assert (str(tmp_path / "t.parquet") if on_disk else "trace") in err.source
    unknown = _trace(np.full(T, PHASE_UNKNOWN, np.int8))
    err = raises_input(lambda: select_phase(unknown, "prefill"), "unknown 3,000", "phase")
    assert "--phase decode" not in err.fix  # there is no decode either


def test_unknown_phase_name_refused():
    with pytest.raises(InputError, match="--phase"):
        select_phase(_trace(None), "extend")


def test_foreign_phase_values_count_as_the_chunks_hold_them(tmp_path):
    """A foreign file's int64 phase column: the counts and the chunks read its values alike
    (as the int8 a Trace holds), so the view's size is the tokens it yields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_trace(_trace(_mixed()), tmp_path / "t.parquet")
    table = pq.read_table(path)
    raw = np.resize(np.array([0, 1, 256, 257, -1, 1 << 40], np.int64), T)
    table = table.set_column(table.column_names.index("phase"), "phase", pa.array(raw))
    pq.write_table(table, tmp_path / "f.parquet")
    for phase in ("prefill", "decode"):
        sel = select_phase(open_trace(tmp_path / "f.parquet"), phase)
        got = sum(c.num_tokens for c in sel.source.iter_chunks(333))
        assert got == sel.tokens == sel.source.num_tokens
        assert got == sum(len(v) for v in sel.source.iter_column("request"))

"""Statistics files (moeplace stats .npz and aggregate count files): keys, shapes, dtypes, signs
and totals checked at load, so a bad file is refused there and never reaches a solver."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from moeplace.traces import RoutingStats, compute_stats, load_routing
from moeplace.traces.stats import STATS_FORMAT
from tests.bad_input import cli_fails, raises_input
from tests.conftest import random_trace


@pytest.fixture
def arrays(rng):
    st = compute_stats(random_trace(rng, 60, 3, 8, 2))
    header = {"format": STATS_FORMAT, "version": 1, "meta": st.meta.to_dict()}
    return {"load": st.load, "transitions": st.transitions, "coactivation": st.coactivation,
            "num_tokens": np.int64(st.num_tokens), "header": np.array(json.dumps(header))}


def _edit_header(**kw):
    def edit(a):
        h = json.loads(str(a["header"]))
        h.update(kw)
        a["header"] = np.array(json.dumps(h))
    return edit


def _edit_meta(**kw):
    def edit(a):
        h = json.loads(str(a["header"]))
        h["meta"].update(kw)
        a["header"] = np.array(json.dumps(h))
    return edit


def _set(key, value):
    def edit(a):
        if value is None:
            del a[key]
        else:
            a[key] = value
    return edit


CASES = [
    ("header not JSON", _set("header", np.array("{x")), "not valid JSON", "header"),
    ("header a number", _set("header", np.array(3.5)), "is not a JSON string", "header"),
    ("header deep", _set("header", np.array("[" * 20000 + "]" * 20000)), "nested too deeply",
     "header"),
    ("header a list", _set("header", np.array("[1]")), "not a JSON object", "header"),
    ("wrong format", _edit_header(format="x"), "is not 'moeplace.stats'", "format"),
    ("version string", _edit_header(version="1"), "not an integer", "version"),
    ("version newer", _edit_header(version=7), "newer", "version"),
    ("num_experts NaN text", _edit_meta(num_experts="NaN"), "not an integer", "num_experts"),
    ("no load", _set("load", None), "missing", "load"),
    ("load wrong shape", _set("load", np.zeros((3, 9), np.int64)), "shape (3, 9)", "load"),
    ("load float", _set("load", np.zeros((3, 8))), "not an integer type", "load"),
    ("negative count", lambda a: a["load"].__setitem__((0, 0), -5), "negative count", "load"),
    ("transitions wrong shape", _set("transitions", np.zeros((2, 8, 7), np.int64)),
     "shape (2, 8, 7)", "transitions"),
    ("coactivation wrong shape", _set("coactivation", np.zeros((3, 8), np.int64)),
     "shape (3, 8)", "coactivation"),
    ("no num_tokens", _set("num_tokens", None), "missing", "num_tokens"),
    ("num_tokens array", _set("num_tokens", np.array([1, 2])), "not one integer", "num_tokens"),
    ("num_tokens negative", _set("num_tokens", np.int64(-1)), "below 0", "num_tokens"),
    ("num_tokens inconsistent", _set("num_tokens", np.int64(61)), "61 tokens x top-2", "load"),
    ("transitions inconsistent", lambda a: a["transitions"].__setitem__((1, 0, 0),
                                                                        a["transitions"][1, 0, 0] + 1),
     "layer pair 1", "transitions"),
    ("huge declared model", _edit_meta(num_experts=200_000), "shape (3, 8)", "load"),
    ("uint64 beyond int64", _set("load", np.full((3, 8), 2**63 + 5, np.uint64)),
     "implausibly large", "load"),
]


@pytest.mark.parametrize("name,edit,needle,field", CASES, ids=[c[0] for c in CASES])
def test_bad_stats_file(tmp_path, arrays, name, edit, needle, field):
    edit(arrays)
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    # Without a header the file is read as plain counts; everything else as moeplace stats.
    raises_input(lambda: load_routing(path), needle, field)
    cli_fails(["analyze", path], needle)
    cli_fails(["solve", path, "--gpus", "4"], needle)


def test_wrong_shape_transitions_refused_at_load_not_in_solver(tmp_path, arrays):
    arrays["transitions"] = np.zeros((2, 4, 4), np.int64)
    np.savez(tmp_path / "s.npz", **arrays)
    raises_input(lambda: RoutingStats.load_npz(tmp_path / "s.npz"), "shape (2, 4, 4)",
                 "transitions")
    del arrays["header"]
    np.savez(tmp_path / "h.npz", **arrays)
    raises_input(lambda: RoutingStats.load_npz(tmp_path / "h.npz"), "not a moeplace statistics",
                 "header")


def test_declared_shape_checked_against_memory_cap(tmp_path, arrays, monkeypatch):
    np.savez(tmp_path / "s.npz", **arrays)
    monkeypatch.setenv("MOEPLACE_MAX_MEMORY", "2K")
    raises_input(lambda: RoutingStats.load_npz(tmp_path / "s.npz"), "memory cap")
    monkeypatch.setenv("MOEPLACE_MAX_MEMORY", "1G")
    assert RoutingStats.load_npz(tmp_path / "s.npz").num_tokens == 60


def test_round_trip_still_exact(tmp_path, rng):
    st = compute_stats(random_trace(rng, 77, 4, 16, 3))
    back = RoutingStats.load_npz(st.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.transitions, st.transitions)
    np.testing.assert_array_equal(back.coactivation, st.coactivation)
    assert back.num_tokens == 77 and back.meta.to_dict() == st.meta.to_dict()


COUNT_CASES = [
    ("load 1-d", {"load": np.zeros(8, np.int64)}, "is not non-negative integer", "load"),
    ("counts float", {"counts": np.zeros((2, 8))}, "is not non-negative integer", "counts"),
    ("negative", {"load": -np.ones((2, 8), np.int64)}, "negative count", "load"),
    ("transitions shape", {"load": np.ones((3, 8), np.int64),
                           "transitions": np.ones((2, 8, 4), np.int64)},
     "expected integer (2, 8, 8)", "transitions"),
    ("layer ids count", {"load": np.ones((3, 8), np.int64), "moe_layer_ids": np.arange(4)},
     "4 ids for 3 layers", "moe_layer_ids"),
    ("layer ids float", {"load": np.ones((3, 8), np.int64), "layer_ids": np.zeros(3)},
     "is not a list of layer ids", "layer_ids"),
    ("object", {"load": np.array([[1, None]], dtype=object)}, "Python objects", "load"),
]


@pytest.mark.parametrize("name,members,needle,field", COUNT_CASES,
                         ids=[c[0] for c in COUNT_CASES])
def test_bad_count_files(tmp_path, name, members, needle, field):
    path = tmp_path / "c.npz"
    np.savez(path, **members) if name != "object" else _save_object(path, members)
    raises_input(lambda: load_routing(path), needle, field)
    cli_fails(["analyze", path], needle)


def _save_object(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for k, v in members.items():
            buf = io.BytesIO()
            np.save(buf, v, allow_pickle=True)
            z.writestr(f"{k}.npy", buf.getvalue())


def test_inexact_count_totals_survive_save_and_load(tmp_path):
    """Counts whose layers differ in total (records lost at some layers) are kept as given and
    flagged, so saving them as moeplace stats and reading back does not fail the totals check."""
    load = np.array([[3, 1], [2, 1]], np.int64)
    np.savez(tmp_path / "c.npz", load=load)
    st = load_routing(tmp_path / "c.npz")
    assert st.meta.extra.get("inexact_totals") is True
    back = RoutingStats.load_npz(st.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.load, load)

"""Placement JSON: every field type- and range-checked; one typed error / one CLI line."""

from __future__ import annotations

import json

import pytest

from moeplace.placement import Placement, contiguous
from moeplace.traces import write_trace
from tests.bad_input import cli_fails, raises_input
from tests.conftest import random_trace


def _good() -> dict:
    return contiguous(3, 8, 4, 2).to_dict()


def _with(**kw):
    d = _good()
    for k, v in kw.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return d


CASES = [
    ("a list", [1, 2], "not an object", "file"),
    ("num_gpus word", _with(num_gpus="eight"), "is not an integer", "num_gpus"),
    ("num_gpus null", _with(num_gpus=None), "is not an integer", "num_gpus"),
    ("num_gpus float", _with(num_gpus=4.0), "is not an integer", "num_gpus"),
    ("num_gpus bool", _with(num_gpus=True), "is not an integer", "num_gpus"),
    ("num_gpus negative", _with(num_gpus=-4), "below 1", "num_gpus"),
    ("num_gpus huge", _with(num_gpus=10**30), "is above", "num_gpus"),
    ("num_gpus missing", _with(num_gpus=...), "missing", "num_gpus"),
    ("num_nodes zero", _with(num_nodes=0), "below 1", "num_nodes"),
    ("nodes do not divide", _with(num_nodes=3), "do not split evenly", "num_nodes"),
    ("nodes above gpus", _with(num_nodes=8), "above 4", "num_nodes"),
    ("version text", _with(version="x"), "is not an integer", "version"),
    ("version newer", _with(version=9), "newer", "version"),
    ("format other", _with(format="eplb"), "is not 'moeplace.placement'", "format"),
    ("phy2log string", _with(phy2log="0,1,2"), "not a non-empty list of lists", "phy2log"),
    ("phy2log flat", _with(phy2log=list(range(8))), "not a non-empty list of lists", "phy2log"),
    ("phy2log empty", _with(phy2log=[]), "not a non-empty list of lists", "phy2log"),
    ("phy2log ragged", _with(phy2log=[list(range(8)), list(range(7))]), "different lengths",
     "phy2log"),
    ("phy2log floats", _with(phy2log=[[0.0, 1, 2, 3, 4, 5, 6, 7]] * 3), "not an expert id",
     "phy2log"),
    ("phy2log bools", _with(phy2log=[[True, 1, 2, 3, 4, 5, 6, 7]] * 3), "not an expert id",
     "phy2log"),
    ("phy2log strings", _with(phy2log=[["0", 1, 2, 3, 4, 5, 6, 7]] * 3), "not an expert id",
     "phy2log"),
    ("phy2log nested deeper", _with(phy2log=[[[0], 1, 2, 3, 4, 5, 6, 7]] * 3),
     "not an expert id", "phy2log"),
    ("id 2^70", _with(phy2log=[[2**70, 1, 2, 3, 4, 5, 6, 7]] * 3), "64-bit", "phy2log"),
    ("id out of range", _with(phy2log=[[9, 1, 2, 3, 4, 5, 6, 7]] * 3), "expert id 9 outside",
     "phy2log"),
    ("id negative", _with(phy2log=[[-1, 1, 2, 3, 4, 5, 6, 7]] * 3), "outside 0..7", "phy2log"),
    ("expert missing", _with(phy2log=[[1, 1, 2, 3, 4, 5, 6, 7]] * 3), "no copy of expert 0",
     "phy2log"),
    ("two copies on one GPU", _with(phy2log=[[0, 0, 1, 2, 3, 4, 5, 6, 7, 1]] * 3,
                                    num_gpus=5, num_nodes=1, slots_per_gpu=2, num_replicas=2),
     "holds two copies", "phy2log"),
    ("expert missing across GPUs", _with(phy2log=[[1, 2, 1, 3, 4, 5, 6, 7]] * 3),
     "no copy of expert 0", "phy2log"),
    ("overfilled GPU", _with(slots_per_gpu=3), "over- or under-filled", "slots_per_gpu"),
    ("num_layers wrong", _with(num_layers=2), "says 2", "num_layers"),
    ("num_experts text", _with(num_experts="8"), "is not an integer", "num_experts"),
    ("num_experts above slots", _with(num_experts=9), "above 8", "num_experts"),
    ("layer ids repeated", _with(moe_layer_ids=[1, 1, 2]), "appears twice", "moe_layer_ids"),
    ("layer ids wrong count", _with(moe_layer_ids=[1, 2]), "2 ids for 3 layers",
     "moe_layer_ids"),
    ("info not object", _with(info=[1]), "not an object", "info"),
]


@pytest.mark.parametrize("name,obj,needle,field", CASES, ids=[c[0] for c in CASES])
def test_bad_placement_json(tmp_path, rng, name, obj, needle, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(obj))
    raises_input(lambda: Placement.load(path), needle, field)
    t = write_trace(random_trace(rng, 50, 3, 8, 2), tmp_path / "t.parquet")
    cli_fails(["evaluate", t, path], needle)
    cli_fails(["export", path, "--format", "eplb", "--out", tmp_path / "o.json"], needle)
    assert not (tmp_path / "o.json").exists()


RAW_CASES = [
    ("NaN", '{"num_gpus": NaN, "phy2log": [[0]]}', "is not an integer"),
    ("1e400", '{"num_gpus": 1e400, "phy2log": [[0]]}', "is not an integer"),
    ("deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("huge literal", '{"num_gpus": ' + "9" * 5000 + "}", "not valid JSON"),
    ("not JSON", "{num_gpus: 4}", "not valid JSON"),
    ("empty", "", "not valid JSON"),
]


@pytest.mark.parametrize("name,text,needle", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_bad_placement_text(tmp_path, name, text, needle):
    path = tmp_path / "p.json"
    path.write_text(text)
    raises_input(lambda: Placement.load(path), needle)
    cli_fails(["export", path, "--format", "eplb", "--out", tmp_path / "o.json"], needle)


def test_non_utf8_and_directory(tmp_path):
    (tmp_path / "p.json").write_bytes(b'{"num_gpus": "\xff"}')
    raises_input(lambda: Placement.load(tmp_path / "p.json"), "not UTF-8")
    raises_input(lambda: Placement.load(tmp_path), "is a directory")


def test_good_placement_round_trips(tmp_path):
    p = contiguous(3, 8, 4, 2, moe_layer_ids=(1, 2, 3))
    assert Placement.load(p.save(tmp_path / "p.json")) == p

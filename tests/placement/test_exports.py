"""Every export format round-trips to the same placement; the SGLang file has its exact shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.cli import main
from moeplace.errors import InputError
from moeplace.placement import (
    Placement,
    contiguous,
    export_placement,
    random_placement,
    read_placement,
)

ROUND_TRIP = ("sglang", "vllm-ascend", "vllm-pr49572", "vllm-pr41141", "eplb", "trtllm")


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 4), G=st.sampled_from([2, 4]), S=st.integers(1, 4), R=st.integers(0, 3),
       seed=st.integers(0, 10**6), dense=st.integers(0, 3))
def test_round_trip_every_format(tmp_path_factory, L, G, S, R, seed, dense):
    P = G * S
    R = min(R, P - 1)
    N = P - R
    if R and S > N:
        return
    ids = [dense + 2 * l for l in range(L)]  # MoE layers interleaved with dense ones
    plc = random_placement(L, N, G, 1, R, seed=seed, moe_layer_ids=ids)
    d = tmp_path_factory.mktemp("x")
    for fmt in ROUND_TRIP:
        path = d / {"eplb": "m.npz", "vllm-pr41141": "m.jsonl", "trtllm": "m.yaml"}.get(fmt, "m.json")
        export_placement(plc, fmt, path, num_hidden_layers=max(ids) + 2)
        back = read_placement(path, num_gpus=G, num_experts=N,
                              moe_layer_ids=ids if fmt == "sglang" else None)
        np.testing.assert_array_equal(back.phy2log, plc.phy2log, err_msg=fmt)
        assert back.num_gpus == G


def test_sglang_file_shape_and_single_key(tmp_path):
    plc = contiguous(3, 8, 4, replicas=4, moe_layer_ids=(1, 2, 3))
    flags = export_placement(plc, "sglang", tmp_path / "s.json", num_hidden_layers=5)
    d = json.loads((tmp_path / "s.json").read_text())
    assert list(d) == ["physical_to_logical_map"]
    m = np.array(d["physical_to_logical_map"])
    assert m.shape == (5, 12)
    assert (m[0] == np.arange(12) % 8).all() and (m[4] == np.arange(12) % 8).all()
    assert "--init-expert-location" in flags and "--ep-num-redundant-experts 4" in flags
    eplb = np.load(export_and_path(plc, tmp_path))
    assert set(eplb.files) == {"phy2log", "log2phy", "logcnt"}
    assert eplb["log2phy"].shape == (3, 8, 2) and eplb["phy2log"].dtype == np.int64


def export_and_path(plc: Placement, tmp_path):
    export_placement(plc, "eplb", tmp_path / "e.npz")
    return tmp_path / "e.npz"


def test_logical_count_and_errors(tmp_path):
    plc = contiguous(2, 4, 2, moe_layer_ids=(1, 3))
    load = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    export_placement(plc, "sglang-logical-count", tmp_path / "c.json", load=load)
    c = np.array(json.loads((tmp_path / "c.json").read_text())["logical_count"])
    assert c.shape == (4, 4) and (c[1] == load[0]).all() and (c[3] == load[1]).all()
    assert not c[0].any()
    with pytest.raises(InputError, match="moe_layer_ids"):
        export_placement(contiguous(2, 4, 2), "sglang", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(InputError, match="--gpus"):
        export_placement(plc, "eplb", tmp_path / "e.npz")
        read_placement(tmp_path / "e.npz")


def test_export_cli(tmp_path):
    contiguous(2, 8, 4, moe_layer_ids=(0, 1)).save(tmp_path / "p.json")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "p.json"), "--format", "sglang",
                                  "--out", str(tmp_path / "s.json"), "--num-hidden-layers", "3"])
    assert r.exit_code == 0 and "--init-expert-location" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path / "p.json"), "--format", "sglang",
                                  "--out", str(tmp_path / "t.json"), "--num-hidden-layers", "1"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "t.json").exists()

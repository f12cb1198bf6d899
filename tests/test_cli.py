"""The CLI end to end, in-process through click's runner and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.placement import contiguous
from moeplace.traces import write_trace
from tests.conftest import random_trace


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_analyze_demo_table_and_json(tmp_path):
    r = run("analyze", "--demo")
    assert r.exit_code == 0 and "FLAME-MoE-290M" in r.output and "mi_next_bits" in r.output
    r = run("analyze", "--demo", "--json")
    d = json.loads(r.output)
    for k in ("tokens", "num_layers", "num_experts", "top_k", "load"):
        assert k in d
    assert d["tokens"] == 2048 and d["num_layers"] == 8 and d["top_k"] == 6
    assert np.array(d["load"]).shape == (8, 64)


def test_analyze_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = run("analyze", "--demo", "--plot", str(tmp_path / "h.png"))
    assert r.exit_code == 0 and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_json_keys(tmp_path, rng):
    tr = random_trace(rng, 300, 3, 8, 2, requests=10)
    write_trace(tr, tmp_path / "t.parquet")
    contiguous(3, 8, 4, 2).save(tmp_path / "p.json")
    r = run("evaluate", str(tmp_path / "t.parquet"), str(tmp_path / "p.json"), "--json",
            "--home", "follow", "--window", "64", "--current", str(tmp_path / "p.json"))
    d = json.loads(r.output)
    for k in ("load_imbalance_mean", "load_imbalance_max", "cross_gpu_pair_fraction",
              "cross_node_pair_fraction", "traffic_static", "traffic_follow", "experts_moved"):
        assert k in d
    assert d["experts_moved"] == 0


def test_convert_stats_synth(tmp_path, rng):
    tr = random_trace(rng, 50, 3, 8, 2)
    np.savez(tmp_path / "t.npz", experts=tr.experts)
    r = run("convert", str(tmp_path / "t.npz"), str(tmp_path / "t.parquet"))
    assert r.exit_code == 0, r.output
    r = run("stats", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "s.npz"))
    assert r.exit_code == 0
    r = run("synth", "--preset", "mixtral", "--tokens", "500", "--out", str(tmp_path / "y.parquet"))
    assert r.exit_code == 0 and (tmp_path / "y.parquet").exists()


def _bad_inputs(tmp_path, rng):
    tr = random_trace(rng, 2000, 3, 8, 2)
    good = write_trace(tr, tmp_path / "good.parquet")
    (tmp_path / "trunc.parquet").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "text.parquet").write_text("not parquet")
    np.savez(tmp_path / "float.npz", experts=np.zeros((4, 3, 2), np.float64))
    np.savez(tmp_path / "big.npz", experts=np.full((4, 3, 2), 8, np.int64))
    np.savez(tmp_path / "neg.npz", experts=np.full((4, 3, 2), -3, np.int64))
    np.savez(tmp_path / "empty.npz", experts=np.zeros((0, 3, 2), np.int64))
    (tmp_path / "mk.jsonl").write_text(
        json.dumps({"layer": 1, "top_indices": [[1, 2]]}) + "\n"
        + json.dumps({"layer": 2, "top_indices": [[1, 2, 3]]}) + "\n")
    p = contiguous(3, 8, 4).to_dict()
    p["phy2log"][0][0] = 1  # expert 0 missing at layer 0
    (tmp_path / "miss.json").write_text(json.dumps(p))
    p = contiguous(3, 8, 4).to_dict()
    p["slots_per_gpu"] = 3
    (tmp_path / "over.json").write_text(json.dumps(p))
    contiguous(3, 8, 4).save(tmp_path / "ok.json")
    t = str(tmp_path / "good.parquet")
    return [
        (["convert", str(tmp_path / "trunc.parquet"), "OUT"], "trunc.parquet"),
        (["convert", str(tmp_path / "text.parquet"), "OUT"], "text.parquet"),
        (["convert", str(tmp_path / "float.npz"), "OUT"], "dtype float64"),
        (["convert", str(tmp_path / "big.npz"), "OUT", "--num-experts", "8"], "expert id 8"),
        (["convert", str(tmp_path / "neg.npz"), "OUT"], "negative expert id"),
        (["convert", str(tmp_path / "empty.npz"), "OUT"], "no tokens"),
        (["convert", str(tmp_path / "mk.jsonl"), "OUT", "--format", "megatron"], "top-k"),
        (["evaluate", t, str(tmp_path / "miss.json")], "no copy of expert 0"),
        (["evaluate", t, str(tmp_path / "over.json")], "over- or under-filled"),
        (["stats", str(tmp_path / "trunc.parquet"), "--out", "OUT"], "trunc.parquet"),
    ]


def test_bad_input_one_line_exit_2_no_output(tmp_path, rng):
    for args, needle in _bad_inputs(tmp_path, rng):
        out = tmp_path / "out.parquet"
        args = [str(out) if a == "OUT" else a for a in args]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, r.output)
        assert "Traceback" not in r.output
        assert not out.exists()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
        assert not leftovers


def test_real_subprocess_exit_code(tmp_path):
    (tmp_path / "x.parquet").write_text("nope")
    r = subprocess.run([sys.executable, "-m", "moeplace.cli", "analyze", str(tmp_path / "x.parquet")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "x.parquet" in r.stderr


def test_solve_cli_json_and_out(tmp_path, rng):
    tr = random_trace(rng, 400, 3, 8, 2, requests=20)
    write_trace(tr, tmp_path / "t.parquet")
    out = tmp_path / "p.json"
    r = run("solve", str(tmp_path / "t.parquet"), "--gpus", "4", "--holdout", "0.3", "--json",
            "--out", str(out), "--engine", "exflow")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["report"]["method"] == "dp" and d["report"]["status"] == "optimal"
    names = [row["placement"] for row in d["fit"]]
    assert names == ["dp", "contiguous", "round_robin", "eplb", "eplb-distinct"]
    assert len(d["holdout"]) == 5 and d["vs_strongest_baseline"]
    from moeplace.placement import Placement

    assert Placement.load(out).num_gpus == 4
    r = run("solve", str(tmp_path / "t.parquet"), "--gpus", "4", "--nodes", "2", "--replicas",
            "4", "--pareto")
    assert r.exit_code == 0 and "frontier" in r.output and "lower bound" in r.output
    r = run("evaluate", str(tmp_path / "t.parquet"), str(out), "--json")
    assert r.exit_code == 0


def test_solve_bad_requests_exit_2(tmp_path, rng):
    tr = random_trace(rng, 100, 3, 8, 2)
    write_trace(tr, tmp_path / "t.parquet")
    contiguous(2, 8, 4).save(tmp_path / "other.json")
    t = str(tmp_path / "t.parquet")
    out = tmp_path / "p.json"
    for args, needle in [
        (["--gpus", "16"], "only 8 expert slots"),
        (["--gpus", "4", "--replicas", "3"], "do not split evenly"),
        (["--gpus", "4", "--time-limit", "0"], "time-limit"),
        (["--gpus", "4", "--current", str(tmp_path / "other.json")], "current placement is 2"),
        (["--gpus", "4", "--weights", "speed=1"], "unknown term"),
    ]:
        r = CliRunner().invoke(main, ["solve", t, *args, "--out", str(out)])
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, r.output)
        assert not out.exists()

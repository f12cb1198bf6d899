"""The output a person reads: the headline sentence is checked against the numbers it quotes
(recomputed from the JSON rows), the column-hiding rules against settings where the hidden
metrics can and cannot differ, and the plot is a real image."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.placement import contiguous, round_robin
from moeplace.solvers.report import (
    WHERE,
    headline,
    hidden_columns,
    plot_against,
    visible_columns,
)
from tests.conftest import random_trace

BASELINES = ("contiguous", "round_robin", "random", "eplb", "eplb-distinct")


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- checking a sentence against a table ------------------------------------------------------
def _best(rows: list[dict], ours: str, metric: str) -> tuple[float, str, float]:
    """(our value, best baseline, its value), recounted naively: the first lowest baseline."""
    me = next(r for r in rows if r["placement"] == ours)
    base = [r for r in rows if r["placement"] in BASELINES and r["placement"] != ours
            and r.get(metric) is not None]
    b = base[0]
    for r in base[1:]:
        if r[metric] < b[metric]:
            b = r
    return me[metric], b["placement"], b[metric]


def _shown(pct: str) -> float:
    """The precision a printed percentage carries (0.5 of its last digit)."""
    return 0.5 * (0.1 if "." in pct else 1.0)


def check_sentence(text: str, rows: list[dict], ours: str, nodes: int) -> None:
    """Every number and baseline name in ``text`` matches ``rows`` (lower is better)."""
    v, name, bv = _best(rows, ours, "traffic_static")
    m = re.search(r"sends tokens to (?:([\d.]+)% (fewer|more)|as many) remote GPUs "
                  r"(?:than|as) the best baseline \(([\w-]+)\)", text)
    assert m, text
    assert m.group(3) == name
    change = 100 * (v - bv) / bv
    if m.group(1) is None:
        assert abs(change) < 0.05
    else:
        assert abs(float(m.group(1)) - abs(change)) <= _shown(m.group(1)) + 1e-9
        assert (m.group(2) == "fewer") == (change < 0)
    if nodes > 1:
        v2, name2, bv2 = _best(rows, ours, "traffic_static_remote_nodes")
        m2 = re.search(r"and (?:([\d.]+)% (fewer|more)|as many) remote nodes"
                       r"(?: \(against ([\w-]+)\))?", text)
        assert m2, text
        assert (m2.group(3) or name) == name2
        ch2 = 100 * (v2 - bv2) / bv2
        if m2.group(1) is not None:
            assert abs(float(m2.group(1)) - abs(ch2)) <= _shown(m2.group(1)) + 1e-9
            assert (m2.group(2) == "fewer") == (ch2 < 0)
        name = name2 if m2.group(3) else name
    else:
        assert "remote nodes" not in text
    v3, name3, bv3 = _best(rows, ours, "load_imbalance_mean")
    m3 = re.search(r"(same balance|better balanced|less balanced) \(max/mean ([\d.]+) vs "
                   r"([\d.]+)(?: for ([\w-]+))?\)", text)
    assert m3, text
    assert (m3.group(2), m3.group(3)) == (f"{v3:.2f}", f"{bv3:.2f}")
    assert (m3.group(4) or name) == name3
    word = ("same balance" if f"{v3:.2f}" == f"{bv3:.2f}" else
            "better balanced" if v3 < bv3 else "less balanced")
    assert m3.group(1) == word
    if all(r.get("step_ms") is not None for r in rows):
        v4, name4, bv4 = _best(rows, ours, "step_ms")
        m4 = re.search(r"simulated step (?:([\d.]+)% (faster|slower)|as fast)"
                       r"(?: (?:than|as) ([\w-]+))?\.$", text)
        assert m4, text
        assert (m4.group(3) or name3) == name4
        ch4 = 100 * (v4 - bv4) / bv4
        if m4.group(1) is not None:
            assert abs(float(m4.group(1)) - abs(ch4)) <= _shown(m4.group(1)) + 1e-9
            assert (m4.group(2) == "faster") == (ch4 < 0)


# ---- the sentence on made-up tables, where every case is known ---------------------------------
def _table(**ours: float) -> pd.DataFrame:
    base = {"load_imbalance_mean": 1.08, "traffic_static": 2.5,
            "traffic_static_remote_nodes": 0.8, "step_ms": 10.0}
    rows = [{"placement": "search", **base, **ours},
            {"placement": "contiguous", "load_imbalance_mean": 1.4, "traffic_static": 2.4,
             "traffic_static_remote_nodes": 0.9, "step_ms": 12.0},
            {"placement": "eplb-distinct", **base}]
    return pd.DataFrame(rows)


def test_headline_states_gains_against_the_best_baseline_per_quantity():
    df = _table(traffic_static=1.9, load_imbalance_mean=1.081, step_ms=9.69)
    text = headline(df, "search", num_nodes=1)
    assert text.startswith("On held-out requests this placement sends tokens to 21% fewer "
                           "remote GPUs than the best baseline (contiguous)"), text
    # balance and step are against eplb-distinct, which is named because it differs
    assert "at the same balance (max/mean 1.08 vs 1.08 for eplb-distinct)" in text
    assert text.endswith("simulated step 3.1% faster.")
    check_sentence(text, df.to_dict("records"), "search", 1)


def test_headline_says_when_it_is_worse_or_equal():
    df = _table(traffic_static=2.5, load_imbalance_mean=1.2, step_ms=10.5)
    text = headline(df, "search", where="fit", num_nodes=2)
    assert text.startswith(WHERE["fit"] + " this placement sends tokens to 4.2% more remote "
                           "GPUs than the best baseline (contiguous) and as many remote nodes "
                           "(against eplb-distinct), less balanced (max/mean 1.20 vs 1.08)"), text
    assert text.endswith("simulated step 5.0% slower.")
    assert text.startswith("On the fitted traffic")
    check_sentence(text, df.to_dict("records"), "search", 2)
    same = _table()
    t2 = headline(same, "search", num_nodes=1)
    assert "as many remote GPUs as the best baseline (contiguous)" not in t2  # contiguous is lower
    assert "simulated step as fast" in t2
    check_sentence(t2, same.to_dict("records"), "search", 1)


def test_headline_without_baselines_or_step():
    df = pd.DataFrame([{"placement": "search", "load_imbalance_mean": 1.0}])
    assert "no baseline was scored" in headline(df, "search")
    df = _table(traffic_static=2.0).drop(columns=["step_ms"])
    text = headline(df, "search", no_step="no simulated step (give --model-shape)")
    assert text.endswith("no simulated step (give --model-shape).")
    skipped = headline(_table(traffic_static=2.0), "search", skipped=["eplb"])
    assert skipped.endswith("(against the baselines scored; eplb was not, at the time limit).")
    stats_only = pd.DataFrame([{"placement": "search", "load_imbalance_mean": 1.05},
                               {"placement": "eplb", "load_imbalance_mean": 1.10}])
    t = headline(stats_only, "search", where="stats")
    assert t == (f"{WHERE['stats']} this placement is better balanced (max/mean 1.05 vs 1.10, "
                 "the best baseline: eplb).")


# ---- which columns can differ -----------------------------------------------------------------
def test_hiding_rules():
    cols = ["placement", "load_imbalance_mean", "cross_gpu_pair_fraction",
            "cross_node_pair_fraction", "traffic_static", "traffic_static_remote_nodes",
            "traffic_static_inter_node", "traffic_static_intra_node", "active_experts_max",
            "experts_moved", "bytes_transferred"]
    one = hidden_columns(cols, num_gpus=8, num_nodes=1, num_layers=4).columns
    assert {"cross_node_pair_fraction", "traffic_static_remote_nodes",
            "traffic_static_inter_node", "traffic_static_intra_node", "experts_moved",
            "bytes_transferred"} == set(one)
    two = hidden_columns(cols, num_gpus=8, num_nodes=2, num_layers=4, current=True,
                         expert_bytes=10).columns
    assert two == ()
    assert hidden_columns(cols, num_gpus=8, num_nodes=2, num_layers=4, current=True
                          ).columns == ("bytes_transferred",)
    w = ["window_imbalance_mean", "window_imbalance_max", "load_imbalance_mean"]
    assert hidden_columns(w, num_gpus=8, num_nodes=2, num_layers=4, current=True,
                          expert_bytes=1, one_window=True).columns == tuple(w[:2])
    assert hidden_columns(w, num_gpus=8, num_nodes=2, num_layers=4).columns == ()
    assert "cross_gpu_pair_fraction" in hidden_columns(cols, num_gpus=8, num_nodes=2,
                                                       num_layers=1).columns
    assert "traffic_static" in hidden_columns(cols, num_gpus=1, num_nodes=1,
                                              num_layers=4).columns
    # active experts: hidden only when no placement differs
    rows = pd.DataFrame({"placement": ["a", "b"], "active_experts_max": [16.0, 16.0]})
    assert "active_experts_max" in hidden_columns(rows.columns, num_gpus=4, num_nodes=1,
                                                  num_layers=2, rows=rows).columns
    rows["active_experts_max"] = [16.0, 15.5]
    df, h = visible_columns(rows, num_gpus=4, num_nodes=1, num_layers=2)
    assert "active_experts_max" in df and not h.columns and h.note() == ""
    df, h = visible_columns(rows, num_gpus=4, num_nodes=1, num_layers=2, all_metrics=True)
    assert list(df.columns) == list(rows.columns)


def test_active_experts_hidden_exactly_when_every_expert_is_active(rng):
    """Large steps activate every expert: the evaluator's figures agree for all placements and
    the column goes; one-token steps do not, and it stays."""
    from moeplace.solvers import evaluate_many

    tr = random_trace(rng, 2000, 2, 8, 2)
    plcs = [contiguous(2, 8, 4), round_robin(2, 8, 4)]
    for step, hidden in ((2000, True), (1, False)):
        res = evaluate_many(tr, plcs, tokens_per_step=step)
        rows = pd.DataFrame([{"placement": str(i), **{k: r.summary[k] for k in
                                                      ("active_experts_max",
                                                       "active_experts_imbalance")}}
                             for i, r in enumerate(res)])
        h = hidden_columns(rows.columns, num_gpus=4, num_nodes=1, num_layers=2, rows=rows)
        assert ("active_experts_max" in h.columns) is hidden, (step, rows)


# ---- the commands ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "t.parquet"
    # each request's first 16 tokens prefill, the rest decode: --phase decode has tokens to fit
    r = run("synth", "--preset", "flame-moe-290m", "--tokens", "3000", "--prompt-tokens", "16",
            "--out", str(path))
    assert r.exit_code == 0, r.output
    return str(path)


def _header(out: str) -> list[str]:
    """Column names of every printed table whose first column is ``placement``."""
    return [w for line in out.splitlines() if line.split()[:1] == ["placement"]
            for w in line.split()]


@pytest.mark.parametrize("nodes", [1, 2])
def test_solve_headline_matches_its_json(synth_trace, nodes):
    args = ["solve", synth_trace, "--gpus", "4", "--nodes", str(nodes), "--holdout", "0.3",
            "--time-limit", "60", "--model-shape", "flame-moe-290m",
            "--tokens-per-step", "512"]
    d = json.loads(run(*args, "--json").output)
    text = d["headline"]
    assert text.startswith("On held-out requests this placement ")
    check_sentence(text, d["holdout"], d["report"]["method"], nodes)
    # JSON hides nothing: node metrics are there on one node too
    assert all("traffic_static_remote_nodes" in r and "active_experts_max" in r
               for r in d["holdout"] + d["fit"])
    out = run(*args).output
    assert out.splitlines()[0] == text
    cols = _header(out)
    assert ("traffic_static_remote_nodes" in cols) is (nodes > 1)
    assert ("cross_node_pair_fraction" in cols) is (nodes > 1)
    if nodes == 1:
        assert "traffic_static_remote_nodes (one node)" in out and "--all-metrics" in out
        every = _header(run(*args, "--all-metrics").output)
        assert "traffic_static_remote_nodes" in every and "active_experts_max" in every


def test_solve_without_holdout_says_fitted(synth_trace):
    d = json.loads(run("solve", synth_trace, "--gpus", "4", "--time-limit", "60",
                       "--json").output)
    assert d["headline"].startswith("On the fitted traffic")
    check_sentence(d["headline"], d["fit"], d["report"]["method"], 1)


def test_evaluate_headline_matches_its_json(synth_trace, tmp_path):
    plc = str(tmp_path / "p.json")
    round_robin(8, 64, 4, 2).save(plc)
    d = json.loads(run("evaluate", synth_trace, plc, "--json").output)
    assert d["headline"].startswith("On this trace, to which the baselines are fitted, ")
    check_sentence(d["headline"], d["comparison"], "placement", 2)
    # the placement's own row is its summary
    me = next(r for r in d["comparison"] if r["placement"] == "placement")
    assert me["traffic_static"] == d["traffic_static"]
    out = run("evaluate", synth_trace, plc).output
    assert out.splitlines()[0] == d["headline"]
    one = str(tmp_path / "one.json")
    round_robin(8, 64, 4, 1).save(one)
    out = run("evaluate", synth_trace, one, "--window", "2048").output
    assert "traffic_static_remote_nodes" not in out.split("(not shown")[0]
    assert "window_imbalance_mean" in out  # 3,000 tokens, two windows of 2,048: it can differ
    one_window = run("evaluate", synth_trace, one).output  # one window of 4,096
    assert "window_imbalance_mean" not in one_window.split("(not shown")[0]
    assert "traffic_static_remote_nodes" in run("evaluate", synth_trace, one,
                                                "--all-metrics").output


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(rng, tmp_path):
    pytest.importorskip("matplotlib")
    tr = random_trace(rng, 500, 3, 8, 2, requests=10)
    plcs = {"mine": round_robin(3, 8, 4, 2), "eplb": contiguous(3, 8, 4, 2)}
    path = str(tmp_path / "sub" / "p.png")
    plot_against(tr, plcs, path, ours="mine")
    w, h = _png_size(path)
    assert w > 400 and h > 300


def test_solve_plot_paths(synth_trace, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    r = run("solve", synth_trace, "--gpus", "4", "--holdout", "0.3", "--time-limit", "60",
            "--plot", str(png))
    assert r.exit_code == 0 and f"wrote {png}" in r.output
    _png_size(png)
    (tmp_path / "d.png").mkdir()
    (tmp_path / "d.png" / "x").write_text("keep")
    for bad, why in ((str(tmp_path / "d.png"), "directory"), (synth_trace, "input"),
                     (str(tmp_path / "s.txt"), "suffix")):
        r = CliRunner().invoke(main, ["solve", synth_trace, "--gpus", "4", "--plot", bad])
        assert r.exit_code == 2, (why, r.output)
    assert (tmp_path / "d.png" / "x").read_text() == "keep"


def test_plot_without_matplotlib_says_how_to_install(synth_trace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    r = CliRunner().invoke(main, ["solve", synth_trace, "--gpus", "4", "--plot",
                                  str(tmp_path / "p.png")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'moeplace[plot]'" in lines[0], r.output
    assert not (tmp_path / "p.png").exists()


def test_core_does_not_import_matplotlib():
    code = ("import sys, moeplace, moeplace.cli, moeplace.solvers.report; "
            "assert 'matplotlib' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_opens_with_the_sentence():
    r = run("demo")
    first = r.output.splitlines()[0]
    assert first.startswith("On the held-out request moeplace's placement "), first
    assert "--all-metrics" in r.output
    assert np.isfinite(float(re.search(r"max/mean ([\d.]+)", first).group(1)))


# ---- the kernel's bounds in solve's report (issue 18) -------------------------------------------
KEYS = ("nvlink_copies_per_token", "rdma_copies_per_token", "copies_per_token")


@pytest.mark.parametrize("args,kernel", [  # the search once, EPLB (quick) for the rest
    (["--nodes", "2"], "deepep-normal"),
    (["--nodes", "2", "--phase", "decode", "--method", "eplb"], "deepep-ll"),
    (["--nodes", "2", "--replicas", "4", "--phase", "decode", "--method", "eplb"], "deepep-ll"),
    (["--nodes", "1", "--dispatch", "alltoall", "--replicas", "4", "--method", "eplb"],
     "alltoall"),
])
def test_solve_bounds_the_kernels_copies(synth_trace, tmp_path, args, kernel):
    """solve's bound names the kernel and bounds its copies and priced time; the gap is against
    the objective it optimised (balance only under deepep-ll, whose copies every placement
    pays alike); the printed lines quote the JSON's numbers; the time bound is below what
    evaluate --dispatch prices for the placement on the trace."""
    plc = str(tmp_path / "p.json")
    common = ["solve", synth_trace, "--gpus", "4", "--time-limit", "3", "--model-shape",
              "flame-moe-290m", "--tokens-per-step", "512", *args]
    d = json.loads(run(*common, "--json", "--out", plc).stdout)
    rep, b = d["report"], d["report"]["bound"]
    obj = rep["objective"]
    assert d["dispatch"] == b["dispatch"] == obj["dispatch"] == kernel
    for key in KEYS:
        assert 0 <= b[key] <= obj[key] + 1e-9, key
    assert b["copies_per_token"] >= b["nvlink_copies_per_token"] + b["rdma_copies_per_token"] - 1e-9
    assert rep["gap"] == pytest.approx((obj["total"] - b["total"]) / obj["total"])
    replicas = "--replicas" in args
    if kernel == "deepep-ll":
        # traffic weights zeroed: the total is the balance term alone, bound and objective
        assert obj["total"] == pytest.approx(obj["active_experts_imbalance"])
        assert b["total"] == pytest.approx(b["active_experts_imbalance"])
        if not replicas:  # flame-moe-290m: top-6; 4 GPUs in 2 nodes
            assert [b[key] for key in KEYS] == pytest.approx([6 * 1 / 4, 6 * 1 / 2, 6 * 3 / 4])
            assert [obj[key] for key in KEYS] == pytest.approx([b[key] for key in KEYS])
    elif kernel == "deepep-normal":
        # RDMA copies are the remote nodes; NVLink copies traffic_static's bound rescaled
        assert b["rdma_copies_per_token"] == pytest.approx(b["traffic_static_remote_nodes"])
        assert obj["rdma_copies_per_token"] == pytest.approx(obj["traffic_static_remote_nodes"])
        assert b["nvlink_copies_per_token"] == pytest.approx(
            b["traffic_static"] * (1 - 1 / 2) / (1 - 1 / 4))
    ev = json.loads(run("evaluate", synth_trace, plc, "--dispatch", kernel, "--model-shape",
                        "flame-moe-290m", "--tokens-per-step", "512", "--json").stdout)
    assert 0 < b["dispatch_us"] <= ev["dispatch_us"] and 0 < b["combine_us"] <= ev["combine_us"]
    out = run(*common).stdout
    line = next(x for x in out.splitlines() if x.startswith(f"{kernel} copies per token"))
    same = kernel == "deepep-ll" and not replicas
    assert ("the same for every placement" in line) is same
    # (a second solve: the bounds' refinements stop on time, so compare within one run)
    pairs = re.findall(r"(NVLink|RDMA|total) ([\d.]+)(?: >= ([\d.]+))?", line)
    assert [p[0] for p in pairs] == ["NVLink", "RDMA", "total"][:: 1 if "RDMA" in line else 2]
    for name, value, lb in pairs:
        if same:
            assert not lb and float(value) == pytest.approx(b[KEYS[("NVLink", "RDMA", "total")
                                                                  .index(name)]], abs=5e-4)
        else:
            assert float(lb) <= float(value)
    assert re.search(r"; per layer dispatch >= [\d.]+ us, combine >= [\d.]+ us \(h800-ib, "
                     r"512-token steps\)$", line), line
    head = next(x for x in out.splitlines() if x.startswith("objective ("))
    m = re.search(r"\) ([\d.]+), lower bound ([\d.]+), gap ([\d.]+)%", head)
    assert m and kernel in head
    total, lb = float(m.group(1)), float(m.group(2))
    assert float(m.group(3)) == pytest.approx(100 * (total - lb) / total, abs=0.06)
    assert ("traffic_static >=" in head) is (kernel != "deepep-ll")
    assert ("every placement sends the same deepep-ll copies" in head) is same


def test_solve_with_report_kernel_and_sim():
    """The library takes the kernel and the simulator profile; an unknown kernel is one
    InputError; without a token sample there are no copy terms."""
    from moeplace.errors import InputError
    from moeplace.solvers import Cluster, solve_with_report
    from moeplace.solvers.simulator import Hardware, ModelShape
    from moeplace.traces import compute_stats

    stats = compute_stats(random_trace(np.random.default_rng(2), 400, 2, 8, 2))
    sim = (Hardware.load("h800-ib"), ModelShape.named("mixtral-8x7b"))
    _, rep = solve_with_report(stats, Cluster(4, 2), method="search", time_limit=3,
                               kernel="alltoall", sim=sim)
    assert rep.bound["dispatch"] == "alltoall" and rep.bound["dispatch_us"] > 0
    assert rep.bound["copies_per_token"] <= rep.objective["copies_per_token"] + 1e-9
    _, rep = solve_with_report(stats, Cluster(4, 2), method="search", time_limit=3,
                               phase="decode")
    assert rep.bound["dispatch"] == "deepep-ll" and "dispatch_us" not in rep.bound
    with pytest.raises(InputError):
        solve_with_report(stats, Cluster(4, 2), time_limit=3, kernel="nccl")
    stats.token_sample = None
    _, rep = solve_with_report(stats, Cluster(4, 2), method="eplb", time_limit=3)
    assert "copies_per_token" not in rep.bound and rep.bound["dispatch"] == "deepep-normal"

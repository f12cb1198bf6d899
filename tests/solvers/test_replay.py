"""``moeplace replay``: its counts against a naive recount of placements.jsonl, causality (a
placement never depends on the tokens it is scored on), the CLI's flags and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.solvers.replay import EplbPolicy, NeverPolicy, StaticPolicy, replay, write_placements
from moeplace.traces import Trace, TraceMeta, write_trace
from tests.bad_input import cli_fails


def _trace(T: int = 700, L: int = 2, N: int = 8, k: int = 2, seed: int = 0,
           drift: bool = True) -> Trace:
    """Requests of random lengths, stored shuffled (so arrival order differs from file order);
    with ``drift`` the second half of the requests prefers other experts."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 30, size=200)
    lens = lens[np.cumsum(lens) <= T]
    req = np.repeat(np.arange(len(lens)), lens)
    pos = np.concatenate([np.arange(n) for n in lens])
    T = len(req)
    e = np.empty((T, L, k), np.int64)
    for t in range(T):
        late = drift and req[t] >= len(lens) // 2
        p = np.linspace(3, 1, N) if not late else np.linspace(1, 3, N)
        for l in range(L):
            e[t, l] = rng.choice(N, size=k, replace=False, p=p / p.sum())
    perm = rng.permutation(T)
    meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(range(L)), model="random")
    return Trace(e[perm].astype(np.uint8), meta, tokens={"request": req[perm],
                                                         "position": pos[perm]})


def _naive_rescore(trace: Trace, lines: list[dict], G: int) -> list[dict]:
    """From placements.jsonl alone: tokens sorted by (request, position) with Python's sort,
    each token-expert split evenly over the expert's copies, busiest GPU over the mean per
    layer; copies moved as set differences per GPU."""
    order = sorted(range(trace.num_tokens),
                   key=lambda t: (int(trace.tokens["request"][t]), int(trace.tokens["position"][t])))
    L, N = trace.num_layers, trace.num_experts
    out = []
    prev = None
    for i, line in enumerate(lines):
        m = line["phy2log"]
        P = len(m[0])
        S = P // G
        a, b = line["start_token"], lines[i + 1]["start_token"] if i + 1 < len(lines) else len(order)
        imbs = []
        for l in range(L):
            gpu = [0.0] * G
            copies = {e: [p // S for p in range(P) if m[l][p] == e] for e in range(N)}
            for t in order[a:b]:
                for e in trace.experts[t, l]:
                    for g in copies[int(e)]:
                        gpu[g] += 1.0 / len(copies[int(e)])
            mean = sum(gpu) / G
            imbs.append(max(gpu) / mean if mean else 1.0)
        moved = 0
        if prev is not None:
            for l in range(L):
                for g in range(G):
                    moved += len(set(m[l][g * S:(g + 1) * S]) - set(prev[l][g * S:(g + 1) * S]))
        out.append({"load_imbalance": sum(imbs) / L, "moved_copies": moved})
        prev = m
    return out


@pytest.mark.parametrize("G,M,R", [(4, 1, 0), (4, 2, 4)])
def test_replay_counts_match_a_naive_recount_of_placements_jsonl(tmp_path: Path, G, M, R):
    from moeplace.solvers.replay import OnlineReplayPolicy

    tr = _trace()
    pols = [OnlineReplayPolicy(G, M, 1, copy_cost_tokens=1.0), EplbPolicy(), NeverPolicy(),
            StaticPolicy()]
    res = replay(tr, pols, num_gpus=G, num_nodes=M, replicas=R, interval=96, window=64)
    write_placements(res, tmp_path / "o")
    for p in pols:
        lines = [json.loads(x) for x in (tmp_path / "o" / p.name / "placements.jsonl").read_text()
                 .splitlines()]
        assert [x["interval"] for x in lines] == list(range(len(lines)))
        assert [x["start_token"] for x in lines] == [96 * i for i in range(len(lines))]
        naive = _naive_rescore(tr, lines, G)
        rows = res.intervals[p.name]
        for r, n, x in zip(rows, naive, lines, strict=True):
            assert r["load_imbalance"] == pytest.approx(n["load_imbalance"], rel=1e-9)
            assert r["moved_copies"] == n["moved_copies"]
            assert r["rebalanced"] == x["rebalanced"]
        s = res.summary[p.name]
        assert s["moved_copies"] == sum(n["moved_copies"] for n in naive)
        assert s["load_imbalance_mean"] == pytest.approx(np.mean([n["load_imbalance"]
                                                                  for n in naive]))
    assert res.summary["never"]["moved_copies"] == 0
    assert res.summary["eplb"]["moved_copies"] > 0


def test_a_placement_never_depends_on_the_tokens_it_is_scored_on():
    """Rewriting every token from some interval on leaves all earlier lines, and the line
    that starts at that interval, unchanged (the decision there saw only earlier tokens)."""
    from moeplace.solvers.replay import OnlineReplayPolicy, replay_order

    tr = _trace(seed=3)
    rank = replay_order(tr.tokens, tr.num_tokens, "arrival", "t")
    cut = 96 * 3
    e = tr.experts.copy()
    late = rank >= cut
    e[late] = (e[late].astype(np.int64) * 3 + 1) % tr.num_experts  # a permutation of ids
    tr2 = Trace(e, tr.meta, tokens=dict(tr.tokens))

    def maps(t: Trace) -> dict[str, list[np.ndarray]]:
        pols = [OnlineReplayPolicy(4, 1, 1, copy_cost_tokens=1.0), EplbPolicy()]
        return replay(t, pols, num_gpus=4, replicas=4, interval=96).placements

    a, b = maps(tr), maps(tr2)
    for n in a:
        for i in range(4):  # lines 0..3: interval 3 starts at the cut
            assert (a[n][i] == b[n][i]).all(), (n, i)


def test_replay_cli_writes_placements_and_refuses_bad_input(tmp_path: Path):
    tr = _trace()
    path = tmp_path / "t.parquet"
    write_trace(tr, path)
    r = CliRunner().invoke(main, ["replay", str(path), "--gpus", "4", "--replicas", "4",
                                  "--interval", "100", "--policy", "moeplace", "--out",
                                  str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    lines = (tmp_path / "o" / "placements.jsonl").read_text().splitlines()
    assert len(lines) == out["setup"]["intervals"] == -(-tr.num_tokens // 100)
    first = json.loads(lines[0])
    assert {"interval", "start_token", "rebalanced", "phy2log"} <= set(first)
    assert first["phy2log"][0] == [p % 8 for p in range(12)]  # the stacks' initial map
    base = ["replay", str(path), "--gpus", "4", "--interval", "100"]
    cli_fails([*base, "--replicas", "3"], "--replicas")
    cli_fails([*base, "--policy", "moeplace,bogus"], "bogus")
    cli_fails([*base, "--policy", "eplb,eplb"], "twice")
    cli_fails(["replay", str(path), "--gpus", "4"], "--interval")
    cli_fails([*base, "--nodes", "3"], "--nodes")
    cli_fails([*base, "--order", "step"], "step")
    cli_fails([*base, "--out", str(tmp_path / "o")], "not empty")
    cli_fails(["replay", str(tmp_path / "missing.parquet"), "--gpus", "4"], "missing.parquet")


def test_replay_help_documents_every_flag():
    r = CliRunner().invoke(main, ["replay", "--help"])
    assert r.exit_code == 0
    for flag in ("--gpus", "--nodes", "--replicas", "--groups", "--interval", "--window",
                 "--policy", "--order", "--expert-bytes", "--hardware", "--out", "--json",
                 "--plot"):
        assert flag in r.output, flag
    for name in ("moeplace", "vllm", "sglang", "eplb-cumulative", "static", "never"):
        assert name in r.output, name


def test_engine_policy_refused_in_one_line_when_not_importable(tmp_path: Path):
    import importlib.util

    path = tmp_path / "t.parquet"
    write_trace(_trace(), path)
    for engine in ("vllm", "sglang"):
        if importlib.util.find_spec(engine) is not None:
            continue  # importable here: the engine tests below cover it
        cli_fails(["replay", str(path), "--gpus", "4", "--policy", f"moeplace,{engine}"],
                  f"--policy: {engine}")


def test_replay_headline_states_the_replayed_numbers(tmp_path: Path):
    """The printed sentence carries the summary's own figures: imbalance of moeplace and of the
    default refit, copies each moved, and their ratio."""
    import re

    path = tmp_path / "t.parquet"
    write_trace(_trace(T=1200), path)
    r = CliRunner().invoke(main, ["replay", str(path), "--gpus", "4", "--interval", "100",
                                  "--policy", "moeplace,eplb", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    m, e = out["policies"]["moeplace"]["summary"], out["policies"]["eplb"]["summary"]
    h = out["headline"]
    assert f"{m['load_imbalance_mean']:.3f}" in h and f"{e['load_imbalance_mean']:.3f}" in h
    assert f"{m['moved_copies']:,} expert copies against eplb's {e['moved_copies']:,}" in h
    word = re.search(r"(lower than|the same as|higher than) eplb", h).group(1)
    d = m["load_imbalance_mean"] - e["load_imbalance_mean"]
    assert word == ("lower than" if d < -5e-5 else "higher than" if d > 5e-5 else "the same as")
    r = CliRunner().invoke(main, ["replay", str(path), "--gpus", "4", "--interval", "100",
                                  "--policy", "moeplace,eplb"])
    assert r.exit_code == 0 and r.output.splitlines()[0] == h

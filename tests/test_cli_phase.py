"""``solve``, ``evaluate`` and ``replay --phase``: only that phase's tokens are fitted and scored
(counted here by hand from the whole trace), the phase's kernel is reported, the placement
records what it was solved for, and a trace whose phase column lacks the phase is one error line
with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.placement import Placement
from moeplace.traces import read_trace
from moeplace.traces.demo import demo_trace_path
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL, held_request_ids
from tests.bad_input import cli_fails
from tests.conftest import MIXTRAL, shared_file


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A synthetic FLAME-shaped trace whose requests' first 40 tokens are prefill."""
    path = tmp_path_factory.mktemp("mixed") / "t.parquet"
    r = CliRunner().invoke(main, ["synth", "--preset", "flame-moe-290m", "--tokens", "6000",
                                  "--prompt-tokens", "40", "--out", str(path)])
    assert r.exit_code == 0, r.output
    return path


def test_synth_prompt_tokens_sets_the_phase_by_position(mixed):
    tr = read_trace(mixed)
    want = np.where(tr.tokens["position"] < 40, PHASE_PREFILL, PHASE_DECODE)
    np.testing.assert_array_equal(tr.tokens["phase"], want)
    assert 0 < (want == PHASE_DECODE).sum() < tr.num_tokens


@pytest.mark.parametrize("phase, code, kernel", [("decode", PHASE_DECODE, "deepep-ll"),
                                                 ("prefill", PHASE_PREFILL, "deepep-normal")])
def test_solve_fits_and_scores_only_the_phase(mixed, tmp_path, phase, code, kernel):
    tr = read_trace(mixed)
    mine = tr.tokens["phase"] == code
    req = tr.tokens["request"][mine]
    held = held_request_ids(np.unique(req), 0.5, 0, "t")
    fit_tokens = int((~np.isin(req, held)).sum())
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["solve", str(mixed), "--gpus", "4", "--phase", phase,
                                  "--holdout", "0.5", "--time-limit", "5", "--out", str(out),
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = _json(r.stdout)
    assert d["dispatch"] == kernel
    assert d["phase"] == {"name": phase, "tokens": int(mine.sum()),
                          "tokens_in_trace": tr.num_tokens, "phase_column": True}
    sc = d["scoring"]
    assert sc["fit"]["tokens_in_trace"] == fit_tokens
    assert sc["holdout"]["tokens_in_trace"] == int(mine.sum()) - fit_tokens
    assert f"{int(mine.sum()):,} of {tr.num_tokens:,} tokens" in r.stderr
    info = Placement.load(out).info
    assert info["phase"] == phase and info["dispatch"] == kernel


def test_solve_without_phase_uses_every_token(mixed, tmp_path):
    r = CliRunner().invoke(main, ["solve", str(mixed), "--gpus", "4", "--time-limit", "3",
                                  "--out", str(tmp_path / "p.json"), "--json"])
    assert r.exit_code == 0, r.output
    d = _json(r.stdout)
    assert "phase" not in d and d["dispatch"] == "deepep-normal"
    assert d["scoring"]["fit"]["tokens_in_trace"] == 6000
    assert "phase" not in Placement.load(tmp_path / "p.json").info


def test_decode_trace_solves_for_deepep_ll_at_eplb_balance():
    """The acceptance: a decode trace (Mixtral, vLLM decode steps; no phase column, so every
    token) under --phase decode reports deepep-ll and keeps EPLB's token balance (co-location
    buys nothing there); --phase prefill reports deepep-normal. The time limit is never reached:
    the search stops on its own."""
    path = str(shared_file(MIXTRAL))
    r = CliRunner().invoke(main, ["solve", path, "--missing-id", "255", "--gpus", "4", "--phase",
                                  "decode", "--time-limit", "600", "--json"])
    assert r.exit_code == 0, r.output
    d = _json(r.stdout)
    assert d["dispatch"] == "deepep-ll"
    assert d["phase"]["phase_column"] is False and d["phase"]["tokens"] == 577
    assert "no phase column, so all 577 tokens are used for --phase decode" in r.stderr
    rows = {row["placement"]: row for row in d["fit"]}
    assert rows["search"]["load_imbalance_mean"] <= rows["eplb"]["load_imbalance_mean"] + 1e-9
    r = CliRunner().invoke(main, ["solve", path, "--missing-id", "255", "--gpus", "4", "--phase",
                                  "prefill", "--time-limit", "600", "--json"])
    assert r.exit_code == 0, r.output
    assert _json(r.stdout)["dispatch"] == "deepep-normal"


def test_evaluate_and_replay_take_the_phase(mixed, tmp_path):
    tr = read_trace(mixed)
    n = int((tr.tokens["phase"] == PHASE_DECODE).sum())
    plc = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["solve", str(mixed), "--gpus", "4", "--method", "eplb",
                                  "--time-limit", "5", "--out", str(plc)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", str(mixed), str(plc), "--phase", "decode",
                                  "--json"])
    assert r.exit_code == 0, r.output
    d = _json(r.stdout)
    assert d["tokens"] == n and d["phase"]["tokens"] == n
    r = CliRunner().invoke(main, ["replay", str(mixed), "--gpus", "4", "--interval", "1000",
                                  "--phase", "decode", "--policy", "moeplace,never", "--json"])
    assert r.exit_code == 0, r.output
    d = _json(r.stdout)
    assert d["setup"]["tokens"] == n and d["setup"]["phase"]["name"] == "decode"
    assert f"{n:,} of 6,000 tokens" in r.stderr


@pytest.mark.parametrize("cmd", [
    ["solve", "{T}", "--gpus", "8", "--phase", "decode", "--out", "{O}/p.json"],
    ["solve", "{T}", "--gpus", "8", "--phase", "decode", "--holdout", "0.5", "--json",
     "--out", "{O}/p.json"],
    ["evaluate", "{T}", "{P}", "--phase", "decode"],
    ["replay", "{T}", "--gpus", "8", "--interval", "512", "--phase", "decode", "--out", "{O}/r"],
])
def test_phase_column_without_the_phase_is_one_line(tmp_path, cmd):
    """The bundled FLAME trace records its phase: every token prefill."""
    plc = tmp_path / "in.json"
    r = CliRunner().invoke(main, ["solve", str(demo_trace_path()), "--gpus", "8", "--method",
                                  "eplb", "--out", str(plc)])
    assert r.exit_code == 0, r.output
    (tmp_path / "o").mkdir()
    args = [a.replace("{T}", str(demo_trace_path())).replace("{P}", str(plc))
            .replace("{O}", str(tmp_path / "o")) for a in cmd]
    line = cli_fails(args, ": phase: no decode token among the 2,048 tokens")
    assert str(demo_trace_path()) in line and "prefill 2,048" in line
    assert not any((tmp_path / "o").iterdir())


def test_statistics_have_no_phase(tmp_path):
    st = tmp_path / "s.npz"
    assert CliRunner().invoke(main, ["stats", str(demo_trace_path()), "--out", str(st)]
                              ).exit_code == 0
    r = CliRunner().invoke(main, ["solve", str(st), "--gpus", "8", "--phase", "decode",
                                  "--time-limit", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert "statistics carry no phase, so all 2,048 tokens are used" in r.stderr
    assert _json(r.stdout)["dispatch"] == "deepep-ll"

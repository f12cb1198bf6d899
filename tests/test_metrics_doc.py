"""Every name the CLI prints in JSON (analyze, evaluate, solve) is defined in docs/metrics.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from moeplace.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _keys(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _keys(v, out)
    return out


def _run(*args: str) -> dict:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # notes (--phase) go to stderr


def test_every_printed_name_is_documented(tmp_path):
    tr, plc = str(tmp_path / "t.parquet"), str(tmp_path / "p.json")
    r = CliRunner().invoke(main, ["synth", "--preset", "flame-moe-290m", "--tokens", "2000",
                                  "--out", tr])
    assert r.exit_code == 0
    names: set[str] = set()
    _keys(_run("analyze", tr, "--json"), names)
    _keys(_run("solve", tr, "--gpus", "4", "--nodes", "2", "--json", "--out", plc), names)
    _keys(_run("solve", tr, "--gpus", "4", "--nodes", "2", "--replicas", "4", "--json",
               "--current", plc, "--pareto", "--holdout", "0.3", "--time-limit", "4",
               "--weights", "coact=0.5,migration=0.1"), names)
    _keys(_run("evaluate", tr, plc, "--json", "--per-layer", "--current", plc), names)
    _keys(_run("evaluate", tr, plc, "--json", "--dispatch", "deepep-ll"), names)
    _keys(_run("solve", tr, "--gpus", "4", "--phase", "prefill", "--time-limit", "3", "--json"),
          names)
    _keys(_run("evaluate", tr, plc, "--json", "--phase", "prefill"), names)
    _keys(_run("simulate", "--kernel", "deepep-normal", "--ep", "16", "--tokens", "16", "--json"),
          names)
    text = DOC.read_text()
    documented = set(re.findall(r"`([a-z0-9_{},]+)`", text))
    # expand `traffic_{static,follow}_x` and `next_top{k}_share` patterns
    for pat in list(documented):
        m = re.fullmatch(r"(.*)\{([a-z,]+)\}(.*)", pat)
        if m and "," in m.group(2):
            documented |= {m.group(1) + alt + m.group(3) for alt in m.group(2).split(",")}

    def known(name: str) -> bool:  # next_top6_share is documented as next_top{k}_share
        return name in documented or re.sub(r"top\d+_", "top{k}_", name) in documented

    missing = sorted(n for n in names if not known(n))
    assert not missing, f"names printed but not in docs/metrics.md: {missing}"
    # the canonical metric names are there, the retired ones are not
    for name in ("load_imbalance", "expert_load_ratio", "cross_gpu_pair_fraction",
                 "cross_node_pair_fraction", "window_imbalance_mean"):
        assert f"`{name}`" in text
    for retired in ("cross_layer_pair_fraction", "cross_gpu_pairs", "cross_gpu_fraction"):
        assert retired not in names and retired not in text

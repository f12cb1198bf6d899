"""moeplace's SGLang hook against the installed SGLang's real modules (in a subprocess): SGLang's
own plug-in loader finds the entry point, the function ``init_by_eplb`` calls is moeplace's and
its answer is what SGLang's own ``ExpertLocationMetadata._init_raw`` builds from; a placement JSON
lands first; an SGLang version the hook does not know is refused in one line."""

from __future__ import annotations

import json
import re
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tests.engines import prelude_error, run_forked, run_with_engine

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "shims"
# a real triton wins; the shim only fills in where there is none
PRELUDE = f"""
import importlib.util, sys
if importlib.util.find_spec("triton") is None:
    sys.path.append({str(SHIM)!r})
"""
# What every check imports first: each forks from one interpreter that imported it once.
PROBE = PRELUDE + "import numpy, torch\nimport sglang.srt.eplb.expert_location, sglang.srt.plugins\n"


def _entry_point() -> str:
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    return eps["sglang.srt.plugins"]["moeplace"]


def _env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    """SGLang finds plug-ins in installed metadata. Where the installed moeplace predates the
    entry point (an editable install of an older checkout), a dist-info declaring exactly the
    pyproject's entry point stands in, on the subprocess path only."""
    r = run_with_engine("sglang", "import importlib.metadata as m; print([e.value for e in "
                        "m.entry_points(group='sglang.srt.plugins') if e.name == 'moeplace'])")
    env = dict(extra)
    if _entry_point() not in r.stdout:
        d = tmp_path / "ep" / "moeplace_entry_point-0.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text("Metadata-Version: 2.1\nName: moeplace-entry-point\nVersion: 0\n")
        (d / "entry_points.txt").write_text(f"[sglang.srt.plugins]\nmoeplace = {_entry_point()}\n")
        env["MOEPLACE_TEST_EP_DIR"] = str(tmp_path / "ep")
    return env


def _run(code: str, tmp_path: Path, extra: dict[str, str]):
    err = prelude_error("sglang", PROBE)
    if err:
        pytest.skip("SGLang's EPLB modules do not import here: " + err)
    body = ("import os\nif os.environ.get('MOEPLACE_TEST_EP_DIR'):\n"
            "    sys.path.append(os.environ['MOEPLACE_TEST_EP_DIR'])\n") + textwrap.dedent(code)
    return run_forked("sglang", PROBE, body, extra_env=_env(tmp_path, extra))


CALL = """
import json, numpy as np, torch
from sglang.srt.plugins import load_plugins
load_plugins()                                   # SGLang's own loader (scheduler processes call it)
from sglang.srt.eplb import eplb_algorithms      # what init_by_eplb imports at call time
from sglang.srt.eplb.expert_location import ExpertLocationMetadata
fn = eplb_algorithms.rebalance_experts
assert getattr(fn, "_moeplace", False), fn
assert fn.__module__ == "moeplace.integrations.sglang", fn.__module__
import sglang.srt.eplb.expert_location as el
from types import SimpleNamespace as NS
L, N, G, R = 4, 16, 4, 4
P = N + R
# What a running server publishes in SGLang's runtime context (device, parallel and exec config
# bags, the model's expert-location config); init_by_eplb's own body, the lookup of
# eplb_algorithms.rebalance_experts, compute_algorithm and _init_raw all run as installed.
moe = NS(eplb_algorithm="auto", ep_dispatch_algorithm="dynamic", ep_num_redundant_experts=R)
el.get_exec = lambda: NS(moe=moe)
el.get_device = lambda: NS(device="cpu")
el.get_parallel = lambda: NS(nnodes=1, ep_size=G)
ExpertLocationMetadata._init_common = staticmethod(lambda model_config: {
    "model_config_for_expert_location": NS(num_groups=None, num_logical_experts=N,
                                           num_layers=L),
    "num_physical_experts": P, "ep_size": G})
rng = np.random.default_rng(0)
out = []
for step in range(3):
    # logical_count as SGLang's recorder gives it: [snapshots, hidden layers, experts]
    count = torch.from_numpy(rng.poisson(rng.gamma(0.4, 1, (2, L, N)) * 300)).to(torch.int64)
    count[:, 0] = 0                              # a dense hidden layer counts nothing
    meta = ExpertLocationMetadata.init_by_eplb(None, logical_count=count)
    phy, log2phy = meta.physical_to_logical_map_cpu, meta.logical_to_all_physical_map_cpu
    logcnt = meta.logical_to_all_physical_map_num_valid
    assert tuple(phy.shape) == (L, P) and tuple(log2phy.shape) == (L, N, P)
    out.append({"phy": phy.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
                "dtypes": [str(phy.dtype), str(log2phy.dtype), str(logcnt.dtype)],
                "num_valid": logcnt.tolist()})
print("OUT " + json.dumps(out))
"""


def _outputs(r) -> list[dict]:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("OUT "))[4:])


def _check_shape(o: dict, L: int, N: int, P: int) -> None:
    phy = np.array(o["phy"])
    assert o["dtypes"][:2] == ["torch.int64"] * 2 and phy.shape == (L, P)
    assert ((phy >= 0) & (phy < N)).all()
    cnt = np.array(o["logcnt"])
    for l in range(L):  # naive recount of SGLang's log2phy / logcnt from phy2log
        assert set(phy[l].tolist()) == set(range(N))
        for e in range(N):
            slots = [p for p in range(P) if phy[l, p] == e]
            assert cnt[l, e] == len(slots)
            row = o["log2phy"][l][e]
            assert row[:len(slots)] == slots and all(x == -1 for x in row[len(slots):])
    assert (np.array(o["num_valid"]) == cnt).all()


def test_sglang_own_loader_runs_moeplace_policy(tmp_path):
    outs = _outputs(_run(CALL, tmp_path, {"MOEPLACE_SGLANG_POLICY": "1"}))
    assert len(outs) == 3
    for o in outs:
        _check_shape(o, 4, 16, 20)


def test_placement_json_lands_first(tmp_path):
    from moeplace.placement import Placement
    L, N, G, P = 4, 16, 4, 20
    rng = np.random.default_rng(3)
    phy = np.stack([np.concatenate([rng.permutation(N), rng.choice(N, P - N, replace=False)])
                    for _ in range(L)])
    f = tmp_path / "placement.json"
    Placement(phy2log=phy, num_gpus=G, colocated=True).save(f)
    outs = _outputs(_run(CALL, tmp_path, {"MOEPLACE_SGLANG_POLICY": str(f)}))
    assert outs[0]["phy"] == phy.tolist()
    for o in outs:
        _check_shape(o, L, N, P)


def test_unknown_sglang_version_is_refused_in_one_line(tmp_path):
    code = """
    import sglang
    sglang.__version__ = "0.5.22"
    from moeplace.integrations.sglang import main
    main(["--model-path", "m", "--enable-eplb"])
    """
    r = _run(code, tmp_path, {})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("moeplace:")]
    assert len(lines) == 1 and re.search(r"SGLang 0\.5\.22: .*supported: SGLang 0\.5\.23", lines[0])
    # the entry point refuses the same way inside SGLang's loader (which swallows Exceptions)
    code = """
    import sglang
    sglang.__version__ = "0.6.0"
    from sglang.srt.plugins import load_plugins
    load_plugins()
    print("SERVED WITH SGLANG'S OWN ALGORITHM")
    """
    r = _run(code, tmp_path / "b", {"MOEPLACE_SGLANG_POLICY": "1"})
    assert r.returncode == 2 and "SERVED" not in r.stdout
    assert "SGLang 0.6.0: EPLB algorithm interface is not known" in r.stderr


def test_changed_signature_is_refused(tmp_path):
    code = """
    from sglang.srt.eplb import eplb_algorithms
    eplb_algorithms.rebalance_experts = lambda tokens_per_expert, num_physical_experts: None
    import moeplace.integrations.sglang as ms
    try:
        ms.check_interface()
    except ms.UnsupportedEngineError as e:
        print("REFUSED", e)
    """
    r = _run(code, tmp_path, {})
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("REFUSED")]
    assert line and "rebalance_experts" in line[0] and "supported: SGLang 0.5.23" in line[0]


def test_documented_launch_line_parses_with_sglang_args(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## moeplace's policy inside SGLang"):]
    line = block[block.index("python -m moeplace.integrations.sglang"):]
    line = line[:line.index("\n```")].replace("\\\n", " ").split("#")[0]
    args = line.split()[3:]
    code = f"""
    import argparse
    from sglang.srt.server_args import ServerArgs
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    a = p.parse_args({args!r})
    print("OK", a.enable_eplb, a.ep_num_redundant_experts)
    """
    r = _run(code, tmp_path, {})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK True" in r.stdout

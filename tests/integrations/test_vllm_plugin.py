"""moeplace's vLLM plug-in against the installed vLLM's real EPLB modules (in a subprocess)."""

from __future__ import annotations

import textwrap

import pytest

from tests.engines import VLLM_PRELUDE, prelude_error, run_forked, run_with_engine


def _vllm_or_skip() -> None:
    err = prelude_error("vllm", VLLM_PRELUDE)
    if err:
        pytest.skip("vLLM's EPLB modules do not import here: " + err)


def _run(code: str, env: dict[str, str]):
    """``code`` in a process of its own that has imported vLLM's EPLB modules (skipped where
    they do not import); each check forks from one interpreter that imported them once."""
    _vllm_or_skip()
    return run_forked("vllm", VLLM_PRELUDE, textwrap.dedent(code), extra_env=env)


def test_placement_json_lands_first_and_bad_signature_is_refused(tmp_path):
    code = f"""
    import numpy as np, torch
    from moeplace.placement import Placement
    L, N, G, P = 2, 8, 4, 12
    rng = np.random.default_rng(0)
    phy = np.stack([np.concatenate([rng.permutation(N), rng.choice(N, P - N, replace=False)])
                    for _ in range(L)])
    Placement(phy2log=phy, num_gpus=G, colocated=True).save({str(tmp_path / 'p.json')!r})
    import moeplace.integrations.vllm as mv
    mv.register()
    from vllm.distributed.eplb.policy import EPLB_POLICIES
    cls = EPLB_POLICIES["default"]           # the lookup EplbState.add_model does
    assert cls.__name__ == "MoeplaceEplbPolicy", cls
    cur = torch.arange(P).repeat(L, 1) % N
    out = cls.rebalance_experts(torch.zeros(L, N, dtype=torch.int32), P, 1, 1, G, cur)
    assert out.dtype == torch.int64 and (out.numpy() == phy).all()   # profile call
    out = cls.rebalance_experts(torch.ones(L, N, dtype=torch.int32), P, 1, 1, G, cur)
    assert (out.numpy() == phy).all()
    from vllm.distributed.eplb.policy import AbstractEplbPolicy
    AbstractEplbPolicy.rebalance_experts = classmethod(lambda cls, weight, num_replicas: None)
    try:
        mv.check_interface()
    except mv.UnsupportedEngineError as e:
        print("REFUSED", e)
    """
    r = _run(code, {"MOEPLACE_VLLM_POLICY": str(tmp_path / "p.json")})
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("REFUSED")]
    assert line and "supported: vLLM 0.34.0" in line[0]


def _entry_point_or_skip() -> None:
    r = run_with_engine("vllm", "import importlib.metadata as m; print([e.value for e in "
                        "m.entry_points(group='vllm.general_plugins') if e.name == 'moeplace'])")
    if "moeplace.integrations.vllm:register" not in r.stdout:
        pytest.skip("moeplace's vllm.general_plugins entry point is not in the installed metadata "
                    "(pip install the package, editable or wheel, so vLLM's loader can find it)")


LOADER = """
import json, sys, numpy as np, torch
import vllm.plugins
vllm.plugins.load_general_plugins()          # vLLM's own loader: entry points of its group
import moeplace, moeplace.integrations.vllm as mv
from vllm.config.parallel import EPLBConfig
from vllm.distributed.eplb.policy import EPLB_POLICIES, AbstractEplbPolicy
# the documented --eplb-config, as vLLM's EngineArgs turns it into its config
cfg = EPLBConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else {cfg!r}))
cls = EPLB_POLICIES[cfg.policy]               # what EplbState.add_model selects
assert getattr(cls, "_moeplace", False) and issubclass(cls, AbstractEplbPolicy), cls
assert cls.rebalance_experts.__func__.__module__ == "moeplace.integrations.vllm"
assert mv.__file__.startswith(moeplace.__path__[0])
L, N, G, nodes, groups = 3, 16, 4, 1, 1
P = N + cfg.num_redundant_experts
# vLLM's initial map (EplbState.build_initial_global_physical_to_logical_map, inlined: importing
# eplb_state needs vLLM's whole serving stack): routed experts, then redundant i % N
cur = torch.tensor(list(range(N)) + [i % N for i in range(P - N)]).repeat(L, 1)
rng = np.random.default_rng(0)
outs = []
for step in range(3):
    w = torch.from_numpy(rng.poisson(rng.gamma(0.4, 1, (L, N)) * 400)).to(torch.int64)
    new = cls.rebalance_experts(w, P, groups, nodes, G, cur)
    assert isinstance(new, torch.Tensor) and new.device.type == "cpu", type(new)
    assert new.dtype == torch.int64 and tuple(new.shape) == (L, P), (new.dtype, new.shape)
    n = new.numpy()
    assert ((n >= 0) & (n < N)).all()
    assert all(len(set(r)) == N for r in n.tolist())      # every logical expert kept
    outs.append(n.tolist())
    cur = new
print("MAPS", json.dumps(outs))
"""
CFG = '{"window_size":1000,"step_interval":3000,"num_redundant_experts":4}'


def test_vllm_own_plugin_loader_installs_moeplace_policy():
    _vllm_or_skip()
    _entry_point_or_skip()
    r = _run(LOADER.format(cfg=CFG), {"MOEPLACE_VLLM_POLICY": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    maps = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("MAPS"))[5:])
    assert len(maps) == 3
    # without the variable vLLM keeps its own default policy
    off = _run("import vllm.plugins; vllm.plugins.load_general_plugins()\n"
               "from vllm.distributed.eplb.policy import EPLB_POLICIES, DefaultEplbPolicy\n"
               "assert EPLB_POLICIES['default'] is DefaultEplbPolicy",
               {"MOEPLACE_VLLM_POLICY": ""})
    assert off.returncode == 0, off.stderr[-3000:]


def test_vllm_own_plugin_loader_lands_placement_json_first(tmp_path):
    _vllm_or_skip()
    _entry_point_or_skip()
    import numpy as np

    from moeplace.placement import Placement
    L, N, G, P = 3, 16, 4, 20
    rng = np.random.default_rng(1)
    phy = np.stack([np.concatenate([rng.permutation(N), rng.choice(N, P - N, replace=False)])
                    for _ in range(L)])
    f = tmp_path / "placement.json"
    Placement(phy2log=phy, num_gpus=G, colocated=True).save(f)
    r = _run(LOADER.format(cfg=CFG), {"MOEPLACE_VLLM_POLICY": str(f)})
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    maps = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("MAPS"))[5:])
    assert maps[0] == phy.tolist()   # the first rebalance lands the file's placement


def test_documented_launch_line_matches_vllm_arg_parser():
    """The README's launch line: every flag is one vLLM 0.34.0's EngineArgs.add_cli_args declares
    (read from its source: importing the parser needs vLLM's serving dependencies), and the
    ``--eplb-config`` JSON is accepted by vLLM's own EPLBConfig."""
    import re
    from pathlib import Path

    from tests.engines import engine_path
    src = (engine_path("vllm") / "vllm" / "engine" / "arg_utils.py").read_text()
    declared = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', src))
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("## moeplace's policy inside vLLM"):]
    line = block[block.index("MOEPLACE_VLLM_POLICY=1 vllm serve"):]
    line = line[:line.index("\n#")].replace("\\\n", " ")
    flags = re.findall(r"(--[a-z0-9-]+)", line)
    assert {"--enable-eplb", "--eplb-config", "--enable-expert-parallel"} <= set(flags)
    assert set(flags) <= declared, set(flags) - declared
    cfg = re.search(r"--eplb-config '([^']+)'", line).group(1)
    r = run_forked("vllm", VLLM_PRELUDE, "import json, sys\nfrom vllm.config.parallel import EPLBConfig\n"
                   "c = EPLBConfig(**json.loads(sys.argv[1])); print(c.policy, c.num_redundant_experts)"
                   .replace("sys.argv[1]", repr(cfg)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "default"

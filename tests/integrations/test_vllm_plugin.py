"""moeplace's vLLM plug-in against the installed vLLM's real EPLB modules (in a subprocess)."""

from __future__ import annotations

import textwrap

import pytest

from tests.engines import run_with_engine

PROBE = "import vllm.distributed.eplb.policy"


def _run(code: str, env: dict[str, str]):
    r = run_with_engine("vllm", PROBE)
    if r.returncode:
        pytest.skip("vLLM's EPLB modules do not import here: " + r.stderr.strip().splitlines()[-1])
    return run_with_engine("vllm", textwrap.dedent(code), extra_env=env)


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

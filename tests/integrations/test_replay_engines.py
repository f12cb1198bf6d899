"""``moeplace replay --policy vllm`` against the installed vLLM's own ``DefaultEplbPolicy``
(in a subprocess that sees the engine; skipped cleanly where vLLM is not installed)."""

from __future__ import annotations

import textwrap

import pytest

from tests.engines import VLLM_PRELUDE, run_forked


def test_replay_vllm_policy_is_the_installed_vllms_own_algorithm(tmp_path):
    # forked from the interpreter that imported vLLM once for all vLLM checks (tests/engines.py)
    probe = run_forked("vllm", VLLM_PRELUDE, "import vllm.distributed.eplb.policy.default")
    if probe.returncode:
        pytest.skip("vLLM's EPLB modules do not import here: "
                    + probe.stderr.strip().splitlines()[-1])
    code = f"""
    import json, subprocess, sys
    import numpy as np, torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    from moeplace.traces import Trace, TraceMeta, write_trace
    rng = np.random.default_rng(0)
    T, L, N, k, G, R, I, W = 900, 2, 16, 2, 4, 4, 128, 96
    req = np.sort(rng.integers(0, 60, size=T)); pos = np.arange(T)
    e = np.stack([np.stack([rng.choice(N, k, replace=False, p=np.linspace(4, 1, N) / np.linspace(4, 1, N).sum())
                            for _ in range(L)]) for _ in range(T)])
    perm = rng.permutation(T)
    meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=(0, 1))
    write_trace(Trace(e[perm].astype(np.uint8), meta, tokens={{"request": req[perm], "position": pos[perm]}}),
                {str(tmp_path / 't.parquet')!r})
    r = subprocess.run([sys.executable, "-m", "moeplace", "replay", {str(tmp_path / 't.parquet')!r},
                        "--gpus", str(G), "--replicas", str(R), "--interval", str(I), "--window", str(W),
                        "--policy", "vllm", "--out", {str(tmp_path / 'o')!r}], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "DefaultEplbPolicy" in r.stdout and "installed engine" in r.stdout, r.stdout
    lines = [json.loads(x) for x in open({str(tmp_path / 'o' / 'placements.jsonl')!r})]
    order = np.lexsort((pos, req))              # arrival order, recomputed here
    assert len(lines) == -(-T // I)
    for i in range(1, len(lines)):
        s = lines[i]["start_token"]
        win = np.zeros((L, N))
        for t in order[max(0, s - W):s]:
            for l in range(L):
                for x in e[t, l]:
                    win[l, x] += 1
        want = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(win.astype(np.float32)), N + R, 1, 1, G,
                                                   torch.tensor(lines[i - 1]["phy2log"]))
        assert (np.array(lines[i]["phy2log"]) == want.numpy()).all(), i
        assert lines[i]["rebalanced"] is True
    print("ok", len(lines))
    """
    r = run_forked("vllm", VLLM_PRELUDE, textwrap.dedent(code))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("ok"), r.stdout

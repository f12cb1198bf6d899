"""moeplace's ``eplb`` against the installed vLLM's own ``DefaultEplbPolicy`` (vLLM 0.34.0,
installed ``--no-deps`` by ``.ci/run``; skipped where it is not): on tie-free loads every GPU
holds the same experts, layer by layer, in every setting of GPUs, nodes, replicas and groups.

Ties are left out on purpose: vLLM sorts with numpy's default (unstable) quicksort, so the order
of equal loads is an artefact of the sort, not a rule anyone could match."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeplace.solvers.baselines import eplb
from tests.engines import run_with_engine

# (experts, GPUs, nodes, replicas, groups): one node and several, no replicas and many, the
# global policy (groups not dividing over nodes) and the hierarchical one.
SETTINGS = [
    (64, 8, 1, 0, 1),
    (64, 8, 1, 8, 1),
    (64, 16, 2, 16, 1),
    (64, 16, 2, 16, 8),
    (60, 4, 2, 4, 4),
    (256, 32, 4, 32, 8),
    (256, 64, 8, 64, 8),
    (120, 24, 3, 24, 6),
]
LAYERS = 12
# Token counts of a long production window (about 10^8 per layer): float32 sums of packs then
# round at whole tokens, where a float32 implementation and the engines (float64) part ways.
SCALE = 30_000

VLLM = """
import json, sys
import numpy as np, torch
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
cases = json.loads(open(sys.argv[1]).read()) if len(sys.argv) > 1 else json.load(open(CASES))
out = []
for c in cases:
    w = torch.tensor(np.array(c["load"], dtype=np.float32))
    phy = DefaultEplbPolicy.rebalance_experts(w, c["slots"], c["groups"], c["nodes"], c["gpus"])
    out.append(phy.tolist())
print(json.dumps(out))
"""


def tie_free_loads(rng: np.random.Generator, N: int) -> np.ndarray:
    """Skewed float32 loads (a heavy tail) with no two equal values and no two equal per-copy
    loads up to 8 copies, so that no step of EPLB meets a tie."""
    while True:
        w = (rng.lognormal(6.0, 1.2, (LAYERS, N)) * SCALE).astype(np.float32)
        ok = all(len(np.unique(np.concatenate([row / c for c in range(1, 9)]))) == 8 * N
                 for row in w.astype(np.float64))
        if ok:
            return w


def gpu_sets(phy2log: np.ndarray, gpus: int) -> list[list[list[int]]]:
    per = np.asarray(phy2log).reshape(phy2log.shape[0], gpus, -1)
    return np.sort(per, axis=2).tolist()


def test_eplb_equals_vllm_default_policy_on_every_layer(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(2026)
    cases, loads = [], []
    for N, G, M, R, g in SETTINGS:
        w = tie_free_loads(rng, N)
        loads.append(w)
        cases.append({"load": w.tolist(), "slots": N + R, "groups": g, "nodes": M, "gpus": G})
    try:
        f = tmp_path / "cases.json"
        f.write_text(json.dumps(cases))
        p = run_with_engine("vllm", f"CASES = {str(f)!r}\n" + VLLM)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pytest.fail("vLLM's policy did not return")
    if p.returncode != 0 and "No module named 'torch'" in p.stderr:
        pytest.skip("torch is not installed beside vLLM")
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    assert sys.version_info >= (3, 11)
    total = equal = 0
    bad = []
    for (N, G, M, R, g), w, phy in zip(SETTINGS, loads, theirs, strict=True):
        ours = eplb(w, G, M, R, num_groups=g).phy2log
        a, b = gpu_sets(ours, G), gpu_sets(np.asarray(phy), G)
        for l in range(LAYERS):
            total += 1
            if a[l] == b[l]:
                equal += 1
            else:
                bad.append((N, G, M, R, g, l))
    assert equal == total, f"{equal}/{total} layers equal; first differences: {bad[:5]}"

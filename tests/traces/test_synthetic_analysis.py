from __future__ import annotations

import numpy as np
import pytest

from moeplace.errors import InputError
from moeplace.traces import SyntheticRouter, compute_stats, synthetic_trace
from moeplace.traces.analysis import (
    drift,
    layer_table,
    mutual_information,
    next_layer_concentration,
    top_transitions,
)
from moeplace.traces.synthetic import SyntheticSpec, preset


def test_synthetic_is_seeded_and_valid():
    a = synthetic_trace("deepseek-v2-lite", 3000, seed=5)
    b = synthetic_trace("deepseek-v2-lite", 3000, seed=5)
    c = synthetic_trace("deepseek-v2-lite", 3000, seed=6)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert not np.array_equal(a.experts, c.experts)
    assert a.experts.shape == (3000, 26, 6)
    s = np.sort(a.experts, axis=2)
    assert (s[:, :, 1:] != s[:, :, :-1]).all()  # k distinct experts per token and layer
    # Chunked sampling equals one-shot sampling.
    r = SyntheticRouter(preset("deepseek-v2-lite"), 5)
    parts = list(r.sample(3000, chunk_tokens=700))
    np.testing.assert_array_equal(np.concatenate([p.experts for p in parts]).shape, (3000, 26, 6))
    req = np.concatenate([p.tokens["request"] for p in parts])
    assert (np.diff(req) >= 0).all()


@pytest.mark.parametrize("name,shape", [("deepseek-v3", (58, 256, 8)), ("kimi-k2", (60, 384, 8))])
def test_production_shapes(name, shape):
    t = synthetic_trace(preset(name, pool=16, num_topics=8), 200, seed=1)
    assert t.experts.shape == (200, shape[0], shape[2]) and t.num_experts == shape[1]


def test_affinity_and_skew_controls():
    base = dict(num_layers=4, num_experts=32, top_k=2, num_topics=16)
    mi = []
    for stick in (0.0, 0.95):
        t = synthetic_trace(SyntheticSpec(**base, stickiness=stick, affinity=0.9), 20000, seed=2)
        mi.append(np.median(mutual_information(compute_stats(t).transitions)))
    assert mi[1] > mi[0] + 0.2
    imb = []
    for skew in (0.0, 1.2):
        t = synthetic_trace(SyntheticSpec(**base, skew=skew, affinity=0.0), 20000, seed=2)
        imb.append(layer_table(compute_stats(t))["expert_load_ratio"].mean())
    assert imb[1] > imb[0] + 1.0
    with pytest.raises(InputError, match="affinity"):
        SyntheticRouter(SyntheticSpec(**base, affinity=2.0))


def test_mutual_information_against_definition(rng):
    joint = rng.integers(0, 20, (1, 5, 5))
    p = joint[0] / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    mi = sum(p[i, j] * np.log2(p[i, j] / (pa[i] * pb[j]))
             for i in range(5) for j in range(5) if p[i, j] > 0)
    assert mutual_information(joint)[0] == pytest.approx(mi)
    indep = np.outer([1, 2, 3], [2, 2, 4])[None]
    assert mutual_information(indep)[0] == pytest.approx(0, abs=1e-12)
    conc = next_layer_concentration(np.array([[[3, 1], [0, 4]]]), 1)
    assert conc[0] == pytest.approx(7 / 8)


def test_tables(rng):
    t = synthetic_trace("flame-moe-290m", 4000, seed=3)
    s = compute_stats(t)
    tab = layer_table(s)
    assert list(tab["layer"]) == list(range(8)) and np.isnan(tab["mi_next_bits"].iloc[-1])
    top = top_transitions(s, 5)
    assert top["pairs"].is_monotonic_decreasing
    assert top["pairs"].iloc[0] == s.transitions.max()
    d = drift(t, 4)
    assert len(d) == 4 and (d["js_divergence_mean"] >= 0).all()

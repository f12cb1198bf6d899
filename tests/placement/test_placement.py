from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.errors import InfeasibleError, InputError
from moeplace.placement import Placement, contiguous, random_placement, round_robin


def assert_valid(p: Placement) -> None:
    L, P = p.phy2log.shape
    S = P // p.num_gpus
    assert S * p.num_gpus == P
    for l in range(L):
        assert set(p.phy2log[l].tolist()) == set(range(p.num_experts))
        for g in range(p.num_gpus):
            slots = p.phy2log[l, g * S:(g + 1) * S]
            assert len(set(slots.tolist())) == S  # replicas on distinct GPUs


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 4), G=st.sampled_from([1, 2, 4]), S=st.integers(1, 6),
       R=st.integers(0, 6), M=st.sampled_from([1, 2]), seed=st.integers(0, 10**6))
def test_constructors_are_valid_and_round_trip(tmp_path_factory, L, G, S, R, M, seed):
    if G % M:
        M = 1
    P = G * S
    R = min(R, P - 1) if P > 1 else 0
    N = P - R
    if R and S > N:
        return
    made = [contiguous(L, N, G, M, replicas=R), random_placement(L, N, G, M, R, seed=seed)]
    if R == 0:
        made.append(round_robin(L, N, G, M))
    d = tmp_path_factory.mktemp("p")
    for p in made:
        assert_valid(p)
        back = Placement.load(p.save(d / "p.json"))
        assert back == p
        log2phy, cnt = p.log2phy(), p.logcnt()
        for l in range(L):
            for e in range(N):
                slots = log2phy[l, e][log2phy[l, e] >= 0]
                assert len(slots) == cnt[l, e]
                assert (p.phy2log[l, slots] == e).all()


def test_contiguous_and_round_robin_layouts():
    assert contiguous(1, 8, 4).gpu_experts(0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert round_robin(1, 8, 4).gpu_experts(0) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert contiguous(1, 6, 4, replicas=2).phy2log[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def test_json_has_required_keys(tmp_path):
    d = json.loads(contiguous(2, 8, 4, 2).save(tmp_path / "p.json").read_text())
    for k in ("num_gpus", "num_nodes", "num_layers", "num_experts", "phy2log", "version"):
        assert k in d


@pytest.mark.parametrize("phy,G,msg", [
    ([[0, 1, 2, 2]], 2, "places no copy of expert 3"),
    ([[0, 1, 2]], 2, "do not split evenly"),
    ([[0, 0, 1, 2, 3, 1]], 2, "GPU 0 holds two copies of one expert"),
    ([[0, 1, 2, 5]], 2, "outside 0..3"),
])
def test_invalid_placements(phy, G, msg):
    with pytest.raises(InputError, match=msg):
        Placement(np.array(phy), G, num_experts=4)


def test_overfilled_gpu_in_json(tmp_path):
    d = contiguous(1, 8, 4).to_dict()
    d["slots_per_gpu"] = 3
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="over- or under-filled"):
        Placement.load(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        Placement.load(tmp_path / "q.json")


def test_infeasible_cluster():
    with pytest.raises(InfeasibleError):
        contiguous(1, 10, 4)
    with pytest.raises(InfeasibleError):
        contiguous(1, 8, 4, num_nodes=3)


def test_random_placement_with_many_replicas_of_few_experts():
    # regression: 3 experts + 5 replicas on 4 GPUs once drew 5 copies of one expert
    for seed in range(100):
        p = random_placement(2, 3, 4, 1, 5, seed=seed)
        assert_valid(p)
        assert p.logcnt().max() <= 4

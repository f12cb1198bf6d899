"""Conformance of the EPLB baselines with DeepSeek's published description and example
(deepseek-ai/EPLB README), hand-computed cases and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.errors import InputError
from moeplace.placement import Placement, read_placement
from moeplace.placement.exports import export_placement
from moeplace.solvers import evaluate
from moeplace.solvers.baselines import balanced_packing, eplb, eplb_distinct, replicate_experts
from moeplace.solvers.evaluator import Evaluator, evaluate_stats, gpu_loads_from_stats
from moeplace.traces import RoutingStats, Trace, TraceMeta

# The example of DeepSeek EPLB's README: 2 layers x 12 experts, 16 physical experts,
# 4 groups, 2 nodes, 8 GPUs, and the phy2log the README prints for it.
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_readme_example_layout():
    p = eplb(README_WEIGHT, num_gpus=8, num_nodes=2, replicas=4, num_groups=4)
    assert p.phy2log.tolist() == README_PHY2LOG
    assert p.info["policy"] == "hierarchical" and not p.colocated
    # log2phy / logcnt in EPLB's convention follow from phy2log
    assert p.logcnt()[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


# Loads [1, 96, 96, 65, 37, 38] on 4 GPUs in 2 nodes with 2 redundant slots (8 slots, 2 per GPU).
HAND = np.array([[1, 96, 96, 65, 37, 38]])


def test_hand_hierarchical_puts_two_copies_on_one_gpu():
    # groups {0,1,2} (193) and {3,4,5} (140), one per node. Node 0: the extra slot goes to
    # expert 1 (first of the two 96s); copies 96(e2), 48(e1), 48(e1), 1(e0) heaviest first to
    # the lightest GPU with room: GPU0 = [2, 0] (97), GPU1 = [1, 1] (96). Node 1: expert 3 is
    # copied; 38(e5), 37(e4), 32.5(e3), 32.5(e3): GPU2 = [5, 3], GPU3 = [4, 3].
    p = eplb(HAND, 4, 2, 2, num_groups=2)
    assert p.phy2log.tolist() == [[2, 0, 1, 1, 5, 3, 4, 3]] and p.colocated
    assert gpu_loads_from_stats(HAND, p)[0].tolist() == [97.0, 96.0, 70.5, 69.5]


def test_hand_global_policy_and_fallback_groups():
    # groups 1 (no expert groups; vLLM's value for such models) on 2 nodes: 1 % 2 != 0, so
    # the global policy. Extra slots to experts 1 then 2 (48 each); packing 65, 48, 48, 48,
    # 48, 38, 37, 1 gives GPU loads 66, 96, 86, 85.
    p = eplb(HAND, 4, 2, 2)
    assert p.info["policy"] == "global" and p.info["num_groups"] == 1
    assert sorted(gpu_loads_from_stats(HAND, p)[0].tolist()) == [66.0, 85.0, 86.0, 96.0]
    # groups that do not divide over nodes also run the global policy
    assert eplb(HAND, 4, 2, 2, num_groups=3).phy2log.tolist() == p.phy2log.tolist()


def test_rule_respecting_variant_chooses_counts_knowing_the_rule():
    # Inside node 0 (loads 1, 96, 96; 2 GPUs x 2 slots) a second copy of a 96 would have to
    # share a GPU with the other 96 (144); copying the light expert 0 instead gives 96.5.
    p = eplb_distinct(HAND, 4, 2, 2, num_groups=2)
    assert not p.colocated
    assert gpu_loads_from_stats(HAND, p)[0].max() == 96.5
    assert p.logcnt()[0].tolist() == [2, 1, 1, 2, 1, 1]


def test_packing_and_replication_steps():
    # balanced_packing: 4 items into 2 packs of 2, heaviest first to the lightest pack with
    # room: 5 -> p0, 4 -> p1, 3 -> p1 (4 < 5), 1 -> p0 (p1 is full)
    pack, rank = balanced_packing(np.array([5.0, 1.0, 4.0, 3.0]), 2)
    assert pack.tolist() == [0, 0, 1, 1] and rank.tolist() == [0, 1, 0, 1]
    # one item per pack: item i to pack i
    assert balanced_packing(np.array([1.0, 9.0]), 2)[0].tolist() == [0, 1]
    slots, cnt = replicate_experts(np.array([10.0, 30.0, 20.0]), 6)
    # 30 -> 15 -> 20 wins -> 10 ... : extras to 1, 2, 1
    assert slots.tolist() == [0, 1, 2, 1, 2, 1] and cnt.tolist() == [1, 3, 2]


def _naive_pack_distinct(counts, w, num_bins, cap):
    """The rule-respecting packing as its docstring states it, one copy at a time over every
    bin: copies heaviest first (stable), each to the lightest bin with room that lacks that
    expert, the lowest index on ties; None when a copy finds no such bin."""
    copies = [(w[e] / max(c, 1), e) for e in range(len(counts)) for c in [counts[e]] * counts[e]]
    order = sorted(range(len(copies)), key=lambda i: -copies[i][0])  # sorted() is stable
    bins = [[] for _ in range(num_bins)]
    load = [0.0] * num_bins
    for i in order:
        cw, e = copies[i]
        ok = [b for b in range(num_bins) if len(bins[b]) < cap and e not in bins[b]]
        if not ok:
            return None
        b = min(ok, key=lambda b: (load[b], b))
        bins[b].append(e)
        load[b] += cw
    return bins, max(load)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), bins=st.integers(1, 12), room=st.integers(-1, 2),
       ties=st.booleans())
def test_distinct_packing_is_the_greedy_it_describes(seed, bins, room, ties):
    from moeplace.solvers.baselines import _pack_distinct

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    w = rng.integers(0, 4, n).astype(float) if ties else rng.random(n) * 100
    counts = rng.integers(0, bins + 1 + (room < 0), n)
    # mostly room for every copy (or a slot per bin more); room -1 also gets stuck ones
    cap = max(0, -(-int(counts.sum()) // bins) + room)
    got = _pack_distinct(counts, w, bins, cap)
    assert got == _naive_pack_distinct(counts, w, bins, cap)


def test_bad_groups_refused():
    with pytest.raises(InputError, match="do not split into 4 groups"):
        eplb(np.ones((1, 6)), 2, 2, 2, num_groups=4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), case=st.sampled_from([
    (8, 1, 0, 1), (8, 2, 8, 1), (8, 2, 8, 4), (16, 4, 16, 8), (4, 2, 4, 2), (8, 4, 24, 8)]))
def test_invariants(seed, case):
    G, M, R, groups = case
    rng = np.random.default_rng(seed)
    N = 32
    load = rng.integers(0, 1000, size=(3, N)) * (rng.random((3, N)) < 0.8)
    for f in (eplb, eplb_distinct):
        p = f(load, G, M, R, num_groups=groups)
        assert p.phy2log.shape == (3, N + R)
        cnt = p.logcnt()
        assert (cnt >= 1).all() and (cnt.sum(1) == N + R).all()
        # total load is conserved by splitting over copies
        np.testing.assert_allclose(gpu_loads_from_stats(load, p).sum(1), load.sum(1))
        if groups % M == 0 and M > 1 and f is eplb:
            # hierarchical: each node's slots hold exactly whole groups
            gsize = N // groups
            per_node = p.phy2log.reshape(3, M, -1)
            for l in range(3):
                for n in range(M):
                    gs = set((per_node[l, n] // gsize).tolist())
                    assert len(gs) == groups // M
        if f is eplb_distinct:
            assert not p.colocated
    # The rule-respecting variant can only lose balance where a GPU would hold two copies.
    a = gpu_loads_from_stats(load, eplb(load, G, M, R, num_groups=groups)).max(1)
    if not eplb(load, G, M, R, num_groups=groups).colocated:
        b = gpu_loads_from_stats(load, eplb_distinct(load, G, M, R, num_groups=groups)).max(1)
        assert (b <= a * 1.5 + 1e-9).all()


def _stats(load: np.ndarray) -> RoutingStats:
    meta = TraceMeta(num_experts=load.shape[1], top_k=1, moe_layer_ids=(0,))
    return RoutingStats(meta=meta, load=load, num_tokens=int(load.sum()))


def test_colocated_placement_is_valid_input(tmp_path):
    p = eplb(HAND, 4, 2, 2, num_groups=2)
    # JSON round trip keeps the layout and says so
    p.save(tmp_path / "p.json")
    q = Placement.load(tmp_path / "p.json")
    assert q == p and q.colocated
    # the same layout without the flag is refused
    with pytest.raises(InputError, match="two copies of one expert"):
        Placement(p.phy2log, 4, 2, 6)
    # the statistics evaluator splits an expert's load over copies: GPU1 holds both copies
    s = evaluate_stats(_stats(HAND), p)
    assert s["load_imbalance_mean"] == pytest.approx(97 / (333 / 4))
    # per-token evaluator: one copy per token; both copies on GPU1 serve all of expert 1,
    # GPU0 holds the only copies of experts 0 and 2
    experts = np.repeat(np.arange(6), [1, 12, 12, 8, 3, 4])[:, None, None]
    tr = Trace(experts=experts.astype(np.uint8),
               meta=TraceMeta(num_experts=6, top_k=1, moe_layer_ids=(0,)))
    ev = Evaluator(p, 1, 6, window=40)
    ev.add(tr)
    assert ev.gpu_load[0, 0, :2].tolist() == [13, 12] and ev.gpu_load.sum() == 40  # [placement, L, G]
    assert evaluate(tr, p, window=40, show_progress=False).summary["tokens"] == 40
    # stack exports and readers accept it
    export_placement(p, "sglang", tmp_path / "m.json", moe_layer_ids=[0])
    back = read_placement(tmp_path / "m.json", num_gpus=4, num_nodes=2)
    assert back.phy2log.tolist() == p.phy2log.tolist() and back.colocated

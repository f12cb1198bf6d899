"""OnlinePolicy: valid maps under the stack's slot rules, and no rebalance when nothing pays."""

import numpy as np

from moeplace.placement import Placement
from moeplace.solvers.evaluator import migration
from moeplace.solvers.online import OnlinePolicy, moved_copies


def test_policy_keeps_rules_and_counts_moves_like_the_evaluator():
    rng = np.random.default_rng(0)
    L, N, G, R = 3, 16, 4, 4
    p = OnlinePolicy(G, num_slots=N + R, copy_cost_tokens=1.0)
    base = rng.gamma(0.5, 1, size=(L, N))
    cur = None
    for _ in range(6):
        d = p.step(rng.poisson(base * 200).astype(float), cur)
        pl = Placement(d.phy2log, G, 1, N)  # raises on colocated copies or a missing expert
        if cur is not None:
            old = Placement(cur, G, 1, N)
            assert d.moved_copies == migration(pl, old)["copies_transferred"]
            assert d.moved_copies == int(moved_copies(cur, d.phy2log, G).sum())
            if not d.rebalance:
                assert (d.phy2log == cur).all()
        cur = d.phy2log


def test_no_rebalance_when_copies_cost_more_than_any_gain():
    rng = np.random.default_rng(1)
    L, N, G = 2, 8, 4
    p = OnlinePolicy(G, num_slots=N, copy_cost_tokens=1e12, guard=False)
    cur = np.tile(np.arange(N), (L, 1))
    d = p.step(rng.poisson(50, size=(L, N)).astype(float), cur)
    assert not d.rebalance and d.moved_copies == 0 and (d.phy2log == cur).all()


def _preserve_naive(new, old, G):
    """Slot preservation by hand: each old slot keeps its expert when the new block still holds
    it (first unused occurrence), the new block's other entries fill the free slots in order."""
    L, P = new.shape
    S = P // G
    out = new.copy()
    for l in range(L):
        for g in range(G):
            a, b = list(old[l, g * S:(g + 1) * S]), list(new[l, g * S:(g + 1) * S])
            row = [None] * S
            for s in range(S):
                if a[s] in b:
                    b.remove(a[s])
                    row[s] = a[s]
            it = iter(b)
            out[l, g * S:(g + 1) * S] = [x if x is not None else next(it) for x in row]
    return out


def test_preserve_slots_equals_a_naive_reorder_and_keeps_each_gpus_multiset():
    from moeplace.solvers.online import preserve_slots

    rng = np.random.default_rng(3)
    for G, S, N in [(4, 3, 6), (8, 5, 12), (2, 6, 4), (16, 1, 16)]:
        old = rng.integers(0, N, size=(5, G * S))
        new = rng.integers(0, N, size=(5, G * S))
        got = preserve_slots(new, old, G)
        assert (got == _preserve_naive(new, old, G)).all()
        assert (np.sort(got.reshape(5, G, S), axis=2) == np.sort(new.reshape(5, G, S), axis=2)).all()


def test_relabelled_fit_keeps_gpu_loads_and_never_moves_more_copies():
    from moeplace.solvers.online import _gpu_loads, eplb_fast, relabel_gpus

    rng = np.random.default_rng(4)
    for G, M, R in [(8, 1, 0), (8, 1, 8), (16, 2, 16)]:
        L, N = 6, 64
        load = rng.poisson(rng.gamma(0.7, 1, size=(L, N)) * 50).astype(float)
        old = eplb_fast(rng.poisson(rng.gamma(0.7, 1, size=(L, N)) * 50), G, M, N + R)
        fit = eplb_fast(load, G, M, N + R)
        lab = relabel_gpus(fit, old, G, G // M if M > 1 else None)
        # the same GPU loads up to the GPUs' numbering, fewer or as many copies moved
        assert np.allclose(np.sort(_gpu_loads(lab, load, G), axis=1),
                           np.sort(_gpu_loads(fit, load, G), axis=1))
        assert (moved_copies(old, lab, G).sum(axis=1) <= moved_copies(old, fit, G).sum(axis=1)).all()


def test_relabelling_keeps_as_many_pairs_as_the_best_gpu_permutation():
    import itertools

    from moeplace.solvers.online import relabel_gpus

    rng = np.random.default_rng(5)
    G, S, N = 5, 3, 10
    for _ in range(6):
        old = rng.integers(0, N, size=(1, G * S))
        new = rng.integers(0, N, size=(1, G * S))
        pairs_old = {(g, e) for g in range(G) for e in old[0].reshape(G, S)[g]}
        best = max(len({(g, e) for g in range(G) for e in new[0].reshape(G, S)[p[g]]} & pairs_old)
                   for p in itertools.permutations(range(G)))
        lab = relabel_gpus(new, old, G)
        assert len({(g, e) for g in range(G) for e in lab[0].reshape(G, S)[g]} & pairs_old) == best

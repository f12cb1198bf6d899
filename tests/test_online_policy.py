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

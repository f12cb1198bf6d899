"""OnlinePolicy's moves against brute force on tiny instances: no map that moves as many
copies from the current one does better on the load the policy fitted; and its vectorised
guard is exactly ``baselines.eplb``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplace.solvers.baselines import eplb
from moeplace.solvers.online import OnlinePolicy, _gpu_loads, eplb_fast, moved_copies


def _all_maps(N: int, P: int, G: int):
    """Every phy2log row over P slots in which each of N experts has a copy and no GPU holds
    two copies of one expert."""
    S = P // G
    for row in itertools.product(range(N), repeat=P):
        if len(set(row)) < N:
            continue
        if any(len(set(row[g * S:(g + 1) * S])) < S for g in range(G)):
            continue
        yield np.array(row)


@pytest.mark.parametrize("G,N,R", [(3, 6, 0), (2, 4, 2), (3, 5, 1)])
def test_no_move_set_of_the_same_size_does_better_on_the_fitted_load(G, N, R):
    P = N + R
    maps = np.stack(list(_all_maps(N, P, G)))
    checked = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        load = rng.integers(1, 60, size=(1, N)).astype(float)
        cur = maps[rng.integers(len(maps))][None, :]
        # one move at most: the greedy's first step is the best single move it can make
        pol = OnlinePolicy(G, num_slots=P, guard=False, z=0.0, copy_cost_tokens=1e-6,
                           max_moves_per_layer=1)
        d = pol.step(load, cur)
        w, _ = pol.estimate()
        k = int(d.moved_copies)
        if k == 0:
            continue
        mine = _gpu_loads(d.phy2log, w, G).max()
        moved = moved_copies(np.repeat(cur, len(maps), 0), maps, G).sum(axis=1)
        same = maps[moved == k]
        best = _gpu_loads(same, np.repeat(w, len(same), 0), G).max(axis=1).min()
        assert mine <= best * (1 + 1e-9), (seed, mine, best, k)
        assert _gpu_loads(cur, w, G).max() > mine  # the move it made helps
        checked += 1
    assert checked >= 3


def test_eplb_fast_is_baselines_eplb():
    rng = np.random.default_rng(0)
    for L, N, G, M, R, g in [(3, 64, 8, 1, 0, 1), (3, 64, 16, 2, 16, 1), (3, 64, 16, 2, 16, 8),
                             (4, 16, 4, 2, 4, 4), (2, 256, 64, 8, 64, 8), (3, 60, 4, 1, 4, 1)]:
        load = rng.poisson(rng.gamma(0.7, 1, size=(L, N)) * 30)
        assert (eplb_fast(load, G, M, N + R, g) == eplb(load, G, M, R, num_groups=g).phy2log).all()

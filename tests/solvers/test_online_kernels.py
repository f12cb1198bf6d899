"""The online policy's compiled move search equals its numpy search step for step (same maps,
copies and max loads after every move) on random layers: with and without replicas, colocated
copies, nodes, a guard target, move and step budgets."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.solvers import _online_kernels as kern
from moeplace.solvers import online

pytest.importorskip("numba")


def _instances(n: int):
    rng = np.random.default_rng(7)
    made = 0
    while made < n:
        G = int(rng.integers(2, 17))
        S = int(rng.integers(1, 6))
        P = G * S
        N = int(rng.integers(max(2, S, (P + 1) // 2), P + 1))
        colocate = bool(rng.integers(2))
        row = None
        for _ in range(50):
            r = np.concatenate([np.arange(N), rng.integers(0, N, P - N)])
            rng.shuffle(r)
            if colocate or all(len(set(r[g * S:(g + 1) * S])) == S for g in range(G)):
                row = r
                break
        if row is None:
            continue
        w = np.round(rng.gamma(0.6, 1, N) * 100) + rng.integers(0, 2, N)
        nodes = [d for d in range(1, G) if G % d == 0]
        node = int(rng.choice([0, *nodes]))
        target = None if rng.random() < 0.5 else float(w.sum() / G * (1 + rng.random() * 0.2))
        made += 1
        yield (row.astype(np.int64), w.astype(np.float64), G, S, node, colocate,
               int(rng.integers(1, 3 * P)), float(rng.random() * 5), target, int(rng.integers(1, 20)))


def test_compiled_search_equals_numpy_search():
    f = kern.compiled_search()
    moved = 0
    for row, w, G, S, node, colocate, max_moves, min_gain, target, max_steps in _instances(250):
        a_rows, a_copies, a_max = online._search_layer_numpy(row, w, G, S, node or None, colocate,
                                                             max_moves, min_gain, target, max_steps)
        b_rows, b_copies, b_max = f(row, w, G, S, node, colocate, max_moves, min_gain,
                                    target or 0.0, target is not None, min(max_moves, max_steps),
                                    online._PROBE_STEPS, online._SPARES)
        assert len(a_rows) == len(b_rows)
        assert all((x == y).all() for x, y in zip(a_rows, b_rows, strict=True))
        assert (a_copies == b_copies).all()
        assert np.allclose(a_max, b_max, rtol=1e-12)
        moved += len(a_rows) > 1
    assert moved > 100  # the instances exercise the moves, not only the stops


def test_policy_takes_the_same_decisions_with_either_search(monkeypatch):
    rng = np.random.default_rng(2)
    L, N, G, R = 4, 64, 8, 8
    loads = [rng.poisson(rng.gamma(0.6, 1, size=(L, N)) * 80).astype(float) for _ in range(4)]

    def run() -> list[np.ndarray]:
        pol = online.OnlinePolicy(G, num_slots=N + R)
        cur = np.tile(np.arange(N + R) % N, (L, 1))
        out = []
        for ld in loads:
            cur = pol.step(ld, cur).phy2log
            out.append(cur)
        return out

    monkeypatch.setattr(kern, "NUMBA_MIN_WORK", 0)  # this small shape searched compiled too
    compiled = run()
    monkeypatch.setattr(kern, "HAVE_NUMBA", False)
    assert all((a == b).all() for a, b in zip(compiled, run(), strict=True))

"""OnlinePolicy against brute force on tiny instances: among all maps reachable from the current
one by moving at most as many expert copies as the policy moved, none has a lower max GPU load
on the load the policy fitted (after a single observed interval the policy's estimate is that
interval itself, so the fitted load is known exactly without reading the policy's state).

Every map of ``P`` slots over ``N`` experts is enumerated (``N ** P`` rows), kept when it is a
valid map under the same slot rules (every expert at least once; copies of one expert on
distinct GPUs unless colocation is allowed), and scored with an independent recount: an
expert's load split evenly over its copies, summed per GPU (slot p on GPU p // (P / G))."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplace.solvers.online import OnlinePolicy


def _all_rows(N: int, P: int) -> np.ndarray:
    return np.array(list(itertools.product(range(N), repeat=P)), dtype=np.int64)


def _valid(rows: np.ndarray, N: int, G: int, colocate: bool) -> np.ndarray:
    P = rows.shape[1]
    S = P // G
    ok = np.ones(len(rows), bool)
    for e in range(N):
        ok &= (rows == e).any(axis=1)
    if not colocate:
        per = rows.reshape(len(rows), G, S)
        for i in range(S):
            for j in range(i + 1, S):
                ok &= (per[:, :, i] != per[:, :, j]).all(axis=1)
    return ok


def _max_load(rows: np.ndarray, w: np.ndarray, G: int) -> np.ndarray:
    """Recount of the max GPU load of each row under load ``w``: every slot carries its expert's
    load over that expert's number of copies in the row."""
    n, P = rows.shape
    cnt = np.stack([(rows == e).sum(axis=1) for e in range(len(w))], axis=1)  # [n, N]
    slot = w[rows] / np.take_along_axis(cnt, rows, axis=1)
    return slot.reshape(n, G, P // G).sum(axis=2).max(axis=1)


def _moved(old: np.ndarray, rows: np.ndarray, G: int) -> np.ndarray:
    """Copies moved from ``old`` to each row: (GPU, expert) pairs held now and not before."""
    n, P = rows.shape
    S = P // G
    N = int(max(old.max(), rows.max())) + 1
    new = rows.reshape(n, G, S)
    held = np.stack([(new == e).any(axis=2) for e in range(N)], axis=2)        # [n, G, N]
    before = np.stack([(old.reshape(G, S) == e).any(axis=1) for e in range(N)], axis=1)
    return (held & ~before[None]).sum(axis=(1, 2))


# Counterexamples found by this test, only on instances with spare replicas (P > N): the policy's
# search is greedy, one move at a time, so a set of two moves that is better only together is
# out of its reach. Brute force finds better move sets of the same size, e.g. with colocated
# copies, load [27, 47, 30, 28], current [2, 2, 2 | 0, 3, 1]: the policy moves two copies to
# [1, 0, 2 | 0, 3, 1] (max 67.0); two other copies reach 66.33 (-1 %); and load [105, 14, 178],
# current [0, 2, 1 | 0, 1, 0] on 3 GPUs: 111.83 against 109.67 (-2 %). A known limit of the
# greedy search (exact move sets are a knapsack per layer); strict xfail, so the day the search
# finds these the marks must go.
_GREEDY_MISSES = pytest.mark.xfail(
    strict=True, reason="greedy one-move search misses same-size move sets (see comment)")
CASES = [  # (N experts, G GPUs, P slots, colocate)
    (4, 2, 4, False),
    (6, 2, 6, False),
    (6, 3, 6, False),
    (4, 2, 6, False),
    (5, 3, 6, False),
    pytest.param(4, 2, 6, True, marks=_GREEDY_MISSES),
    pytest.param(3, 3, 6, False, marks=_GREEDY_MISSES),
]


@pytest.mark.parametrize(("N", "G", "P", "colocate"), CASES)
def test_no_move_set_of_the_same_size_does_better(N, G, P, colocate):
    rows = _all_rows(N, P)
    rows = rows[_valid(rows, N, G, colocate)]
    rng = np.random.default_rng(N * 100 + G * 10 + P + colocate)
    checked = moved_any = 0
    for trial in range(12):
        # skewed loads, so that moving pays; copies cost nothing and the gain test accepts any
        # gain, so the policy goes as far as its own search takes it
        w = np.round(rng.gamma(0.6, 1.0, size=N) * 100 + 1).astype(np.float64)
        cur = rows[rng.integers(len(rows))]
        pol = OnlinePolicy(G, num_slots=P, copy_cost_tokens=0.0, z=0.0, guard=trial % 2 == 0,
                           allow_colocated_copies=colocate)
        d = pol.step(w[None, :], cur[None, :])
        new = np.asarray(d.phy2log[0])
        assert _valid(new[None], N, G, colocate)[0], new
        k = int(_moved(cur, new[None], G)[0])
        assert k == d.moved_copies
        got = float(_max_load(new[None], w, G)[0])
        same = rows[_moved(cur, rows, G) <= k]
        best = float(_max_load(same, w, G).min())
        assert got <= best * (1 + 1e-9), (
            f"counterexample: load {w.tolist()}, current {cur.tolist()}, policy -> {new.tolist()} "
            f"(max {got}, {k} copies moved); brute force with <= {k} copies reaches {best}")
        checked += 1
        moved_any += k > 0
    assert checked == 12 and moved_any > 0  # the instances do exercise moves

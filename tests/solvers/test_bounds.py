"""Every lower bound against enumeration of all placements on tiny instances (with and without
replicas and nodes), term by term and for the weighted total; the static-traffic bound against
per-token distinct GPU and node counts."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers import Weights, lower_bound, score
from moeplace.solvers.bounds import (
    _bipartite,
    colocated_flow,
    colocated_greedy,
    decomposed_colocated,
    distinct_floor,
    load_bound,
    spectral_colocated,
    static_bound,
)
from moeplace.traces import compute_stats
from moeplace.traces.trace import Trace, TraceMeta


def skewed_trace(rng: np.random.Generator, T: int, L: int, N: int, k: int) -> Trace:
    """Tokens with skewed expert popularity and experts that follow the previous layer's, so
    the optimum really trades balance against co-location."""
    pop = rng.dirichlet(np.full(N, 0.5))
    e = np.empty((T, L, k), np.int64)
    for t in range(T):
        for layer in range(L):
            if layer and rng.random() < 0.6:
                p = np.full(N, 0.02)
                p[(e[t, layer - 1] + rng.integers(0, 2)) % N] += 1.0
                p = p * (pop + 0.05)
            else:
                p = pop + 0.01
            e[t, layer] = rng.choice(N, size=k, replace=False, p=p / p.sum())
    meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(range(L)), model="random")
    return Trace(e, meta)


def states(N: int, G: int, R: int) -> np.ndarray:
    """Every distinct layout of one layer: ``[K, N, G]`` copies of expert e on GPU g (GPU-major
    slots, each expert at least once, copies may share a GPU)."""
    S = (N + R) // G
    seen = set()
    for seq in itertools.product(range(N), repeat=S * G):
        if len(set(seq)) < N:
            continue
        cnt = np.zeros((N, G), np.int64)
        for slot, e in enumerate(seq):
            cnt[e, slot // S] += 1
        seen.add(cnt.tobytes())
    return np.array([np.frombuffer(b, np.int64).reshape(N, G) for b in sorted(seen)])


def terms(stats, cnt: np.ndarray, M: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Written from the objective's prose: per layer and state the imbalance and the
    co-activation pairs apart; per layer pair and state pair the pairs apart (GPU, node)."""
    _L, N = stats.load.shape
    K, _, G = cnt.shape
    n = G // M
    share = cnt / cnt.sum(axis=2, keepdims=True)  # an expert's load split evenly over copies
    gl = np.einsum("ln,kng->lkg", stats.load.astype(float), share)
    mean = gl.mean(axis=2)
    imb = np.where(mean > 0, gl.max(axis=2) / np.where(mean > 0, mean, 1), 1.0)  # [L, K]
    on = (cnt > 0).astype(float)
    on_node = (on.reshape(K, N, M, n).sum(axis=3) > 0).astype(float)
    together = np.einsum("kag,kbg->kab", on, on) > 0
    off = stats.coactivation.astype(float).copy()
    off[:, np.arange(N), np.arange(N)] = 0
    apart = np.einsum("lab,kab->lk", off, ~together)
    tr = stats.transitions.astype(float)
    same_g = np.einsum("iag,jbg->ijab", on, on) > 0
    same_n = np.einsum("iag,jbg->ijab", on_node, on_node) > 0
    cross_g = np.einsum("lab,ijab->lij", tr, ~same_g)
    cross_n = np.einsum("lab,ijab->lij", tr, ~same_n)
    return imb, apart, cross_g, cross_n


def brute_force(stats, G: int, M: int, R: int, w: Weights) -> dict[str, float]:
    """Minimum of each term and of the weighted total over every placement."""
    cnt = states(stats.num_experts, G, R)
    imb, apart, cross_g, cross_n = terms(stats, cnt, M)
    L = stats.num_layers
    tot = float(stats.transitions.sum())
    off = float(stats.coactivation.sum() - np.einsum("lnn->", stats.coactivation))
    co = apart / off if off else np.zeros_like(apart)
    cg, cn = cross_g / tot, cross_n / tot

    def chain(node: np.ndarray, edge: np.ndarray) -> float:
        best = node[0]
        for layer in range(L - 1):
            best = (best[:, None] + edge[layer]).min(axis=0) + node[layer + 1]
        return float(best.min())

    zero = np.zeros_like(imb)
    return {
        "load_imbalance_mean": float(imb.min(axis=1).mean()),
        "coactivation_spread": float(co.min(axis=1).sum()),
        "cross_gpu_pair_fraction": chain(zero, cg),
        "cross_node_pair_fraction": chain(zero, cn),
        "total": chain(w.load * imb / L + w.coact * co, w.traffic * cg + w.node * cn),
    }


def test_brute_force_terms_match_the_objective():
    """The enumeration scores placements exactly as objective.score does."""
    rng = np.random.default_rng(3)
    s = compute_stats(skewed_trace(rng, 60, 2, 4, 2))
    cnt = states(4, 2, 2)
    imb, apart, cross_g, _ = terms(s, cnt, 1)
    tot = float(s.transitions.sum())
    off = float(s.coactivation.sum() - np.einsum("lnn->", s.coactivation))
    for i, j in [(0, 1), (5, 9), (len(cnt) - 1, 2)]:
        rows = []
        for c in (cnt[i], cnt[j]):
            rows.append([e for g in range(2) for e in range(4) for _ in range(c[e, g])])
        plc = Placement(np.array(rows), 2, 1, num_experts=4, colocated=True)
        v = score(s, plc, Weights(coact=1.0))
        assert v.load_imbalance_mean == pytest.approx((imb[0, i] + imb[1, j]) / 2)
        assert v.cross_gpu_pair_fraction == pytest.approx(cross_g[0, i, j] / tot)
        assert v.coactivation_spread == pytest.approx((apart[0, i] + apart[1, j]) / off)


CASES = [  # (N, G, M, R)
    (4, 2, 1, 0), (6, 3, 1, 0), (6, 2, 2, 0), (4, 4, 2, 0), (6, 6, 3, 0),
    (3, 2, 1, 1), (4, 2, 1, 2), (3, 3, 1, 3), (4, 2, 2, 2), (3, 2, 2, 1),
]


@pytest.mark.parametrize("N,G,M,R", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_below_brute_force(N, G, M, R, seed):
    rng = np.random.default_rng(seed)
    L = 3 if R == 0 else 2
    s = compute_stats(skewed_trace(rng, 80, L, N, 2))
    w = Weights(load=1.0, traffic=1.5, node=0.7, coact=0.5)
    best = brute_force(s, G, M, R, w)
    lb = lower_bound(s, G, M, R, w).as_dict()
    for key, val in best.items():
        assert lb[key] <= val + 1e-9, (key, lb[key], val)
    # the flows are no weaker than the fast fallback used when time runs out
    fast = lower_bound(s, G, M, R, w, time_limit=0.0).as_dict()
    for key in best:
        assert fast[key] <= lb[key] + 1e-9


@pytest.mark.parametrize("N,G", [(4, 4), (6, 6)])
def test_one_slot_per_gpu_traffic_bound_is_exact(N, G):
    """With S = 1 each layer pair is an assignment problem and pairs are independent, so the
    flow bound equals the optimum."""
    s = compute_stats(skewed_trace(np.random.default_rng(5), 80, 3, N, 2))
    best = brute_force(s, G, 1, 0, Weights())
    lb = lower_bound(s, G).as_dict()
    assert lb["cross_gpu_pair_fraction"] == pytest.approx(best["cross_gpu_pair_fraction"])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), N=st.integers(2, 7), extra=st.integers(0, 4),
       copies=st.integers(1, 3), degree=st.integers(1, 3))
def test_flow_against_enumerated_degree_limited_sets(seed, N, extra, copies, degree):
    """The flow is the most weight a b-matching with those degree limits and copy budgets
    carries (enumerated over copy counts; for each the rows' and columns' limits are a
    transportation problem whose integral optimum we enumerate on small cases)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 20, (N, N)).astype(float)
    val = colocated_flow(t, degree, extra, copies)
    greedy = colocated_greedy(t, degree, extra, copies)
    assert val <= t.sum() + 1e-9
    if N <= 3:
        best = 0.0
        for mask in itertools.product([0, 1], repeat=N * N):
            x = np.array(mask).reshape(N, N)
            need = lambda d: np.maximum(1, np.ceil(d / degree))  # noqa: E731
            ra, cb = need(x.sum(axis=1)), need(x.sum(axis=0))
            if (ra.max() <= copies and cb.max() <= copies and ra.sum() <= N + extra
                    and cb.sum() <= N + extra):
                best = max(best, float((t * x).sum()))
        # the LP may be fractional in the copy counts, so it is at least the integral optimum
        assert val >= best - 1e-9
        assert greedy >= best - 1e-9


def test_load_bound_scheduling_cases():
    # 4 GPUs, 2 slots: among the 5 heaviest two share a GPU: 10 + 10 beats the mean (11)
    w = np.array([[10, 10, 10, 10, 10, 1, 1, 2]])
    assert load_bound(w, 4, 2, 0)[0] * w.sum() / 4 == pytest.approx(20.0)
    # whole counts: the max is at least the mean rounded up
    w = np.array([[3, 3, 3, 2]])
    assert load_bound(w, 2, 2, 0)[0] * 5.5 == pytest.approx(6.0)
    # one huge expert with 1 replica on 2 GPUs: it splits in two, each half next to one more
    w = np.array([[100, 1, 1]])
    assert load_bound(w, 2, 2, 1)[0] * 51 >= 50.5 - 1e-9


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), G=st.sampled_from([2, 3]), R=st.integers(0, 3))
def test_load_bound_property(seed, G, R):
    rng = np.random.default_rng(seed)
    N = rng.integers(max(2, G - R), 6)
    if (N + R) % G or (N + R) // G > N or G > N + R:
        return
    w = rng.integers(0, 30, (1, int(N))) * rng.integers(1, 4)
    cnt = states(int(N), G, R)
    share = cnt / cnt.sum(axis=2, keepdims=True)
    gl = np.einsum("n,kng->kg", w[0].astype(float), share)
    mean = gl.mean(axis=1)
    best = float(np.where(mean > 0, gl.max(axis=1) / np.where(mean > 0, mean, 1), 1.0).min())
    assert load_bound(w, G, (int(N) + R) // G, R)[0] <= best + 1e-9


def test_distinct_floor_is_below_every_grouping():
    for k in range(1, 8):
        for sizes in _compositions(k):
            pairs = sum(math.comb(m, 2) for m in sizes)
            assert distinct_floor(k, pairs) <= len(sizes) + 1e-9


def _compositions(k: int):
    if k == 0:
        yield ()
        return
    for first in range(1, k + 1):
        for rest in _compositions(k - first):
            yield (first, *rest)


@pytest.mark.parametrize("N,G,M,k", [(4, 2, 1, 2), (6, 3, 1, 3), (6, 6, 2, 3), (6, 2, 2, 3),
                                     (4, 4, 2, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_static_bound_below_every_placement(N, G, M, k, seed):
    tr = skewed_trace(np.random.default_rng(seed), 50, 2, N, k)
    s = compute_stats(tr)
    S = N // G
    gpu_b, node_b = static_bound(s.coactivation, s.num_tokens, k, G, M, S)
    # layers are independent here, so the best placement takes each layer's best layout
    best_g = np.full(2, np.inf)
    best_n = np.full(2, np.inf)
    n = G // M
    for perm in itertools.permutations(range(N)):
        gpu = np.empty(N, int)
        gpu[list(perm)] = np.arange(N) // S
        g = gpu[tr.experts]  # [T, 2, k]
        dg = np.array([[len(set(row)) for row in tok] for tok in g]).mean(axis=0)
        dn = np.array([[len(set(row // n)) for row in tok] for tok in g]).mean(axis=0)
        best_g, best_n = np.minimum(best_g, dg), np.minimum(best_n, dn)
    best_g, best_n = float(best_g.mean()), float(best_n.mean())
    assert gpu_b <= (1 - 1 / G) * best_g + 1e-9
    if M > 1:
        assert node_b <= (1 - 1 / M) * best_n + 1e-9


def test_static_bound_rejects_replicas_and_bad_shapes():
    c = np.zeros((1, 4, 4))
    with pytest.raises(InputError):
        static_bound(c, 10, 2, 2, 1, 2, replicas=2)
    with pytest.raises(InputError):
        static_bound(c, 10, 2, 3, 1, 2)


def _best_split(w: np.ndarray, parts: int, blocks: int) -> float:
    """Enumerated ``max sum_p z_p' w z_p`` over splits with equal shares of every block."""
    n = w.shape[0]
    nb = n // blocks
    per = nb // parts
    labels = []
    for perm in set(itertools.permutations(np.repeat(np.arange(parts), per))):
        labels.append(np.array(perm))
    best = -math.inf
    for combo in itertools.product(labels, repeat=blocks):
        lab = np.concatenate(combo)
        val = sum(float(w[np.ix_(lab == p, lab == p)].sum()) for p in range(parts))
        best = max(best, val)
    return best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), case=st.sampled_from([(4, 2, 2), (6, 2, 2), (6, 3, 2),
                                                         (4, 2, 1), (6, 3, 1), (6, 2, 1),
                                                         (8, 4, 1), (8, 2, 1)]))
def test_spectral_bound_above_every_split(seed, case):
    """The eigenvalue bound is above the best split (bipartite layer pairs and within-layer
    graphs), for any number of descent steps."""
    N, parts, blocks = case
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 30, (N, N)).astype(float) * (rng.random((N, N)) < 0.7)
    if blocks == 2:
        w = _bipartite(t)
    else:
        w = np.triu(t, 1) + np.triu(t, 1).T
    best = _best_split(w, parts, blocks)
    for iters in (1, 5, 40):
        val, _d = spectral_colocated(w, parts, blocks, None, iters)
        assert val >= best - 1e-6 * max(1.0, abs(best))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), case=st.sampled_from([(4, 2), (6, 2), (6, 3), (8, 2)]))
def test_decomposition_above_every_split(seed, case):
    """Flow of t - X plus eigenvalue bound of X stays above the best aligned split of a layer
    pair, from any starting split X (random here) and after any number of steps."""
    N, parts = case
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 30, (N, N)).astype(float) * (rng.random((N, N)) < 0.7)
    best = _best_split(_bipartite(t), parts, 2)
    X0 = t * rng.random((N, N)) * rng.integers(0, 2)
    state = (X0, rng.normal(0, 3, 2 * N) * rng.integers(0, 2), 0)
    for iters in (1, 10):
        val, state = decomposed_colocated(t, parts, N // parts, None, iters, state)
        assert val >= best - 1e-6 * max(1.0, abs(best))


# ---- kernel-aware bounds (issue 18): copies per token and priced time ----------------------------
@functools.cache
def layouts(N: int, G: int, R: int) -> np.ndarray:
    """``states``, enumerated once per shape."""
    return states(N, G, R)


def kernel_counts(ranks: list[int], h: int, n: int, one_node: bool, kernel: str) -> tuple[int, int]:
    """(NVLink, RDMA) copies one token at home h sends when its selections are served on
    ``ranks``, by the rules as DeepEP states them, written as plain loops."""
    if kernel == "deepep-ll":  # one put per selection off the home rank
        return (sum(1 for g in ranks if g != h and g // n == h // n),
                sum(1 for g in ranks if g // n != h // n))
    if kernel == "alltoall" or one_node:  # one copy per distinct remote rank
        dst = set(ranks) - {h}
        nv = sum(1 for g in dst if g // n == h // n)
        return nv, len(dst) - nv
    # normal / v2: RDMA per remote node, then NVLink from the node's entry rank (h's local
    # index) to each other destination rank there
    remote_nodes = {g // n for g in ranks} - {h // n}
    return sum(1 for g in set(ranks) if g % n != h % n), len(remote_nodes)


def cheapest(cnt: np.ndarray, experts, h: int, n: int, one_node: bool, kernel: str
             ) -> tuple[int, int, int]:
    """Least NVLink, least RDMA and least total copies over every choice of copies (each
    minimised on its own), for one token under one layout ``cnt [N, G]``."""
    options = [np.nonzero(cnt[e])[0].tolist() for e in experts]
    best = [math.inf] * 3
    for ranks in itertools.product(*options):
        nv, net = kernel_counts(list(ranks), h, n, one_node, kernel)
        best = [min(best[0], nv), min(best[1], net), min(best[2], nv + net)]
    return best[0], best[1], best[2]


def least_copies(sets: np.ndarray, cnt: np.ndarray, G: int, M: int, kernel: str) -> np.ndarray:
    """``[K, 3]`` per layout: expected (over a uniform home) cheapest NVLink, RDMA and total
    copies per token, mean over the tokens ``sets [T, k]``."""
    n = G // M
    out = np.zeros((len(cnt), 3))
    for i, c in enumerate(cnt):
        tot = np.zeros(3)
        for experts in sets.tolist():
            for h in range(G):
                tot += cheapest(c, experts, h, n, M == 1, kernel)
        out[i] = tot / (len(sets) * G)
    return out


def tiny_tokens(rng: np.random.Generator, T: int, L: int, N: int, k: int) -> np.ndarray:
    """``[T, L, k]`` distinct experts per token, skewed so that placements differ."""
    pop = rng.dirichlet(np.full(N, 0.6))
    return np.array([[rng.choice(N, k, replace=False, p=pop) for _ in range(L)]
                     for _ in range(T)], np.int64)


def check_copy_bounds(sets: np.ndarray, N: int, G: int, M: int, R: int) -> None:
    """Every kernel's bounds are below the least copies of every layout (per layer), equal to
    them for deepep-ll, and the placement's own expected copies lie above them."""
    from moeplace.solvers.bounds import distinct_bound
    from moeplace.solvers.dispatch import KERNELS
    from moeplace.solvers.kernel_bounds import copy_bound, placement_copies
    from moeplace.traces._kernels import count_into

    T, L, k = sets.shape
    S = (N + R) // G
    cnt = layouts(N, G, R)
    distinct = None
    if R == 0:
        co = np.zeros((L, N, N), np.int64)
        count_into(sets, np.zeros((L, N), np.int64), None, co)
        distinct = distinct_bound(co, T, k, G, M, S)
    for kernel in KERNELS:
        b = copy_bound(sets, N, kernel, G, M, R, distinct)
        for layer in range(L):
            least = least_copies(sets[:, layer], cnt, G, M, kernel).min(axis=0)
            got = (b.nvlink[layer], b.rdma[layer], b.copies[layer])
            for name, lb, val in zip(("nvlink", "rdma", "copies"), got, least, strict=True):
                assert lb <= val + 1e-9, (kernel, layer, name, lb, val)
            if kernel == "deepep-ll":  # the bound is the least value, replicas or not
                assert got[1] == pytest.approx(least[1]) and got[2] == pytest.approx(least[2])
                if R == 0:
                    assert got[0] == pytest.approx(least[0]) and b.exact
        # a placement's own expected copies (the evaluator's copy rule) are above the bound
        for c in cnt[:: max(1, len(cnt) // 5)]:
            rows = [[e for g in range(G) for e in range(N) for _ in range(c[e, g])]] * L
            plc = Placement(np.array(rows), G, M, num_experts=N, colocated=True)
            nv, net = placement_copies(sets, plc, kernel)
            assert np.all(b.nvlink <= nv + 1e-9) and np.all(b.rdma <= net + 1e-9)
            assert np.all(b.copies <= nv + net + 1e-9)


KERNEL_CASES = [  # (N, G, M, R, k)
    (4, 2, 1, 0, 2), (4, 4, 2, 0, 2), (6, 2, 2, 0, 3), (6, 3, 3, 0, 2), (4, 2, 2, 0, 2),
    (3, 2, 1, 1, 2), (4, 2, 2, 2, 2), (3, 3, 1, 3, 2), (3, 2, 2, 1, 2), (4, 4, 2, 0, 3),
]


@pytest.mark.parametrize("N,G,M,R,k", KERNEL_CASES)
def test_kernel_copy_bounds_below_every_placement(N, G, M, R, k):
    check_copy_bounds(tiny_tokens(np.random.default_rng(N * 7 + G + R), 8, 2, N, k), N, G, M, R)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), case=st.sampled_from(
    [(N, G, M, R) for N in range(2, 6) for G in (1, 2, 3, 4) for M in (1, 2) for R in range(4)
     if G % M == 0 and (N + R) % G == 0 and G <= N + R and (N + R) // G <= N and N + R <= 6]),
    k=st.integers(1, 3), T=st.integers(1, 6))
def test_kernel_copy_bounds_property(seed, case, k, T):
    N, G, M, R = case
    check_copy_bounds(tiny_tokens(np.random.default_rng(seed), T, 1, N, min(k, N)), N, G, M, R)


def test_deepep_ll_bound_is_the_value():
    """Without replicas every placement pays k (n-1)/G NVLink and k (1-1/M) RDMA copies under
    deepep-ll, and the bound says exactly that."""
    from moeplace.solvers.kernel_bounds import copy_bound

    sets = tiny_tokens(np.random.default_rng(1), 50, 3, 16, 4)
    b = copy_bound(sets, 16, "deepep-ll", 8, 2)
    assert b.exact
    assert np.allclose(b.nvlink, 4 * 3 / 8) and np.allclose(b.rdma, 4 * 0.5)
    assert np.allclose(b.copies, 4 * 7 / 8)
    # a replica of the most used expert on every other rank saves its share of copies
    r = copy_bound(sets, 16, "deepep-ll", 8, 2, replicas=8)
    assert not r.exact and np.all(r.copies < b.copies) and np.all(r.nvlink == 0)


def test_kernel_bounds_map_the_static_terms():
    """Without replicas: RDMA copies under deepep-normal are traffic_static_remote_nodes' bound,
    NVLink copies traffic_static's scaled by (1 - 1/n) / (1 - 1/G), and alltoall's copies are
    traffic_static's bound."""
    from moeplace.solvers.bounds import distinct_bound
    from moeplace.solvers.kernel_bounds import copy_bound
    from moeplace.traces._kernels import count_into

    rng = np.random.default_rng(4)
    sets = tiny_tokens(rng, 300, 2, 16, 4)
    co = np.zeros((2, 16, 16), np.int64)
    count_into(sets, np.zeros((2, 16), np.int64), None, co)
    G, M, S = 8, 2, 2
    rg, rn = static_bound(co, 300, 4, G, M, S)
    dist = distinct_bound(co, 300, 4, G, M, S)
    normal = copy_bound(sets, 16, "deepep-normal", G, M, 0, dist)
    a2a = copy_bound(sets, 16, "alltoall", G, M, 0, dist)
    assert normal.rdma.mean() >= rn - 1e-12
    assert normal.nvlink.mean() >= rg * (1 - 1 / 4) / (1 - 1 / G) - 1e-12
    assert a2a.copies.mean() >= rg - 1e-12


def test_copy_bound_rejects_bad_input():
    from moeplace.solvers.kernel_bounds import copy_bound

    sets = np.zeros((3, 1, 2), np.int64)
    sets[:, 0, 1] = 1
    for args, kw in [((sets, 4, "deepep-x", 2), {}), ((sets, 4, "alltoall", 3), {}),
                     ((sets, 4, "alltoall", 2, 3), {}), ((sets + 7, 4, "alltoall", 2), {}),
                     ((sets[:, 0], 4, "alltoall", 2), {}),
                     ((sets, 4, "alltoall", 2, 1, 2), {"distinct": (np.ones(1), np.ones(1))}),
                     ((sets, 4, "alltoall", 2, 1, 0), {"distinct": (np.ones(2), np.ones(2))})]:
        with pytest.raises(InputError):
            copy_bound(*args, **kw)


# ---- priced time ---------------------------------------------------------------------------------
def naive_price(kernel: str, hw, hidden: int, stage: str, sends: np.ndarray, recvs: np.ndarray,
                M: int) -> np.ndarray:
    """``[G]`` seconds per rank, written from dispatch.py's docstring: alpha + the larger of
    sent and received bytes over each link's rate (max of the two links for the normal kernels,
    their sum + beta log2(nodes) for the low-latency ones, their sum for alltoall)."""
    from moeplace.solvers.dispatch import bytes_per_token, kernel_params

    p = kernel_params(hw, kernel, stage)
    b = bytes_per_token(kernel, hidden, stage) / 1e9
    nv, net = np.maximum(sends[0], recvs[0]) * b, np.maximum(sends[1], recvs[1]) * b
    a = p["alpha_us"] * 1e-6
    if kernel == "deepep-ll":
        return a + nv / p["intra_gbps"] + net / p["inter_gbps"] + p["beta_us"] * 1e-6 * math.log2(M)
    if kernel == "alltoall":
        return a + nv / p["nvlink_gbps"] + net / p["rdma_gbps"]
    return a + np.maximum(nv / p["nvlink_gbps"], net / p["rdma_gbps"])


def rank_volumes(ranks_per_token, homes, G: int, n: int, kernel: str) -> tuple[np.ndarray, ...]:
    """Per-rank (sends, recvs) ``[2, G]`` (NVLink, RDMA) of one step, counted copy by copy."""
    sends, recvs = np.zeros((2, G)), np.zeros((2, G))
    for ranks, h in zip(ranks_per_token, homes, strict=True):
        if kernel == "deepep-ll":
            for g in ranks:
                if g != h:
                    link = int(g // n != h // n)
                    sends[link, h] += 1
                    recvs[link, g] += 1
        elif kernel == "alltoall" or G == n:
            for g in set(ranks) - {h}:
                link = int(g // n != h // n)
                sends[link, h] += 1
                recvs[link, g] += 1
        else:
            for node in {g // n for g in ranks}:
                entry = node * n + h % n
                if node != h // n:
                    sends[1, h] += 1
                    recvs[1, entry] += 1
                for g in {g for g in ranks if g // n == node} - {entry}:
                    sends[0, entry] += 1
                    recvs[0, g] += 1
    return sends, recvs


@pytest.mark.parametrize("N,G,M,R,k", [(4, 2, 1, 0, 2), (4, 2, 2, 0, 2), (4, 4, 2, 0, 2),
                                       (3, 2, 2, 1, 2), (4, 2, 2, 2, 3)])
@pytest.mark.parametrize("profile", ["h800-ib", "h100-ib"])
def test_priced_bound_below_every_placement(N, G, M, R, k, profile):
    """The time bound is below every layout's expected slowest rank (dispatch and combine),
    the step being the sample's tokens with every assignment of homes enumerated; copies
    chosen by the evaluator's rule (own rank, else own node, else the first copy), and below
    every layout's largest expected price of one rank. It is also below the price of each
    step's mean rank (the proof's middle step), except under deepep-ll without replicas, where
    that price is exact (exact copies, linear pricing) and the bound is at least it."""
    from moeplace.solvers.dispatch import KERNELS
    from moeplace.solvers.kernel_bounds import copy_bound, priced_bound
    from moeplace.solvers.simulator import Hardware

    hw, hidden = Hardware.load(profile), 1 << 20  # copies, not latencies, dominate
    T = 3 if G == 4 else 4
    sets = tiny_tokens(np.random.default_rng(G + 3 * R + k), T, 1, N, k)
    n = G // M
    cnt = layouts(N, G, R)
    for kernel in KERNELS:
        lb = np.array(priced_bound(copy_bound(sets, N, kernel, G, M, R), hw, hidden, T, G, M))
        slowest, mean_rank = np.full(2, math.inf), np.full(2, math.inf)
        busiest = np.full(2, math.inf)
        for c in cnt:
            got, mid, per_rank = np.zeros(2), np.zeros(2), np.zeros((2, G))
            for homes in itertools.product(range(G), repeat=T):
                ranks = []
                for experts, h in zip(sets[:, 0].tolist(), homes, strict=True):
                    row = []
                    for e in experts:
                        on = np.nonzero(c[e])[0]
                        node = on[on // n == h // n]
                        row.append(h if c[e, h] else int(node[0]) if node.size else int(on[0]))
                    ranks.append(row)
                sends, recvs = rank_volumes(ranks, homes, G, n, kernel)
                avg = sends.sum(axis=1, keepdims=True) / G
                for i, stage in enumerate(("dispatch", "combine")):
                    ranks_s = naive_price(kernel, hw, hidden, stage, sends, recvs, M)
                    got[i] += ranks_s.max()
                    per_rank[i] += ranks_s
                    mid[i] += naive_price(kernel, hw, hidden, stage, avg, avg, M)[0]
            slowest = np.minimum(slowest, 1e6 * got / G ** T)
            busiest = np.minimum(busiest, 1e6 * per_rank.max(axis=1) / G ** T)
            mean_rank = np.minimum(mean_rank, 1e6 * mid / G ** T)
        assert np.all(lb <= busiest * (1 + 1e-9)), (kernel, lb, busiest)
        assert np.all(busiest <= slowest * (1 + 1e-9)) and np.all(mean_rank <= slowest * (1 + 1e-9))
        if kernel == "deepep-ll" and R == 0:
            assert np.all(lb >= mean_rank * (1 - 1e-9))
        else:
            assert np.all(lb <= mean_rank * (1 + 1e-9)), (kernel, lb, mean_rank)
        assert np.all(lb > 0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), kernel=st.sampled_from(["alltoall", "deepep-normal",
                                                            "deepep-ll", "deepep-v2"]),
       profile=st.sampled_from(["h800-ib", "h100-nvlink"]))
def test_price_is_monotone_in_the_copies(seed, kernel, profile):
    """What the time bound rests on: one more copy sent or received anywhere never makes a
    rank faster (dispatch.price, for fitted and datasheet profiles)."""
    from moeplace.solvers.dispatch import Volumes, price
    from moeplace.solvers.simulator import Hardware

    rng = np.random.default_rng(seed)
    G = 4
    hw = Hardware.load(profile)
    base = [rng.integers(0, 50, G) for _ in range(4)]

    def vol(parts):
        z = np.zeros(1, np.int64)
        return Volumes(*parts, z, z, np.zeros(G), np.zeros(G), np.zeros(G))

    for stage in ("dispatch", "combine"):
        t0 = price(vol(base), kernel, hw, 4096, stage, 2)
        for which in range(4):
            more = [x.copy() for x in base]
            more[which][rng.integers(G)] += int(rng.integers(1, 10))
            assert np.all(price(vol(more), kernel, hw, 4096, stage, 2) >= t0 - 1e-15)


def test_priced_bound_rejects_bad_input():
    from moeplace.solvers.kernel_bounds import copy_bound, priced_bound
    from moeplace.solvers.simulator import Hardware

    b = copy_bound(np.zeros((2, 1, 1), np.int64), 2, "deepep-ll", 2)
    for args in [(0, 16, 2, 1), (4096, 0, 2, 1), (4096, 16, True, 1)]:
        with pytest.raises(InputError):
            priced_bound(b, Hardware.load("h800-ib"), *args)

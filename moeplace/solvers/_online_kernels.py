"""The online policy's greedy move search compiled with numba (``moeplace[fast]``; vLLM itself
depends on numba), step for step the numpy search of ``online._search_layer_numpy``.

A numpy step costs about a hundred small array calls (~0.7 ms at 64 GPUs), so on the
DeepSeek-V3 shape (58 layers, several steps each) the search dominated the policy's CPU time;
compiled, a step is microseconds of plain loops. Layers of at least ``NUMBA_MIN_WORK``
slot-GPU pairs use it; it is compiled once per machine (cached on disk) and loaded once per
process, at the engine's start-up (the plug-ins, or a policy for 16 GPUs or more) or before
the first decision's clock starts. The two searches are tested against each other
(``tests/solvers/test_online_kernels.py``) and against brute force."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

# numba costs about 0.4 s to import: found here, imported and compiled on first use (and
# cached on disk), never at ``import moeplace``.
HAVE_NUMBA = (os.environ.get("MOEPLACE_KERNEL", "") != "numpy"
              and importlib.util.find_spec("numba") is not None)
# Below this many slot-GPU pairs per layer the numpy search costs a few ms per decision and
# is used: compiling the search once costs 5-15 CPU seconds, loading it from the on-disk
# cache about half a second per process. The DeepSeek-V3 shape (58 x 288 slots on 32-64
# GPUs) is 9,000-20,000.
NUMBA_MIN_WORK = 2048


def use_numba(work: int) -> bool:
    """Whether a layer of ``work`` slot-GPU pairs is searched by the compiled kernel."""
    return HAVE_NUMBA and work >= NUMBA_MIN_WORK


def warm(work: int | None = None) -> None:
    """Load (or compile, once per machine) the compiled search now if layers of ``work``
    slot-GPU pairs (None: any) will use it."""
    if HAVE_NUMBA and (work is None or use_numba(work)):
        compiled_search()


def _jit(f):  # type: ignore[no-untyped-def]
    """Compiled (cached on disk) where numba is installed; this module is imported only when
    the policy searches, never at ``import moeplace``."""
    if not HAVE_NUMBA:
        return f
    import numba

    return numba.njit(cache=True, nogil=True, boundscheck=False)(f)


@_jit
def _loads(w, cnt, gpu, row, share, gl):  # type: ignore[no-untyped-def]
    """Per-copy shares and GPU loads (slot order, as ``np.bincount`` sums them)."""
    for e in range(w.shape[0]):
        share[e] = w[e] / max(cnt[e], 1)
    gl[:] = 0.0
    for p in range(row.shape[0]):
        gl[gpu[p]] += share[row[p]]


@_jit
def _smallest(items, key, m):  # type: ignore[no-untyped-def]
    """The ``m`` items of smallest key (earlier first on ties, as a stable argsort), in their
    original order (``items`` ascending stays ascending, as ``np.sort`` of the pick)."""
    n = items.shape[0]
    out = np.empty(m, np.int64)
    k = 0
    for i in range(n):
        rank = 0
        for j in range(n):
            if key[j] < key[i] or (key[j] == key[i] and j < i):
                rank += 1
        if rank < m:
            out[k] = items[i]
            k += 1
    return out


@_jit
def _search(row0, w, G, S, node, colocate, max_moves, min_gain, target, has_target,  # type: ignore[no-untyped-def]
                   max_steps, probe, spares):
    """See ``online._search_layer_numpy``; ``node`` 0 means one domain; returns
    ``(rows [n+1, P], copies [n+1], maxes [n+1])``."""
    P = row0.shape[0]
    N = w.shape[0]
    row = row0.copy()
    gpu = np.empty(P, np.int64)
    for p in range(P):
        gpu[p] = p // S
    C = np.zeros((G, N), np.int64)
    for p in range(P):
        C[gpu[p], row[p]] += 1
    cnt = np.zeros(N, np.int64)
    for g in range(G):
        for e in range(N):
            cnt[e] += C[g, e]
    share = np.empty(N)
    gl = np.zeros(G)
    _loads(w, cnt, gpu, row, share, gl)
    mean = w.sum() / G
    steps = min(max_moves, max_steps)
    rows = np.empty((steps + 1, P), np.int64)
    copies = np.zeros(steps + 1)
    maxes = np.zeros(steps + 1)
    rows[0] = row
    maxes[0] = gl.max()
    cap = P if colocate else G
    eps = 1e-12 * max(mean, 1.0)
    scale = 1e-3 / max(mean, 1e-12)
    n = 0
    same = np.ones(G, np.bool_)
    for j in range(steps):
        if copies[n] >= max_moves:
            break
        h = int(np.argmax(gl))
        cur = gl[h]
        met = (not has_target) or cur <= target * (1 + 1e-9)
        if cur - mean <= eps or (met and cur - mean < min_gain):
            break
        if (not met) and j >= probe:
            rate = (maxes[n - probe] - cur) / probe
            if rate <= 0 or j + (cur - target) / rate > steps:
                break
        for g in range(G):
            same[g] = True if node == 0 else (g // node == h // node)
        # the second and third GPUs of a stable descending order (lowest index on ties)
        o1 = -1
        o2 = -1
        for g in range(G):
            if g == h:
                continue
            if o1 < 0 or gl[g] > gl[o1]:
                o2 = o1
                o1 = g
            elif o2 < 0 or gl[g] > gl[o2]:
                o2 = g
        second = gl[o1] if G > 1 else -np.inf
        third = gl[o2] if G > 2 else -np.inf
        kind = 0  # 0 none, 1 swap, 2 retarget
        best_gain = 0.0
        bi = -1
        bj = -1
        # (a) swaps of a copy on h with a copy on another GPU of the allowed domain
        best_score = np.inf
        for ia in range(S):
            sa = h * S + ia
            ea = row[sa]
            for sb in range(P):
                k = gpu[sb]
                if k == h or not same[k]:
                    continue
                eb = row[sb]
                d = share[eb] - share[ea]
                if ea == eb or not d < 0:
                    continue
                if not colocate and (C[k, ea] != 0 or C[h, eb] != 0):
                    continue
                nh = cur + d
                nk = gl[k] - d
                other = third if k == o1 else second
                val = max(max(nh, nk), other)
                if not val <= cur + eps:
                    continue
                sq = nh ** 2 + nk ** 2 - cur ** 2 - gl[k] ** 2
                score = val + scale * sq
                if score < best_score:
                    best_score = score
                    bi = sa
                    bj = sb
        if bi >= 0:
            gain = (cur - best_score) / 2
            if gain > 0:
                kind = 1
                best_gain = gain
        # (b) a spare copy elsewhere re-targeted to an expert of h; (c) a spare copy on h
        # re-targeted to an expert h does not hold
        b0 = np.empty(S, np.int64)  # h's distinct experts with room for a copy, ascending
        nb0 = 0
        for ia in range(S):
            e = row[h * S + ia]
            if cnt[e] >= cap:
                continue
            pos = nb0
            dup = False
            for i in range(nb0):
                if b0[i] == e:
                    dup = True
                    break
                if b0[i] > e and pos == nb0:
                    pos = i
            if dup:
                continue
            for i in range(nb0, pos, -1):
                b0[i] = b0[i - 1]
            b0[pos] = e
            nb0 += 1
        b0 = b0[:nb0]
        S0 = np.empty(P, np.int64)
        ns0 = 0
        for p in range(P):
            if gpu[p] != h and same[gpu[p]] and cnt[row[p]] > 1:
                S0[ns0] = p
                ns0 += 1
        S0 = S0[:ns0]
        if ns0 > spares:
            inc = np.empty(ns0)
            for i in range(ns0):
                ra = row[S0[i]]
                inc[i] = w[ra] / (cnt[ra] - 1) - w[ra] / cnt[ra] + gl[gpu[S0[i]]] * 1e-9
            S0 = _smallest(S0, inc, spares)
        Sh = np.empty(S, np.int64)
        nsh = 0
        for ia in range(S):
            if cnt[row[h * S + ia]] > 1:
                Sh[nsh] = h * S + ia
                nsh += 1
        Sh = Sh[:nsh]
        bh = np.empty(N, np.int64)
        nbh = 0
        if nsh > 0:
            home = np.zeros(N, np.bool_)
            if node != 0:
                for p in range(P):
                    if same[gpu[p]]:
                        home[row[p]] = True
            for e in range(N):
                if C[h, e] == 0 and cnt[e] < cap and (node == 0 or home[e]):
                    bh[nbh] = e
                    nbh += 1
        bh = bh[:nbh]
        if nbh > spares:
            key = np.empty(nbh)
            for i in range(nbh):
                key[i] = w[bh[i]] / (cnt[bh[i]] + 1)
            bh = _smallest(bh, key, spares)
        for blk in range(2):
            bs = b0 if blk == 0 else bh
            Ss = S0 if blk == 0 else Sh
            if bs.shape[0] == 0 or Ss.shape[0] == 0:
                continue
            gl2 = 0.0
            for g in range(G):
                gl2 += gl[g] ** 2
            sc_best = np.inf
            ib_best = -1
            js_best = -1
            for ib in range(bs.shape[0]):
                b = bs[ib]
                wb = w[b]
                cb = float(cnt[b])
                for js in range(Ss.shape[0]):
                    s = Ss[js]
                    a = row[s]
                    gs = gpu[s]
                    if a == b or (not colocate and C[gs, b] != 0):
                        continue
                    wa = w[a]
                    ca = float(cnt[a])
                    val = -np.inf
                    sq = 0.0
                    for g in range(G):
                        oh = 1.0 if g == gs else 0.0
                        ch_a = (C[g, a] - oh) * (wa / max(ca - 1, 1.0)) - C[g, a] * (wa / ca)
                        ch_b = (C[g, b] + oh) * (wb / (cb + 1)) - C[g, b] * (wb / cb)
                        v = gl[g] + ch_a + ch_b
                        val = max(val, v)
                        sq += v ** 2
                    sq -= gl2
                    if not val <= cur + eps:
                        continue
                    score = val + scale * sq
                    if score < sc_best:
                        sc_best = score
                        ib_best = ib
                        js_best = js
            if ib_best >= 0:
                gain = cur - sc_best
                if gain > 0 and (kind == 0 or gain > best_gain):
                    kind = 2
                    best_gain = gain
                    bi = bs[ib_best]
                    bj = Ss[js_best]
        if kind == 0:
            break
        if kind == 1:
            ea = row[bi]
            eb = row[bj]
            C[gpu[bi], ea] -= 1
            C[gpu[bj], eb] -= 1
            C[gpu[bi], eb] += 1
            C[gpu[bj], ea] += 1
            row[bi] = eb
            row[bj] = ea
            gl[gpu[bi]] += share[eb] - share[ea]
            gl[gpu[bj]] += share[ea] - share[eb]
            moved = 2
        else:
            a = row[bj]
            C[gpu[bj], a] -= 1
            C[gpu[bj], bi] += 1
            cnt[a] -= 1
            cnt[bi] += 1
            row[bj] = bi
            _loads(w, cnt, gpu, row, share, gl)
            moved = 1
        n += 1
        rows[n] = row
        copies[n] = copies[n - 1] + moved
        maxes[n] = gl.max()
    return rows[:n + 1].copy(), copies[:n + 1].copy(), maxes[:n + 1].copy()


@functools.cache
def compiled_search():  # type: ignore[no-untyped-def]
    """The numba-compiled search, compiled once per machine (``cache=True``) and loaded once
    per process: a tiny search here loads it, so that no rebalance pays for it."""
    fn = _search
    fn(np.array([0, 1, 1, 0], np.int64), np.array([3.0, 1.0]), 2, 2, 0, True, 2, 0.0, 0.0, False,
       2, 3, 32)
    return fn

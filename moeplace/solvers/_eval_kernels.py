"""Per-token scoring kernels: compiled with numba when installed, numpy otherwise.

Both backends take the same flat tables and update the same accumulators in place, so the
streaming evaluator drives either one. For each placement p and execution model m (0 static,
1 follow), token t at layer l is served, expert by expert, by:
the copy on the token's current GPU, else the first copy on its node, else the expert's copies
round-robin in token order (``rr[p, m, l, e]`` carries the counter across calls).

Tables (P placements, L layers, N experts, C most copies of one expert):
``copy_gpu [P, L, N, C]`` GPU of each copy in ascending slot order (-1 padding),
``cnt [P, L, N]`` copies, ``node_of [P, Gmax]`` node of each GPU (int32 tables).
``home [P, T]`` each token's home GPU under each placement's GPU count.
Accumulators (int64): ``pending [P, L, Gmax]`` tokens-experts served per GPU by the model
``load_model`` (the evaluator folds it into windows), ``traffic [P, 2, 4, L]`` per model of
(remote GPUs, of which same-node, of which other-node, remote nodes) summed over tokens.

Serving steps (the decode metric): ``ser [T]`` gives each token's step serial (non-decreasing,
consecutive integers from 0 over the whole trace). A (layer, expert) activates a GPU in a step
when some token of the step is served there by the ``load_model``. For placements without
replicas that GPU does not depend on the placement's execution, so the experts active in the
open step are listed once for all of them: ``est [L, N]`` holds the last serial in which each
(layer, expert) was active, ``alist`` the open step's ``l * N + e`` (``act_open[1]`` of them),
and a step's per-GPU counts are made from the list when it closes. For replicated placements
``act_stamp [P, L, N, C]`` holds the last serial that activated each copy (the expert's first
copy on that GPU, so two copies on one GPU count once) and ``act_cnt [P, L, Gmax]`` counts as
tokens arrive. When step ``act_open[0]`` closes, per (placement, layer) ``act_acc[p, 0, l]``
adds ``max_g a_g / s_g`` and ``act_acc[p, 1, l]`` adds that max divided by
``sum_g a_g / sum_g s_g`` (speeds ``speeds [P, Gmax]``, 1 for equal GPUs; ``ngpu [P]`` GPUs).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from moeplace.solvers.cost import speed_imbalance
from moeplace.traces._kernels import HAVE_NUMBA

# traffic[p, m, X, l] indices
GPUS, INTRA, INTER, NODES = 0, 1, 2, 3

# Below this many token-layer-placement records the numpy path wins (no JIT compile on first use).
NUMBA_MIN_RECORDS = 100_000


def _kernel_source(e, w, has_w, home, copy_gpu, cnt, rr, node_of, load_model, pending,  # type: ignore[no-untyped-def]
                   traffic, colo, do_colo, ser, est, alist, act_stamp, act_cnt, act_acc,
                   act_open, ngpu, speeds, gbuf, dnode, gstamp, gvotes, nstamp, nvotes, gkey, nkey):
    # Token-outer order reads the chunk sequentially and keeps every placement's tables
    # (int32, a few hundred KB) hot. gstamp/nstamp mark GPUs/nodes already seen in the current
    # (token, layer) record, so distinct counts cost O(k), not O(k^2); the previous layer's
    # marks live in the other half of the double-buffered arrays, which gives the co-located
    # pair counts of consecutive layers in O(k) as well. For placements without replicas the
    # mark and the count share one word (gkey/nkey), halving the memory traffic per expert.
    T, L, k = e.shape
    P = copy_gpu.shape[0]
    sid = 0
    for b in range(2):
        for i in range(gstamp.shape[1]):
            gstamp[b, i] = -1
            gkey[b, i] = 0
        for i in range(nstamp.shape[1]):
            nstamp[b, i] = -1
            nkey[b, i] = 0
    N = est.shape[1]
    any_colo = False
    for p in range(P):
        if do_colo[p]:
            any_colo = True
    for t in range(T):
        sr = ser[t]
        if sr != act_open[0]:
            if act_open[0] >= 0:
                _flush_steps(act_cnt, act_acc, ngpu, speeds, alist, act_open, copy_gpu, do_colo)
            act_open[0] = sr
        if any_colo:
            na = act_open[1]
            for l in range(L):
                for j in range(k):
                    ex = e[t, l, j]
                    if est[l, ex] != sr:
                        est[l, ex] = sr
                        alist[na] = l * N + ex
                        na += 1
            act_open[1] = na
        for p in range(P):
            ast_p = act_stamp[p]
            acn_p = act_cnt[p]
            cg_p = copy_gpu[p]
            cnt_p = cnt[p]
            nd = node_of[p]
            pend = pending[p]
            if do_colo[p]:
                # One copy per expert: the serving GPUs do not depend on where the token is,
                # so both execution models share one resolution and one distinct-GPU list.
                # gkey/nkey pack (record id << 8 | experts on that GPU / node) in one word.
                hs = home[p, t]
                hn = nd[hs]
                cf = hs
                st = traffic[p, 0]
                fo = traffic[p, 1]
                for l in range(L):
                    sid += 1
                    b = l & 1
                    pb = 1 - b
                    cur_key = sid << 8
                    prev_key = (sid - 1) << 8
                    gk = gkey[b]
                    nk = nkey[b]
                    nd_cnt = 0
                    nn_cnt = 0
                    s_inter = 0
                    for j in range(k):
                        g = cg_p[l, e[t, l, j], 0]
                        gbuf[j] = g
                        pend[l, g] += 1
                        gn = nd[g]
                        v = gk[g]
                        if v < cur_key:
                            gk[g] = cur_key + 1
                            dnode[nd_cnt] = gn
                            nd_cnt += 1
                        else:
                            gk[g] = v + 1
                        v = nk[gn]
                        if v < cur_key:
                            nk[gn] = cur_key + 1
                            nn_cnt += 1
                        else:
                            nk[gn] = v + 1
                    cfn = nd[cf]
                    f_inter = 0
                    for q in range(nd_cnt):
                        gn = dnode[q]
                        if gn != hn:
                            s_inter += 1
                        if gn != cfn:
                            f_inter += 1
                    s_gpus = nd_cnt - (gk[hs] >= cur_key)
                    f_gpus = nd_cnt - (gk[cf] >= cur_key)
                    st[0, l] += s_gpus
                    st[1, l] += s_gpus - s_inter
                    st[2, l] += s_inter
                    st[3, l] += nn_cnt - (nk[hn] >= cur_key)
                    fo[0, l] += f_gpus
                    fo[1, l] += f_gpus - f_inter
                    fo[2, l] += f_inter
                    fo[3, l] += nn_cnt - (nk[cfn] >= cur_key)
                    if l > 0:
                        # pairs (a at l-1, b at l) on one GPU / one node: sum over b of the
                        # previous layer's experts on b's GPU / node
                        pgk = gkey[pb]
                        pnk = nkey[pb]
                        same_g = 0
                        same_n = 0
                        for j in range(k):
                            g = gbuf[j]
                            v = pgk[g]
                            if v >= prev_key:
                                same_g += v - prev_key
                            v = pnk[nd[g]]
                            if v >= prev_key:
                                same_n += v - prev_key
                        colo[p, 0, l - 1] += same_g
                        colo[p, 1, l - 1] += same_n
                    best = 0
                    bv = gk[gbuf[0]]
                    for j in range(1, k):
                        v = gk[gbuf[j]]
                        if v > bv or (v == bv and has_w and w[t, l, j] > w[t, l, best]):
                            best = j
                            bv = v
                    cf = gbuf[best]
                continue
            for m in range(2):
                rr_m = rr[p, m]
                tr = traffic[p, m]
                c = home[p, t]
                do_load = m == load_model
                for l in range(L):
                    cn = nd[c]
                    sid += 1
                    b = l & 1
                    gs = gstamp[b]
                    gv = gvotes[b]
                    ns = nstamp[b]
                    nv = nvotes[b]
                    s_gpus = 0
                    s_inter = 0
                    s_nodes = 0
                    for j in range(k):
                        ex = e[t, l, j]
                        nc = cnt_p[l, ex]
                        if nc == 1:
                            g = cg_p[l, ex, 0]
                        else:
                            g = -1
                            for q in range(nc):
                                if cg_p[l, ex, q] == c:
                                    g = c
                                    break
                            if g < 0:
                                for q in range(nc):
                                    if nd[cg_p[l, ex, q]] == cn:
                                        g = cg_p[l, ex, q]
                                        break
                            if g < 0:
                                g = cg_p[l, ex, rr_m[l, ex] % nc]
                                rr_m[l, ex] += 1
                        gbuf[j] = g
                        if do_load:
                            pend[l, g] += 1
                            q = 0  # the expert's first copy on g stands for all of them
                            while cg_p[l, ex, q] != g:
                                q += 1
                            if ast_p[l, ex, q] != sr:
                                ast_p[l, ex, q] = sr
                                acn_p[l, g] += 1
                        gn = nd[g]
                        if gs[g] != sid:
                            gs[g] = sid
                            gv[g] = 0
                            if g != c:
                                s_gpus += 1
                                if gn != cn:
                                    s_inter += 1
                        gv[g] += 1
                        if ns[gn] != sid:
                            ns[gn] = sid
                            nv[gn] = 0
                            if gn != cn:
                                s_nodes += 1
                        nv[gn] += 1
                    tr[0, l] += s_gpus
                    tr[1, l] += s_gpus - s_inter
                    tr[2, l] += s_inter
                    tr[3, l] += s_nodes
                    if m == 1:
                        # The token moves to the GPU that ran most of its experts; ties go to
                        # the highest gate weight, then the first listed.
                        best = 0
                        bv = gv[gbuf[0]]
                        for j in range(1, k):
                            v = gv[gbuf[j]]
                            if v > bv or (v == bv and has_w and w[t, l, j] > w[t, l, best]):
                                best = j
                                bv = v
                        c = gbuf[best]


def _flush_source(act_cnt, act_acc, ngpu, speeds, alist, act_open, copy_gpu, do_colo):  # type: ignore[no-untyped-def]
    # Close the open step: placements without replicas count the listed active experts on
    # their GPUs; then per placement and layer, the slowest GPU's distinct experts (per unit
    # of speed) and that over the speed-weighted mean. Counts and the list start afresh.
    P, L, _G = act_cnt.shape
    N = copy_gpu.shape[2]
    na = act_open[1]
    for p in range(P):
        if do_colo[p]:
            for i in range(na):
                l = alist[i] // N
                act_cnt[p, l, copy_gpu[p, l, alist[i] - l * N, 0]] += 1
        G = ngpu[p]
        for l in range(L):
            mx = 0.0
            tot = 0.0
            ssum = 0.0
            for g in range(G):
                a = act_cnt[p, l, g]
                v = a / speeds[p, g]
                if v > mx:
                    mx = v
                tot += a
                ssum += speeds[p, g]
                act_cnt[p, l, g] = 0
            act_acc[p, 0, l] += mx
            act_acc[p, 1, l] += mx / (tot / ssum) if tot > 0 else 1.0
    act_open[1] = 0


# The compiled kernel calls the compiled flush; ``_numba_kernel`` rebinds this name first.
_flush_steps = _flush_source


def flush_steps(act_cnt: np.ndarray, act_acc: np.ndarray, ngpu: np.ndarray,
                speeds: np.ndarray, alist: np.ndarray, act_open: np.ndarray,
                copy_gpu: np.ndarray, do_colo: np.ndarray) -> None:
    """Close the open serving step (see the module docstring); numpy, same arithmetic."""
    P = act_cnt.shape[0]
    N = copy_gpu.shape[2]
    ll, ee = np.divmod(alist[:int(act_open[1])], N)
    for p in range(P):
        if do_colo[p]:
            np.add.at(act_cnt[p], (ll, copy_gpu[p, ll, ee, 0]), 1)
        G = int(ngpu[p])
        a = act_cnt[p, :, :G].astype(np.float64)
        s = speeds[p, :G]
        act_acc[p, 1] += speed_imbalance(a, s)
        act_acc[p, 0] += (a / s).max(axis=1)
    act_cnt[:] = 0
    act_open[1] = 0


@functools.cache
def _numba_kernel():  # type: ignore[no-untyped-def]
    import numba

    flush = numba.njit(cache=True, nogil=True)(_flush_source)
    globals()["_flush_steps"] = flush  # the kernel resolves it as a global when compiled
    return numba.njit(cache=True, nogil=True, boundscheck=False)(_kernel_source)


def _resolve_numpy(cg_l: np.ndarray, cnt_l: np.ndarray, rr_l: np.ndarray, e: np.ndarray,
                   cur: np.ndarray, nd: np.ndarray) -> np.ndarray:
    """``[T, k]`` GPUs serving experts ``e`` for tokens on ``cur`` (numpy, one layer)."""
    if int(cnt_l.max()) == 1:
        return cg_l[e, 0]
    cg = cg_l[e]  # [T, k, C]
    local = (cg == cur[:, None, None]).any(axis=2)
    on_node = (cg >= 0) & (nd[np.maximum(cg, 0)] == nd[cur][:, None, None])
    node_any = on_node.any(axis=2)
    T, k = e.shape
    node_pick = cg[np.arange(T)[:, None], np.arange(k)[None, :], on_node.argmax(axis=2)]
    need = ~local & ~node_any
    out = np.where(local, cur[:, None], node_pick)
    if need.any():
        ee = e[need].astype(np.int64)  # row-major: token order, then listing order
        rank = _cumcount(ee) + rr_l[ee]
        out[need] = cg_l[ee, rank % cnt_l[ee]]
        np.add.at(rr_l, ee, 1)
    return out


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key."""
    if keys.size == 0:
        return keys
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, sk.size]))
    out = np.empty_like(keys)
    out[order] = np.arange(sk.size) - first
    return out


def _distinct_other(vals: np.ndarray, other: np.ndarray, keep: np.ndarray | None = None
                    ) -> np.ndarray:
    """Per row of ``vals [T, k]``: distinct values != ``other [T]`` (among ``keep`` if given)."""
    x = np.where(vals != other[:, None], vals, -1)
    if keep is not None:
        x = np.where(keep, x, -1)
    s = np.sort(x, axis=1)
    return (s[:, 1:] != s[:, :-1]).sum(axis=1) + (s[:, 0] >= 0)


def _active_numpy(e: np.ndarray, ser: np.ndarray, gserve: dict[int, list[np.ndarray]],
                  est: np.ndarray, alist: np.ndarray, act_stamp: np.ndarray,
                  act_cnt: np.ndarray, act_acc: np.ndarray, act_open: np.ndarray,
                  ngpu: np.ndarray, speeds: np.ndarray, copy_gpu: np.ndarray,
                  do_colo: np.ndarray) -> None:
    """The step metric for a run of tokens (numpy), one serving step at a time, on the same
    state as the compiled kernel. ``gserve[p][l]`` is ``[T, k]``, the GPUs serving each
    expert under the load model, for the replicated placements ``p``."""
    T, L, k = e.shape
    N = est.shape[1]
    Gm = act_cnt.shape[2]
    cuts = np.r_[0, np.flatnonzero(ser[1:] != ser[:-1]) + 1, T]
    lk = np.repeat(np.arange(L), k)
    for t0, t1 in itertools.pairwise(cuts):
        sr = int(ser[t0])
        if sr != act_open[0]:
            if act_open[0] >= 0:
                flush_steps(act_cnt, act_acc, ngpu, speeds, alist, act_open, copy_gpu, do_colo)
            act_open[0] = sr
        seg = e[t0:t1].reshape(t1 - t0, L * k).astype(np.int64)
        if do_colo.any():
            keys = np.unique(lk * N + seg)
            keys = keys[est.ravel()[keys] != sr]
            est.ravel()[keys] = sr
            na = int(act_open[1])
            alist[na:na + keys.size] = keys
            act_open[1] = na + keys.size
        for p, per_layer in gserve.items():
            g = np.stack([x[t0:t1] for x in per_layer], axis=1).reshape(t1 - t0, L * k)
            key = np.unique((lk * N + seg) * Gm + g)
            le, gg = np.divmod(key, Gm)
            ll, ee = np.divmod(le, N)
            q = np.argmax(copy_gpu[p, ll, ee] == gg[:, None], axis=1)  # first copy on gg
            new = act_stamp[p, ll, ee, q] != sr
            act_stamp[p, ll[new], ee[new], q[new]] = sr
            np.add.at(act_cnt[p], (ll[new], gg[new]), 1)


def _numpy_kernel(e, w, has_w, home, copy_gpu, cnt, rr, node_of, load_model, pending,  # type: ignore[no-untyped-def]
                  traffic, colo, do_colo, ser, est, alist, act_stamp, act_cnt, act_acc,
                  act_open, ngpu, speeds, *_scratch) -> None:
    T, L, k = e.shape
    P = copy_gpu.shape[0]
    gserve: dict[int, list[np.ndarray]] = {}
    ei = e.astype(np.intp)
    jj = np.arange(k)
    if has_w:
        # rank[t, l, j]: experts a token listed that lose to j on (weight, then earlier listed)
        wa, wb = w[:, :, None, :], w[:, :, :, None]
        rank = ((wa < wb) | ((wa == wb) & (jj[None, :] > jj[:, None]))).sum(axis=3)
    else:
        rank = np.broadcast_to(k - 1 - jj, (T, L, k))
    for p in range(P):
        nd = node_of[p].astype(np.int64)
        cgp = copy_gpu[p].astype(np.int64)
        cntp = cnt[p].astype(np.int64)
        for m in range(2):
            cur = home[p].astype(np.int64)
            prev = None
            rr_m = rr[p, m].astype(np.int64)
            for l in range(L):
                g = _resolve_numpy(cgp[l], cntp[l], rr_m[l], ei[:, l], cur, nd)
                if m == load_model:
                    pending[p, l] += np.bincount(g.ravel(), minlength=pending.shape[2])
                    if not do_colo[p]:
                        gserve.setdefault(p, []).append(g)
                gn, cn = nd[g], nd[cur]
                remote = _distinct_other(g, cur)
                inter = _distinct_other(g, cur, keep=gn != cn[:, None])
                nodes = _distinct_other(gn, cn)
                traffic[p, m, GPUS, l] += int(remote.sum())
                traffic[p, m, INTRA, l] += int((remote - inter).sum())
                traffic[p, m, INTER, l] += int(inter.sum())
                traffic[p, m, NODES, l] += int(nodes.sum())
                if m == 0 and do_colo[p] and prev is not None:
                    colo[p, 0, l - 1] += int((prev[:, :, None] == g[:, None, :]).sum())
                    colo[p, 1, l - 1] += int((nd[prev][:, :, None] == gn[:, None, :]).sum())
                prev = g
                if m == 1:
                    votes = (g[:, :, None] == g[:, None, :]).sum(axis=2)
                    cur = g[np.arange(T), np.argmax(votes * k + rank[:, l], axis=1)]
            rr[p, m] = rr_m
    _active_numpy(ei, ser, gserve, est, alist, act_stamp, act_cnt, act_acc, act_open, ngpu,
                  speeds, copy_gpu, do_colo)


def score_into(experts: np.ndarray, weights: np.ndarray | None, home: np.ndarray,
               copy_gpu: np.ndarray, cnt: np.ndarray, rr: np.ndarray, node_of: np.ndarray,
               load_model: int, pending: np.ndarray, traffic: np.ndarray, colo: np.ndarray,
               do_colo: np.ndarray, ser: np.ndarray, est: np.ndarray, alist: np.ndarray,
               act_stamp: np.ndarray,
               act_cnt: np.ndarray, act_acc: np.ndarray, act_open: np.ndarray,
               ngpu: np.ndarray, speeds: np.ndarray, backend: str = "auto") -> None:
    """Add one run of tokens' per-token metrics for every placement into the accumulators.

    ``colo [P, 2, L-1]`` gets the (a at l, b at l+1) pairs of a token's k*k that share a GPU /
    a node, for placements with ``do_colo[p]`` (those without replicas, where an expert's
    GPU is the one that serves it). The step arguments are described in the module docstring;
    steps that close inside the run are added to ``act_acc``, the last one stays open.
    """
    T, L, k = experts.shape
    P = copy_gpu.shape[0]
    if backend == "numba" and not HAVE_NUMBA:
        raise RuntimeError("numba backend requested but numba is not installed")
    if k > 255:  # the kernel packs a per-GPU expert count into 8 bits
        if backend == "numba":
            raise RuntimeError(f"the numba kernel handles top-k <= 255, not {k}")
        backend = "numpy"
    use_numba = HAVE_NUMBA and (backend == "numba" or (
        backend == "auto" and T * L * P >= NUMBA_MIN_RECORDS))
    has_w = weights is not None
    w = weights if has_w else np.zeros((1, 1, 1), np.float32)
    if use_numba:
        Gmax = node_of.shape[1]
        nodes = int(node_of.max()) + 1
        _numba_kernel()(experts, w, has_w, home, copy_gpu, cnt, rr, node_of, load_model,
                        pending, traffic, colo, do_colo, ser, est, alist, act_stamp,
                        act_cnt, act_acc,
                        act_open, ngpu, speeds, np.empty(k, np.int64), np.empty(k, np.int64),
                        np.empty((2, Gmax), np.int64), np.empty((2, Gmax), np.int64),
                        np.empty((2, nodes), np.int64), np.empty((2, nodes), np.int64),
                        np.empty((2, Gmax), np.int64), np.empty((2, nodes), np.int64))
    else:
        _numpy_kernel(experts, w, has_w, home, copy_gpu, cnt, rr, node_of, load_model, pending,
                      traffic, colo, do_colo, ser, est, alist, act_stamp, act_cnt, act_acc,
                      act_open, ngpu, speeds)

"""Counting kernels for routing statistics: compiled with numba when installed, numpy otherwise."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

# Below this many token-layer records the numpy path wins (no JIT compile on first use).
NUMBA_MIN_RECORDS = 200_000

# numba costs about 0.4 s to import, so it is found here but imported and compiled on first use.
HAVE_NUMBA = (os.environ.get("MOEPLACE_KERNEL", "") != "numpy"
              and importlib.util.find_spec("numba") is not None)


def _kernel_source(e, load, trans, coact, do_trans, do_coact):  # type: ignore[no-untyped-def]
    # Layer-outer order keeps one layer's [N, N] slices hot in L1 (about 1.4x faster).
    T, L, k = e.shape
    for l in range(L):
        ld = load[l]
        cl = coact[l if do_coact else 0]
        has_next = do_trans and l + 1 < L
        tl = trans[l if has_next else 0]
        for t in range(T):
            for i in range(k):
                a = e[t, l, i]
                ld[a] += 1
                if do_coact:
                    for j in range(k):
                        cl[a, e[t, l, j]] += 1
                if has_next:
                    for j in range(k):
                        tl[a, e[t, l + 1, j]] += 1


@functools.cache
def _numba_kernel():  # type: ignore[no-untyped-def]
    import numba

    return numba.njit(cache=True, nogil=True, boundscheck=False)(_kernel_source)


def _count_numpy(e: np.ndarray, load: np.ndarray, trans: np.ndarray | None,
                 coact: np.ndarray | None, block: int = 2048) -> None:
    T, L, _k = e.shape
    N = load.shape[1]
    offs = (np.arange(L, dtype=np.intp) * N)[None, :, None]
    load += np.bincount((e.astype(np.intp) + offs).ravel(), minlength=L * N).reshape(L, N)
    if trans is None and coact is None:
        return
    # Small token blocks keep the k*k pair-key arrays in cache; per-layer bincounts stay tiny.
    for s in range(0, T, block):
        ec = e[s:s + block].astype(np.intp)
        for l in range(L):
            a = ec[:, l, :, None] * N
            if coact is not None:
                coact[l] += np.bincount((a + ec[:, l, None, :]).ravel(),
                                        minlength=N * N).reshape(N, N)
            if trans is not None and l + 1 < L:
                trans[l] += np.bincount((a + ec[:, l + 1, None, :]).ravel(),
                                        minlength=N * N).reshape(N, N)


def count_into(experts: np.ndarray, load: np.ndarray, trans: np.ndarray | None,
               coact: np.ndarray | None, backend: str = "auto") -> None:
    """Add one chunk's counts into the accumulators in place.

    ``load[l, a]`` += tokens choosing a; ``trans[l, a, b]`` += each (a at l, b at l+1) pair of a
    token's k*k; ``coact[l, a, b]`` += each (a, b) pair of a token's k*k at layer l.
    """
    T, L, _ = experts.shape
    use_numba = HAVE_NUMBA and (backend == "numba" or (backend == "auto"
                                                        and T * L >= NUMBA_MIN_RECORDS))
    if backend == "numba" and not HAVE_NUMBA:
        raise RuntimeError("numba backend requested but numba is not installed")
    if use_numba:
        dummy = np.zeros((1, 1, 1), dtype=np.int64)
        _numba_kernel()(experts, load, dummy if trans is None else trans,
                     dummy if coact is None else coact, trans is not None, coact is not None)
    else:
        _count_numpy(experts, load, trans, coact)

"""The placement MILP built as sparse arrays, solved by HiGHS (highspy) or CBC (a subprocess).

Same model as the CP-SAT expert formulation (see ``exact``): x[l,e,g] binary, M_l >= each GPU's
load, y[l,a,b,g] <= x[l,a,g], x[l+1,b,g] with the reformulation-linearisation equalities
``sum_b y[l,a,b,g] = S x[l,a,g]`` (and column-wise), node-pair variables zn for pairs that
occur. Building it with numpy takes well under a second where a modelling layer took minutes,
so the time limit covers the solve. Both backends stop at the deadline (HiGHS ``time_limit`` and
``cancelSolve``; CBC ``-sec`` and a kill of its process), stop on Ctrl-C, and fall back to the
warm start when they have nothing better.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeplace._interrupts import on_interrupt
from moeplace._limits import check_memory
from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers._exact_common import ExactResult, canonical_gpu, check_split, keep_better, placement_from
from moeplace.solvers._stoppable import STOP_GRACE_S, run_stoppable
from moeplace.solvers.objective import Weights
from moeplace.traces import RoutingStats

INF = 1e30


@dataclass
class Milp:
    """``min c x + offset`` s.t. ``row_lo <= A x <= row_hi``, ``lb <= x <= ub``; the first
    ``nx`` columns (x[l,e,g], order l, e, g) are binary."""

    c: np.ndarray
    offset: float
    lb: np.ndarray
    ub: np.ndarray
    nx: int
    ny: int  # y columns follow x and M
    nz: int  # node-pair columns, last
    rows: np.ndarray  # COO row index
    cols: np.ndarray
    vals: np.ndarray
    row_lo: np.ndarray
    row_hi: np.ndarray

    @property
    def num_cols(self) -> int:
        return len(self.c)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, column indices, values) row by row."""
        order = np.argsort(self.rows, kind="stable")
        starts = np.searchsorted(self.rows[order], np.arange(len(self.row_lo)))
        return starts.astype(np.int32), self.cols[order].astype(np.int32), self.vals[order]


def build_milp(stats: RoutingStats, G: int, M: int, weights: Weights) -> Milp:
    """The placement MILP of ``stats`` on G GPUs in M nodes (each expert placed once)."""
    L, N = stats.load.shape
    n, S = G // M, N // G
    nx = L * N * G
    trans = stats.transitions
    tot = float(trans.sum()) if trans is not None else 0.0
    use_y = tot > 0 and weights.traffic > 0 and L > 1
    ny = (L - 1) * N * N * G if use_y else 0
    pairs = np.argwhere(trans > 0) if (tot > 0 and weights.node and M > 1) else np.zeros((0, 3),
                                                                                          np.int64)
    nz = len(pairs) * M
    ncols = nx + L + ny + nz
    check_memory(8.0 * 12 * (ncols + 2 * ny), "the MILP model", stats.meta.source or "stats",
                 "num_experts")
    xid = np.arange(nx).reshape(L, N, G)
    mid = nx + np.arange(L)
    c = np.zeros(ncols)
    lb = np.zeros(ncols)
    ub = np.ones(ncols)
    ub[mid] = INF
    load = stats.load.astype(np.float64)
    mean = load.sum(axis=1) / G
    if weights.load:
        c[mid] = np.where(mean > 0, weights.load / (L * np.where(mean > 0, mean, 1)), 0.0)
    # Symmetry cut: one node: GPUs ordered by their smallest layer-0 expert (expert e on a GPU
    # <= e); several: expert 0 of layer 0 on GPU 0.
    if M == 1:
        e_idx, g_idx = np.nonzero(np.arange(G)[None, :] > np.arange(N)[:, None])
        ub[xid[0, e_idx, g_idx]] = 0.0
    else:
        lb[xid[0, 0, 0]] = 1.0
    R: list[np.ndarray] = []
    C: list[np.ndarray] = []
    V: list[np.ndarray] = []
    lo: list[np.ndarray] = []
    hi: list[np.ndarray] = []
    nrow = 0

    def add(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, rlo: np.ndarray,
            rhi: np.ndarray) -> None:
        nonlocal nrow
        R.append(rows.ravel() + nrow)
        C.append(cols.ravel())
        V.append(np.broadcast_to(vals, cols.shape).ravel().astype(np.float64))
        lo.append(rlo)
        hi.append(rhi)
        nrow += len(rlo)

    # each expert on one GPU; S experts per GPU
    add(np.repeat(np.arange(L * N), G), xid.reshape(-1), np.ones(1), np.ones(L * N),
        np.ones(L * N))
    add(np.repeat(np.arange(L * G), N), xid.transpose(0, 2, 1).reshape(-1), np.ones(1),
        np.full(L * G, S), np.full(L * G, S))
    # M_l - sum_e load x >= 0
    r = np.arange(L * G).reshape(L, G)
    add(np.concatenate([r[:, :, None].repeat(N, 2).reshape(-1), r.reshape(-1)]),
        np.concatenate([xid.transpose(0, 2, 1).reshape(-1), np.repeat(mid, G)]),
        np.concatenate([-load[:, None, :].repeat(G, 1).reshape(-1), np.ones(L * G)]),
        np.zeros(L * G), np.full(L * G, INF))
    offset = 0.0
    if use_y:
        yid = (nx + L + np.arange(ny)).reshape(L - 1, N, N, G)
        xa = np.broadcast_to(xid[:-1, :, None, :], yid.shape)
        xb = np.broadcast_to(xid[1:, None, :, :], yid.shape)
        k = np.arange(ny)
        for xs in (xa, xb):  # y <= x[l,a,g], y <= x[l+1,b,g]
            add(np.concatenate([k, k]), np.concatenate([yid.reshape(-1), xs.reshape(-1)]),
                np.concatenate([np.ones(ny), -np.ones(ny)]), np.full(ny, -INF), np.zeros(ny))
        # sum_b y[l,a,b,g] = S x[l,a,g]; sum_a y[l,a,b,g] = S x[l+1,b,g]
        ra = np.arange((L - 1) * N * G).reshape(L - 1, N, G)
        add(np.concatenate([np.broadcast_to(ra[:, :, None, :], yid.shape).reshape(-1),
                            ra.reshape(-1)]),
            np.concatenate([yid.reshape(-1), xid[:-1].reshape(-1)]),
            np.concatenate([np.ones(ny), np.full(ra.size, -float(S))]),
            np.zeros(ra.size), np.zeros(ra.size))
        add(np.concatenate([np.broadcast_to(ra[:, None, :, :], yid.shape).reshape(-1),
                            ra.reshape(-1)]),
            np.concatenate([yid.reshape(-1), xid[1:].reshape(-1)]),
            np.concatenate([np.ones(ny), np.full(ra.size, -float(S))]),
            np.zeros(ra.size), np.zeros(ra.size))
        assert trans is not None
        w = weights.traffic * trans.astype(np.float64) / tot  # [L-1, N, N]
        c[yid] = -np.broadcast_to(w[..., None], yid.shape)
        offset += float(w.sum())
    if nz:
        assert trans is not None
        zid = (nx + L + ny + np.arange(nz)).reshape(len(pairs), M)
        l, a, b = pairs.T
        node_g = np.arange(G).reshape(M, n)
        for layer, e in ((l, a), (l + 1, b)):  # zn <= sum_{g in node} x[layer, e, g]
            xs = xid[layer[:, None, None], e[:, None, None], node_g[None, :, :]]  # [Z, M, n]
            rows = np.arange(nz).reshape(len(pairs), M)
            add(np.concatenate([rows.reshape(-1), np.repeat(rows.reshape(-1), n)]),
                np.concatenate([zid.reshape(-1), xs.reshape(-1)]),
                np.concatenate([np.ones(nz), -np.ones(nz * n)]), np.full(nz, -INF), np.zeros(nz))
        wn = weights.node * trans[l, a, b].astype(np.float64) / tot
        c[zid] = -wn[:, None]
        offset += float(wn.sum())
    return Milp(c, offset, lb, ub, nx, ny, nz, np.concatenate(R), np.concatenate(C), np.concatenate(V),
                np.concatenate(lo), np.concatenate(hi))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence output written straight to file descriptor 1 by native solver libraries."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _x_from(values: np.ndarray, L: int, N: int, G: int) -> np.ndarray:
    return np.round(values[:L * N * G]).reshape(L, N, G)


def _start_vector(model: Milp, stats: RoutingStats, hint: Placement, G: int, M: int) -> np.ndarray:
    """The warm start as a full column vector (y, M, zn at their best values for that x)."""
    L, N = stats.load.shape
    gpu = canonical_gpu(hint)
    x = np.zeros((L, N, G))
    x[np.arange(L)[:, None], np.arange(N)[None, :], gpu] = 1.0
    v = np.zeros(model.num_cols)
    v[:model.nx] = x.reshape(-1)
    v[model.nx:model.nx + L] = np.einsum("le,leg->lg", stats.load.astype(np.float64), x).max(1)
    if model.ny:
        v[model.nx + L:model.nx + L + model.ny] = (x[:-1, :, None, :] * x[1:, None, :, :]).reshape(-1)
    if model.nz:
        assert stats.transitions is not None
        l, a, b = np.argwhere(stats.transitions > 0).T
        on_node = x.reshape(L, N, M, G // M).sum(axis=3)
        v[model.num_cols - model.nz:] = np.minimum(on_node[l, a], on_node[l + 1, b]).reshape(-1)
    return v


def solve_milp(stats: RoutingStats, num_gpus: int, num_nodes: int = 1, *, backend: str = "highs",
               weights: Weights = Weights(), time_limit: float = 60.0,
               hint: Placement | None = None, threads: int = 2) -> ExactResult:
    """Solve the placement MILP with HiGHS or CBC within ``time_limit`` seconds (building
    included); the result is never worse than ``hint``."""
    if backend not in ("highs", "cbc"):
        raise InputError("solve", "--method", f"unknown MILP backend {backend!r}",
                         "use ilp-cbc or ilp-highs")
    check_split(stats, num_gpus, num_nodes)
    t0 = time.perf_counter()
    deadline = time.monotonic() + time_limit
    L, N = stats.load.shape
    G, M = num_gpus, num_nodes
    model = build_milp(stats, G, M, weights)
    start = _start_vector(model, stats, hint, G, M) if hint is not None else None
    left = deadline - time.monotonic()
    if left <= 0.05:
        return keep_better(stats, ExactResult(None, "time limit", None, None, 0.0), hint,
                           weights, f"ilp-{backend}", t0)
    run = _run_highs if backend == "highs" else _run_cbc
    status, values, bound = run(model, left, start, threads)
    if values is None:
        res = ExactResult(None, status, None, None, 0.0)
    else:
        plc = placement_from(_x_from(values, L, N, G), G, M, f"ilp-{backend}")
        res = ExactResult(plc, status, None, None if bound is None else bound + model.offset,
                          0.0)
    return keep_better(stats, res, hint, weights, f"ilp-{backend}", t0)


def _run_highs(model: Milp, seconds: float, start: np.ndarray | None, threads: int
               ) -> tuple[str, np.ndarray | None, float | None]:
    import highspy

    with quiet_stdout():  # the library prints a banner from C++ on creation
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(seconds))
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("random_seed", 0)
    n = model.num_cols
    h.addVars(n, model.lb, np.minimum(model.ub, highspy.kHighsInf))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), model.c)
    h.changeColsIntegrality(model.nx, np.arange(model.nx, dtype=np.int32),
                            np.full(model.nx, highspy.HighsVarType.kInteger))
    starts, idx, vals = model.csr()
    inf = highspy.kHighsInf
    h.addRows(len(model.row_lo), np.maximum(model.row_lo, -inf), np.minimum(model.row_hi, inf),
              len(vals), starts, idx, vals)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(start)
        sol.value_valid = True
        h.setSolution(sol)
    # HiGHS checks its own limit only between some phases: the hard stop is cancelSolve.
    if run_stoppable(h.run, h.cancelSolve, time.monotonic() + seconds + 0.5, "highs") is None:
        return "time limit", None, None  # still winding down: do not touch its state
    ms = h.getModelStatus()
    info = h.getInfo()
    status = {highspy.HighsModelStatus.kOptimal: "optimal",
              highspy.HighsModelStatus.kTimeLimit: "time limit",
              highspy.HighsModelStatus.kInterrupt: "time limit",
              highspy.HighsModelStatus.kInfeasible: "infeasible"}.get(ms, "time limit")
    has_sol = info.primal_solution_status == 2
    values = np.asarray(h.getSolution().col_value) if has_sol else None
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    if status == "optimal" and has_sol:
        bound = float(info.objective_function_value)
    return status, values, bound


def _write_mps(model: Milp, path: str) -> None:
    """Free-format MPS with columns x0.. and rows r0.. (CBC reads it; names map back by index)."""
    order = np.lexsort((model.rows, model.cols))
    rows, cols, vals = model.rows[order], model.cols[order], model.vals[order]
    lo, hi = model.row_lo, model.row_hi
    sense = np.where(lo == hi, "E", np.where(lo <= -INF, "L", "G"))
    with open(path, "w") as f:
        f.write("NAME moeplace\nROWS\n N obj\n")
        f.writelines(f" {s} r{i}\n" for i, s in enumerate(sense))
        f.write("COLUMNS\n")
        bounds = np.searchsorted(cols, np.arange(model.num_cols + 1)).tolist()
        cost, lbs, ubs = model.c.tolist(), model.lb.tolist(), model.ub.tolist()
        int_open = False
        for j in range(model.num_cols):
            if j == 0 and model.nx:
                f.write(" M1 'MARKER' 'INTORG'\n")
                int_open = True
            if j == model.nx and int_open:
                f.write(" M2 'MARKER' 'INTEND'\n")
                int_open = False
            s, e = bounds[j], bounds[j + 1]
            if cost[j]:
                f.write(f" x{j} obj {cost[j]!r}\n")
            f.writelines(f" x{j} r{r} {v!r}\n" for r, v in zip(rows[s:e].tolist(),
                                                               vals[s:e].tolist(), strict=True))
            if s == e and not cost[j]:
                f.write(f" x{j} obj 0\n")
        if int_open:
            f.write(" M2 'MARKER' 'INTEND'\n")
        f.write("RHS\n")
        rhs = np.where(sense == "L", hi, lo)
        f.writelines(f" rhs r{i} {v!r}\n" for i, v in enumerate(rhs.tolist()) if v)
        f.write("BOUNDS\n")
        for j in range(model.num_cols):
            lb, ub = lbs[j], ubs[j]
            if ub >= INF:
                if lb:
                    f.write(f" LO bnd x{j} {lb!r}\n")
                continue
            if lb == ub:
                f.write(f" FX bnd x{j} {lb!r}\n")
            else:
                f.write(f" UP bnd x{j} {ub!r}\n")
                if lb:
                    f.write(f" LO bnd x{j} {lb!r}\n")
        f.write("ENDATA\n")


def _cbc_path() -> str:
    import pulp

    return str(pulp.PULP_CBC_CMD().path)


def _run_cbc(model: Milp, seconds: float, start: np.ndarray | None, threads: int
             ) -> tuple[str, np.ndarray | None, float | None]:
    t_start = time.monotonic()
    # A signal that ends the process before this unwinds removes the model files too.
    with tempfile.TemporaryDirectory(prefix="moeplace-cbc-") as tmp, on_interrupt(
            cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        mps, sol, mst = (os.path.join(tmp, f) for f in ("m.mps", "m.sol", "m.mst"))
        _write_mps(model, mps)
        args = [_cbc_path(), mps]
        if start is not None:
            with open(mst, "w") as f:
                f.write("Stopped on time - objective value 0\n")
                f.writelines(f"{j} x{j} {v!r} 0\n" for j, v in enumerate(start.tolist()))
            args += ["-mips", mst]
        left = seconds - (time.monotonic() - t_start)
        # CBC's own limit, a little early so it writes its incumbent before we would kill it.
        args += ["-sec", f"{max(left - 1.0, 0.5):.2f}", "-threads", str(threads), "-solve",
                 "-solution", sol]
        # Its own session: Ctrl-C reaches us, not CBC, and we stop it ourselves.
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            run_stoppable(proc.wait, proc.kill, time.monotonic() + max(left, 0.5), "cbc")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(STOP_GRACE_S)
        if not os.path.exists(sol):
            return "time limit", None, None
        with open(sol) as f:
            head = f.readline().lower()
            values = np.zeros(model.num_cols)
            for line in f:
                parts = line.split()
                if parts and parts[0] == "**":
                    parts = parts[1:]
                if len(parts) >= 3 and parts[1].startswith("x"):
                    values[int(parts[1][1:])] = float(parts[2])
    if head.startswith("optimal"):
        return "optimal", values, float(values @ model.c)
    if "infeasible" in head and "objective" not in head:
        return "infeasible", None, None
    if "objective value" in head:
        return "time limit", values, None
    return head.strip() or "unknown", None, None

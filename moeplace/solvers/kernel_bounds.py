"""Lower bounds on what a dispatch kernel pays, for every placement: copies per token and MoE
layer by ``solvers.dispatch``'s counting rules, and the priced dispatch and combine time.

**What is bounded.** Homes are uniform over the G ranks and independent of routing (the static
objective's assumption, and ``dispatch.simulate``'s: every rank sends as many tokens, routed
apart from their rank). For each MoE layer: the expected NVLink copies, RDMA (network) copies
and their sum that one token costs, averaged over the statistics' token sample
(``RoutingStats.token_sample``, the tokens the objective's static terms are measured on).
n ranks per node, M nodes, S slots per rank; one layer at a time.

**Each kernel's expected copies** for a token whose chosen copies lie on the ranks U (D = |U|
ranks in D' nodes), from the rules in ``dispatch.py`` (h: the home rank):

- ``alltoall``: NVLink |{g in U: g != h, node(g) = node(h)}|, RDMA |{g in U: node(g) !=
  node(h)}|. A given g is h with chance 1/G and another rank of h's node with chance (n-1)/G:
  NVLink D (n-1)/G, RDMA D (1 - 1/M), together D (1 - 1/G), which is ``traffic_static``.
- ``deepep-normal`` / ``deepep-v2``: one RDMA copy per remote node, D' (1 - 1/M), which is
  ``traffic_static_remote_nodes``; one NVLink copy per destination rank other than its node's
  entry rank, the rank with h's local index (in h's node, h itself): |{g in U: g mod n !=
  h mod n}|, with h mod n uniform over n: D (1 - 1/n). On one node this is alltoall's count.
- ``deepep-ll``: one copy per selection whose rank is not h: k (n-1)/G NVLink and k (1 - 1/M)
  RDMA copies whatever the placement, so without replicas the bound is the value
  (``CopyBound.exact``) and only balance is left to optimise.

Without replicas these are linear in D and D' with nonnegative coefficients, so the per-layer
lower bounds on the mean D and D' of ``bounds.distinct_bound`` carry over unchanged.

**Any copy.** With replicas a token may use any copy of an expert (the evaluator takes the one
on its rank, else one on its node); every bound below holds for the cheapest choice, so for
every rule, and without replicas as well:

- ``deepep-ll``: a selection of e costs a copy unless e has a copy on h, an RDMA copy unless
  e has one on h's node: expected ``1 - g_e/G`` and ``1 - m_e/M`` (g_e ranks and m_e nodes
  hold e). Over tokens that is the mean selections less ``sum_e sel_e g_e / (T G)``, smallest
  when the R extra copies go to the most selected experts, up to G ranks (M nodes) each
  (``_most_weight``). Dealing copies round-robin over ranks (nodes) realises either optimum, so
  these two are the minima with replicas too; NVLink copies are only bounded by 0 there (a
  token may take a copy on another node).
- capacity, the other kernels: a rank holds at most S of a token's experts (a node n S).
  ``alltoall``: the experts without a copy on h need ceil((k - c_h) / S) remote ranks, and those
  without one on h's node ceil((k - a) / S) ranks on other nodes (RDMA). ``deepep-normal``:
  ceil((k - a) / (n S)) remote nodes (RDMA), and the experts without a copy in h's column (the
  M entry ranks with h's local index) ceil((k - c) / S) NVLink copies. The home's part (rank,
  node or column) is uniform over the P parts and the token's copies over all parts number at
  most ``C_t = sum_e g_e`` (m_e for nodes), so its expected count is at least ``phi(C_t)``, the
  least mean of ``ceil((k - c_p) / u)`` over ``0 <= c_p <= cap`` with ``sum_p c_p <= C_t``
  (a small knapsack, ``_spread_floor``). phi's lower convex envelope is convex and
  nonincreasing, so by Jensen the mean over tokens is at least the envelope at the largest
  possible mean ``C_t`` (the greedy ``_most_weight`` of the experts' token counts).

**Priced time** (``priced_bound``): ``dispatch.price`` gives each rank ``alpha + f(x, y)``
with x, y its NVLink and RDMA copies (the larger of sent and received) times the bytes of one
copy, ``f = max(x/B1, y/B2)`` for the normal kernels and ``x/B1 + y/B2`` (+ ``beta log2 M``) for
alltoall and the low-latency kernels. f is nondecreasing in both counts (B > 0) and convex (a
max or a sum of linear maps), so the slowest rank >= the mean rank >= the price at the mean
counts (Jensen) >= the price at (copies sent / G) (monotone; max(sent, received) >= sent). For
steps of B tokens drawn from the sample with uniform homes the expected slowest rank is then at
least the price of B / G times the expected copies per token (Jensen once more), and so at least
the least price of any copies meeting the three bounds, a two-variable LP solved in closed form
(``_least_price``). Under ``deepep-ll`` without replicas the busiest rank does better: it
receives every selection of its experts whose token lives on another rank of its node (chance
(n-1)/G) over NVLink, on another node ((G-n)/G) over RDMA, and its expected price is at least
the price of those expected receptions (Jensen; max(sent, received) >= received); some rank
serves at least ``bounds.load_bound``'s share of the selections, and E[slowest] >= the busiest
rank's expected price. ``tests/solvers/test_bounds.py`` checks all of this by enumeration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers.bounds import load_bound
from moeplace.solvers.dispatch import bytes_per_token, check_kernel, kernel_params, volumes

__all__ = ["CopyBound", "copy_bound", "placement_copies", "priced_bound"]


@dataclass(frozen=True)
class CopyBound:
    """Per MoE layer (``[L]`` each), lower bounds on a token's expected copies under
    ``kernel``: ``nvlink``, ``rdma`` and ``copies`` (their sum; at least ``nvlink + rdma``, and
    sometimes more: the two parts cannot be cheapest at once). ``exact``: every placement pays
    exactly these (``deepep-ll`` without replicas); then ``busiest`` bounds the selections per
    token the busiest rank serves (``bounds.load_bound`` on the sample's selections), which
    ``priced_bound`` turns into received copies."""

    kernel: str
    nvlink: np.ndarray
    rdma: np.ndarray
    copies: np.ndarray
    exact: bool = False
    # deepep-ll without replicas: per layer, a lower bound on the busiest rank's share of the
    # selections times the mean selections per token (max_g sum over its experts of sel_e / T)
    busiest: np.ndarray | None = None

    def as_dict(self) -> dict[str, float]:
        """Means over layers, under the names ``dispatch.simulate`` reports."""
        def mean(x: np.ndarray) -> float:
            return float(x.mean()) if x.size else 0.0

        return {"nvlink_copies_per_token": mean(self.nvlink),
                "rdma_copies_per_token": mean(self.rdma),
                "copies_per_token": mean(self.copies)}


def _most_weight(weight: np.ndarray, extra: int, cap: int) -> float:
    """``max sum_e weight_e c_e`` over whole ``1 <= c_e <= cap`` with ``sum_e (c_e - 1) <=
    extra`` (weights >= 0): the extra copies to the heaviest experts first (a knapsack of unit
    items, so greedy is optimal)."""
    w = np.sort(np.asarray(weight, np.float64))[::-1]
    total = float(w.sum())
    if cap <= 1 or extra <= 0 or w.size == 0:
        return total
    full, rest = divmod(int(extra), cap - 1)
    total += (cap - 1) * float(w[:full].sum())
    if full < w.size:
        total += rest * float(w[full])
    return total


@functools.lru_cache(maxsize=256)
def _spread_table(parts: int, cap: int, unit: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The lower convex envelope of ``phi(C)`` (see the module docstring) at its breakpoints:
    ``(C values, phi values)``, C from 0 to ``parts * min(cap, k)`` (phi is flat beyond)."""
    c_max = min(cap, k)  # more than k of a token's experts on one part saves nothing more
    f = np.array([max(0, -(-(k - c) // unit)) for c in range(c_max + 1)], np.float64)
    best = np.array([0.0])  # best[j]: least sum of f over the parts so far using j copies
    for _ in range(parts):
        new = np.full(best.size + c_max, np.inf)
        for c in range(c_max + 1):
            new[c:c + best.size] = np.minimum(new[c:c + best.size], best + f[c])
        best = new
    phi = np.minimum.accumulate(best) / parts  # "at most C copies": a prefix minimum
    hull: list[tuple[float, float]] = []
    for x, y in enumerate(phi.tolist()):  # lower convex chain, x increasing
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append((float(x), y))
    xs, ys = zip(*hull, strict=True)
    return np.array(xs), np.array(ys)


def _spread_floor(parts: int, cap: int, unit: int, k: int, budget: float) -> float:
    """Lower bound on the mean over tokens of ``mean_p ceil((k - c_p) / unit)`` (at least 0)
    when each part holds at most ``cap`` of a token's experts and the tokens' copies over all
    parts average at most ``budget`` (the envelope of ``phi`` at ``budget``)."""
    if k <= 0 or parts <= 0:
        return 0.0
    xs, ys = _spread_table(int(parts), int(cap), int(unit), int(k))
    return float(np.interp(min(max(budget, 0.0), xs[-1]), xs, ys))


def _distinct_rows(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted rows and the mask of each row's first occurrences."""
    srt = np.sort(e, axis=1)
    first = np.ones_like(srt, bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return srt, first


def _check_shape(where: str, N: int, G: int, M: int, R: int) -> tuple[int, int]:
    """``(S, n)`` of the cluster, or one ``InputError``."""
    for name, v, lo in (("num_gpus", G, 1), ("num_nodes", M, 1), ("replicas", R, 0),
                        ("num_experts", N, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise InputError(where, name, f"{v!r} is not an integer >= {lo}",
                             "pass the cluster's counts")
    if G % M or (N + R) % G or G > N + R:
        raise InputError(where, "num_gpus", f"{G} GPUs in {M} nodes do not hold {N} experts + "
                         f"{R} replicas in equal slots", "use M dividing G and G dividing N + R")
    return (N + R) // G, G // M


def copy_bound(sample: np.ndarray, num_experts: int, kernel: str, num_gpus: int,
               num_nodes: int = 1, replicas: int = 0,
               distinct: tuple[np.ndarray, np.ndarray] | None = None) -> CopyBound:
    """Lower bounds on the copies per token and MoE layer that ``kernel`` sends, for every
    placement of ``num_experts`` experts (+ ``replicas`` copies per layer) on ``num_gpus``
    ranks in ``num_nodes`` nodes, homes uniform; the proofs are in the module docstring.

    ``sample [T, L, k]``: the tokens' experts (``RoutingStats.token_sample``). ``distinct``:
    per-layer lower bounds on the mean distinct GPUs and nodes of a token
    (``bounds.distinct_bound``, no replicas only), which tighten every kernel but deepep-ll.
    """
    check_kernel(kernel, "--dispatch")
    N, G, M, R = num_experts, num_gpus, num_nodes, replicas
    S, n = _check_shape("copy_bound", N, G, M, R)
    e_all = np.asarray(sample)
    if e_all.ndim != 3 or e_all.dtype.kind not in "iu":
        raise InputError("copy_bound", "sample", f"shape {e_all.shape} ({e_all.dtype}) is not "
                         "integer [tokens, layers, k]", "pass RoutingStats.token_sample")
    T, L, _k = e_all.shape
    if T and (int(e_all.min()) < 0 or int(e_all.max()) >= N):
        raise InputError("copy_bound", "sample", f"expert ids outside 0..{N - 1}",
                         "pass the statistics' own token sample")
    if distinct is not None:
        if R:
            raise InputError("copy_bound", "distinct", f"{R} replicas: the distinct-GPU bound "
                             "covers placements with each expert once", "pass distinct=None")
        if any(np.shape(d) != (L,) for d in distinct):
            raise InputError("copy_bound", "distinct", "not one value per layer",
                             "pass bounds.distinct_bound's two [L] arrays")
    nvl, net, cop, busiest = np.zeros(L), np.zeros(L), np.zeros(L), np.zeros(L)
    if T == 0:
        return CopyBound(kernel, nvl, net, cop, exact=False)
    for l in range(L):
        e = e_all[:, l, :].astype(np.int64)
        srt, first = _distinct_rows(e)
        k = int(first.sum(axis=1).min())  # fewest distinct experts of a token
        if kernel == "deepep-ll":
            sel = np.bincount(e.ravel(), minlength=N).astype(np.float64)  # with multiplicity
            mean_sel = float(sel.sum()) / T
            cop[l] = mean_sel - _most_weight(sel, R, G) / (T * G)
            net[l] = mean_sel - _most_weight(sel, R, M) / (T * M)
            nvl[l] = cop[l] - net[l] if R == 0 else 0.0  # = k (n - 1) / G without replicas
            if R == 0:  # some rank serves at least the load bound's share of the selections
                busiest[l] = float(load_bound(sel[None], G, S, 0)[0]) * mean_sel / G
            continue
        load = np.bincount(srt[first], minlength=N).astype(np.float64)  # tokens per expert
        on_ranks = _most_weight(load, R, G) / T  # largest mean copies over ranks per token
        on_nodes = _most_weight(load, R, M) / T
        if R == 0:  # mean distinct GPUs and nodes: at least ceil(k / S), ceil(k / (n S))
            d = max(-(-k // S), float(distinct[0][l]) if distinct is not None else 0.0)
            dn = max(-(-k // (n * S)), float(distinct[1][l]) if distinct is not None else 0.0)
        if kernel == "alltoall":
            cop[l] = _spread_floor(G, S, S, k, on_ranks)
            net[l] = _spread_floor(M, n * S, S, k, on_nodes)
            if R == 0:
                cop[l] = max(cop[l], d * (1 - 1 / G))
                net[l] = max(net[l], d * (1 - 1 / M))
                nvl[l] = d * (n - 1) / G
        else:  # deepep-normal, deepep-v2 (one node: the same numbers as alltoall)
            net[l] = _spread_floor(M, n * S, n * S, k, on_nodes)
            nvl[l] = _spread_floor(n, M * S, S, k, on_ranks)
            if R == 0:
                net[l] = max(net[l], dn * (1 - 1 / M))
                nvl[l] = max(nvl[l], d * (1 - 1 / n))
        cop[l] = max(cop[l], nvl[l] + net[l])
    exact = kernel == "deepep-ll" and R == 0
    return CopyBound(kernel, nvl, net, cop, exact=exact, busiest=busiest if exact else None)


def placement_copies(sample: np.ndarray, placement: Placement, kernel: str,
                     max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([L], [L])``: the NVLink and RDMA copies per token that ``placement`` costs under
    ``kernel`` on ``sample [T, L, k]``, expected over a uniform home (the quantity
    ``copy_bound`` bounds). Without replicas exactly, by the closed forms of the module
    docstring; with replicas every home is tried with the evaluator's copy rule (on its rank,
    else on its node, else round-robin; ``evaluator._Resolver``), on the first ``max_tokens``
    tokens (default: 4,096 token-home pairs per layer, at least 256 tokens)."""
    from moeplace.solvers.evaluator import _Resolver

    check_kernel(kernel, "--dispatch")
    e_all = np.asarray(sample)
    L = placement.num_layers
    if e_all.ndim != 3 or e_all.shape[1] != L:
        raise InputError("placement_copies", "sample", f"shape {e_all.shape} is not [tokens, "
                         f"{L} layers, k]", "pass the statistics' token sample")
    G, n = placement.num_gpus, placement.gpus_per_node
    M = G // n
    T = e_all.shape[0]
    nvl, net = np.zeros(L), np.zeros(L)
    if T == 0:
        return nvl, net
    if placement.num_replicas == 0:
        gpu = placement.expert_gpu()
        for l in range(L):
            g = gpu[l][e_all[:, l, :].astype(np.int64)]
            d = _distinct_rows(g)[1].sum(axis=1).mean()
            dn = _distinct_rows(g // n)[1].sum(axis=1).mean()
            k = g.shape[1]
            if kernel == "deepep-ll":
                nvl[l], net[l] = k * (n - 1) / G, k * (1 - 1 / M)
            elif kernel == "alltoall":
                nvl[l], net[l] = d * (n - 1) / G, d * (1 - 1 / M)
            else:
                nvl[l], net[l] = d * (1 - 1 / n), dn * (1 - 1 / M)
        return nvl, net
    # Every home of every token: keep the pairs per layer near 4,096 (about 10 ms each).
    e_all = e_all[:max(256, 4096 // G) if max_tokens is None else max_tokens].astype(np.int64)
    T = e_all.shape[0]
    res = _Resolver(placement)
    homes = np.repeat(np.arange(G), T)
    for l in range(L):
        g = res.layer(l, np.tile(e_all[:, l, :], (G, 1)), homes)
        vol = volumes(g, homes, G, n, kernel)
        nvl[l], net[l] = float(vol.nvl_copies.mean()), float(vol.net_copies.mean())
    return nvl, net


def _least_price(kernel: str, c1: float, c2: float, x: float, y: float, t: float) -> float:
    """Least of ``max(c1 X, c2 Y)`` (normal kernels) or ``c1 X + c2 Y`` (alltoall,
    low-latency) over ``X >= x, Y >= y, X + Y >= t`` (c1, c2 > 0): the LP's closed form."""
    if kernel in ("deepep-ll", "alltoall"):
        # Fill the rest of t on the cheaper link.
        if c1 <= c2:
            return c1 * max(x, t - y) + c2 * y
        return c1 * x + c2 * max(y, t - x)
    # max(c1 X, c2 Y) <= z allows X = z / c1, Y = z / c2, so X + Y >= t needs z >= t / (1/c1 + 1/c2).
    return max(c1 * x, c2 * y, t / (1.0 / c1 + 1.0 / c2))


def priced_bound(bound: CopyBound, hw: Any, hidden: int, tokens_per_step: int,
                 num_gpus: int, num_nodes: int = 1) -> tuple[float, float]:
    """Lower bounds, in microseconds, on the slowest rank's time of one dispatch and one combine
    of a MoE layer (mean over layers: ``dispatch_us``, ``combine_us`` of ``evaluate
    --dispatch``), expected over steps of ``tokens_per_step`` tokens drawn from the sample with
    uniform homes, priced by ``dispatch.price`` on the profile ``hw`` for ``hidden``-wide tokens.
    The proof (monotone, convex pricing) is in the module docstring."""
    for name, v in (("hidden", hidden), ("tokens_per_step", tokens_per_step),
                    ("num_gpus", num_gpus), ("num_nodes", num_nodes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError("priced_bound", name, f"{v!r} is not an integer >= 1",
                             "pass a positive integer")
    kernel = bound.kernel
    G, M = num_gpus, num_nodes
    per_rank = tokens_per_step / G  # tokens a rank sends per step, on average
    out = []
    for stage in ("dispatch", "combine"):
        p = kernel_params(hw, kernel, stage)
        gb = bytes_per_token(kernel, hidden, stage) / 1e9
        ll = kernel == "deepep-ll"
        c1 = gb / p["intra_gbps" if ll else "nvlink_gbps"]  # seconds per NVLink copy
        c2 = gb / p["inter_gbps" if ll else "rdma_gbps"]  # per RDMA copy
        fixed = p["alpha_us"] * 1e-6 + (p["beta_us"] * 1e-6 * math.log2(max(M, 1)) if ll else 0.0)
        layers = [fixed + _least_price(kernel, c1, c2, per_rank * x, per_rank * y, per_rank * t)
                  for x, y, t in zip(bound.nvlink, bound.rdma, bound.copies, strict=True)]
        if bound.busiest is not None:
            # deepep-ll: the busiest rank receives each of its selections whose token lives on
            # another rank of its node (chance (n - 1)/G) over NVLink, on another node
            # ((G - n)/G) over RDMA; max(sent, received) >= received, and the slowest rank is
            # at least the busiest one's expected price.
            n = G // M
            recv = tokens_per_step * bound.busiest
            layers = [max(t, fixed + r * (c1 * (n - 1) + c2 * (G - n)) / G)
                      for t, r in zip(layers, recv, strict=True)]
        out.append(1e6 * float(np.mean(layers)) if layers else 0.0)
    return out[0], out[1]

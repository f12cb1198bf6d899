"""Baseline placements: contiguous, round-robin, random, and DeepSeek's EPLB in two variants.

``eplb`` is DeepSeek's expert-parallelism load balancer (``rebalance_experts``) as vLLM's
``default`` policy and SGLang's ``deepseek`` algorithms run it, re-implemented here from its
published description:

* policy: hierarchical when ``num_groups % num_nodes == 0``, otherwise global (one node, one
  group). The stacks pass the model's ``n_group``; models without expert groups get 1, so on
  several nodes they run the global policy;
* hierarchical step 1: expert groups (contiguous id ranges), heaviest first, each to the lightest
  node that still has room for ``num_groups / num_nodes`` groups (``balanced_packing``);
* step 2 (inside each node, or over all experts): each extra slot goes to the expert with the
  largest load per copy (``replicate_experts``);
* step 3: the copies, heaviest first, each to the lightest GPU of its node with a free slot.
  Nothing stops two copies of one expert from landing on one GPU, and the stacks load such
  layouts as they are; the placement records it (``Placement.colocated``).

Arithmetic as vLLM 0.34.0's ``DefaultEplbPolicy`` does it: loads rounded to single precision
(its ``weight.float()``), group sums in single precision, loads per copy and pack sums in double
precision, ties to the lowest index. On loads without ties (no two equal group sums, loads per
copy or pack sums at a choice) the layout equals vLLM 0.34.0's default policy and SGLang
0.5.23's ``auto`` choice (``deepseek_hierarchical`` where ``num_groups`` divides over nodes,
``deepseek`` otherwise) slot for slot (``tests/integrations/test_engine_oracle.py`` runs both
engines' code). With ties, which real routing counts have, the engines' unstable sorts may
order equal items differently from this, so the expert sets on each GPU can differ while each
layer's max GPU load is the same.

``balanced_placement`` is a speed-aware start without replicas: greedy LPT of any per-expert
cost onto GPUs of unequal speed with exactly S slots each, then improving pairwise swaps.

``eplb_distinct`` is the rule-respecting variant moeplace's own solvers start from: the same
group and node steps, but copies of one expert always go to distinct GPUs and the replica
counts are chosen knowing that rule (a copy moves to another expert when that lowers the
layer's max GPU load).
"""

from __future__ import annotations

import heapq
import time
from abc import abstractmethod
from dataclasses import replace

import numpy as np

from moeplace.errors import InfeasibleError, InputError, TimeLimitError
from moeplace.models import KNOWN, guess_model
from moeplace.placement import Placement, contiguous, random_placement, round_robin
from moeplace.solvers.registry import (
    Cluster,
    MethodResult,
    SolveOptions,
    Solver,
    check_supported,
    get,
    names,
    register,
)
from moeplace.traces import RoutingStats

__all__ = ["balanced_packing", "balanced_placement", "baseline", "contiguous", "default_groups",
           "eplb", "eplb_distinct", "random_placement", "replica_counts", "replicate_experts",
           "round_robin"]

# The stacks round loads to float32 (``weight.float()``) and sum group loads in it; vLLM's
# loads per copy (float32 / int64) and both stacks' pack sums are float64.
_F = np.float32
_D = np.float64


def _loads(weight: np.ndarray) -> np.ndarray:
    """Loads as the stacks see them: rounded to float32, then computed on in float64."""
    return np.asarray(weight, _F).astype(_D)


# ---- DeepSeek's three greedy steps, one layer at a time --------------------------------------
def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items into ``num_packs`` packs of exactly ``n / num_packs`` items each: heaviest item
    first, each to the lightest pack with room (lowest index on ties).

    Returns ``(pack [n], rank [n])``: each item's pack and its position inside the pack.
    With one item per pack, item i goes to pack i (DeepSeek's shortcut). Float64 weights (the
    per-copy loads) are packed as they are, as vLLM packs them; others as ``_loads``.
    """
    w = np.asarray(weight)
    w = w.copy() if w.dtype == _D else _loads(w)
    n = w.shape[0]
    if n % num_packs:
        raise InfeasibleError(f"{n} items do not split evenly into {num_packs} packs")
    per = n // num_packs
    if per == 1:
        return np.arange(n), np.zeros(n, np.int64)
    pack = np.full(n, -1, np.int64)
    rank = np.full(n, -1, np.int64)
    pack_w = np.zeros(num_packs, _D)
    pack_n = np.zeros(num_packs, np.int64)
    for i in np.argsort(-w, kind="stable"):
        room = np.flatnonzero(pack_n < per)
        b = int(room[np.argmin(pack_w[room])])
        pack[i], rank[i] = b, pack_n[b]
        pack_w[b] += w[i]
        pack_n[b] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_slots`` copies of ``n`` experts: one each, then every extra slot to the expert with
    the largest load per copy. Returns ``(slot_expert [num_slots], count [n])``; slot i < n
    holds expert i, later slots hold the extras in the order they were chosen."""
    w = _loads(weight)
    n = w.shape[0]
    if num_slots < n:
        raise InfeasibleError(f"{num_slots} slots cannot hold {n} experts")
    slots = np.empty(num_slots, np.int64)
    slots[:n] = np.arange(n)
    cnt = np.ones(n, np.int64)
    for i in range(n, num_slots):
        e = int(np.argmax(w / cnt))
        slots[i] = e
        cnt[e] += 1
    return slots, cnt


def replica_counts(load: np.ndarray, num_slots: int, max_copies: int | None = None) -> np.ndarray:
    """``[N]`` copies per expert by EPLB's rule (each extra slot to the largest load per copy),
    never more than ``max_copies`` copies of one expert."""
    w = _loads(load)
    N = w.shape[0]
    cnt = np.ones(N, np.int64)
    cap = max_copies or num_slots
    if num_slots - N > N * (cap - 1):
        raise InfeasibleError(f"{num_slots} slots exceed {N} experts x {cap} GPUs")
    for _ in range(num_slots - N):
        per = np.where(cnt < cap, w / cnt, -np.inf)
        if not np.isfinite(per).any():
            raise InfeasibleError(f"{num_slots} slots exceed {N} experts x {cap} GPUs")
        cnt[int(np.argmax(per))] += 1
    return cnt


def _node_domains(load: np.ndarray, num_nodes: int, num_groups: int) -> list[np.ndarray]:
    """Experts of each node, in DeepSeek's order: the node's groups in the order they were
    packed, each group's experts in id order (``mlog`` order)."""
    N = load.shape[0]
    gsize = N // num_groups
    gload = load.astype(_F).reshape(num_groups, gsize).sum(axis=1, dtype=_F)
    pack, rank = balanced_packing(gload, num_nodes)
    per_node = num_groups // num_nodes
    order = np.empty(num_groups, np.int64)
    order[pack * per_node + rank] = np.arange(num_groups)
    return [np.concatenate([np.arange(g * gsize, (g + 1) * gsize)
                            for g in order[n * per_node:(n + 1) * per_node]])
            for n in range(num_nodes)]


def _deepseek_layer(load: np.ndarray, num_gpus: int, num_nodes: int, num_slots: int,
                    num_groups: int) -> np.ndarray:
    """One layer of ``rebalance_experts``: ``phy2log [num_slots]``."""
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # DeepSeek's global policy
    gpn = num_gpus // num_nodes
    per_gpu = num_slots // num_gpus
    row = np.empty(num_slots, np.int64)
    slots_node = num_slots // num_nodes
    for n, experts in enumerate(_node_domains(load, num_nodes, num_groups)):
        w = _loads(load[experts])
        slot_e, cnt = replicate_experts(w, slots_node)
        copy_w = (w / cnt)[slot_e]
        pack, rank = balanced_packing(copy_w, gpn)
        local = np.empty(slots_node, np.int64)
        local[pack * per_gpu + rank] = slot_e
        row[n * slots_node:(n + 1) * slots_node] = experts[local]
    return row


# ---- the rule-respecting variant ------------------------------------------------------------
def _pack_distinct(counts: np.ndarray, w: np.ndarray, num_bins: int, cap: int
                   ) -> tuple[list[list[int]], float] | None:
    """Copies (heaviest first) onto the lightest bin with room that lacks that expert;
    ``None`` when the greedy gets stuck."""
    items = np.repeat(np.arange(len(counts)), counts)
    cw = (w / np.maximum(counts, 1))[items]
    order = np.argsort(-cw, kind="stable")
    # _distinct_domain calls this hundreds of times a layer, so the choice runs on plain Python
    # floats (the same float64 sums) with a heap of the bins with room keyed (load, bin): its
    # top that lacks the expert is the lightest such bin, lowest index on ties, as an argmin
    # over them would pick. (One numpy call per copy made eplb-distinct of DeepSeek-V3's shape,
    # 58 layers x 264 slots, take 10 CPU s.)
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    has: list[set[int]] = [set() for _ in range(num_bins)]
    load = [0.0] * num_bins
    heap = [(0.0, b) for b in range(num_bins)] if cap > 0 else []
    for e, c in zip(items[order].tolist(), cw[order].tolist(), strict=True):
        skipped = []
        while heap and e in has[heap[0][1]]:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        _, b = heapq.heappop(heap)
        for entry in skipped:
            heapq.heappush(heap, entry)
        bins[b].append(e)
        has[b].add(e)
        load[b] += c
        if len(bins[b]) < cap:
            heapq.heappush(heap, (load[b], b))
    return bins, max(load)


def _distinct_domain(w: np.ndarray, num_bins: int, cap: int, rounds: int = 8
                     ) -> list[list[int]]:
    """Experts with loads ``w`` on ``num_bins`` GPUs of ``cap`` slots, copies on distinct GPUs.

    Start from EPLB's counts capped at one copy per GPU, then move single copies from one
    expert to another while that lowers the max GPU load: with the rule in force, a spare copy
    of a light expert can fill a GPU that would otherwise need a second copy of a heavy one.
    """
    n = w.shape[0]
    counts = replica_counts(w, num_bins * cap, max_copies=num_bins)
    best = _pack_distinct(counts, w, num_bins, cap)
    floor = float(w.sum()) / num_bins  # no layout beats a perfectly even split
    for _ in range(rounds if n < num_bins * cap else 0):
        if best is not None and best[1] <= floor * (1 + 1e-9):
            break
        donors = np.flatnonzero(counts > 1)
        donors = donors[np.argsort(w[donors] / counts[donors], kind="stable")][:6]
        takers = np.flatnonzero(counts < num_bins)
        per = w[takers] / (counts[takers] + 1)
        takers = np.unique(np.r_[takers[np.argsort(w[takers], kind="stable")][:4],
                                 takers[np.argsort(-per, kind="stable")][:4]])
        cur = np.inf if best is None else best[1]
        found = None
        for d in donors:
            for t in takers:
                if t == d:
                    continue
                c = counts.copy()
                c[d] -= 1
                c[t] += 1
                res = _pack_distinct(c, w, num_bins, cap)
                if res is not None and res[1] < cur - 1e-9:
                    cur, found = res[1], (c, res)
        if found is None:
            break
        counts, best = found
    if best is None:
        raise InfeasibleError(f"copies of one expert cannot all go to distinct GPUs "
                              f"({n} experts on {num_bins} GPUs x {cap} slots)")
    return best[0]


# ---- entry points ---------------------------------------------------------------------------
def _check(load: np.ndarray, num_gpus: int, num_nodes: int, replicas: int) -> tuple[int, int, int]:
    if load.ndim != 2:
        raise InputError("eplb", "load", f"shape {load.shape} is not [layers, experts]",
                         "pass per-layer expert loads")
    L, N = load.shape
    P = N + replicas
    if replicas < 0 or num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes or P % num_gpus:
        raise InfeasibleError(f"{N} experts + {replicas} replicas do not split evenly over "
                              f"{num_gpus} GPUs in {num_nodes} nodes")
    return L, N, P


def resolve_groups(num_groups: int | None, num_experts: int, num_nodes: int) -> int:
    """The group count EPLB runs with: the model's ``n_group`` when known, else 1 (what vLLM
    passes for models without expert groups; SGLang's ``None`` means the same global policy)."""
    g = 1 if num_groups is None else int(num_groups)
    if g < 1:
        raise InputError("eplb", "--groups", f"{g} < 1", "pass the model's n_group (>= 1)")
    if g % num_nodes == 0 and num_experts % g:
        raise InputError("eplb", "--groups", f"{num_experts} experts do not split into {g} "
                         "groups", "pass the model's n_group (a divisor of the expert count)")
    return g


# Baselines up to this many expert slots over all layers always finish: their deadline guards
# against huge inputs, and a small one (EPLB-distinct of 8 layers x 68 slots: 0.8 CPU s) cut
# short on a busy machine only turned a solve into exit 2 or dropped a comparison.
ALWAYS_FINISH_SLOTS = 1024


def _guard(deadline: float | None, L: int, P: int) -> float | None:
    return None if L * P <= ALWAYS_FINISH_SLOTS else deadline


def _check_deadline(deadline: float | None, what: str, l: int, L: int) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimitError(f"{what} stopped at the time limit after {l} of {L} layers "
                             "(raise --time-limit)")


def eplb(load: np.ndarray, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
         num_groups: int | None = None, deadline: float | None = None) -> Placement:
    """DeepSeek EPLB (``rebalance_experts``) on per-layer loads ``[L, N]`` with ``replicas``
    extra slots per layer, as vLLM and SGLang run it.

    ``num_groups`` is the model's ``n_group`` (default 1: no expert groups). The hierarchical
    policy runs when it divides evenly over nodes, else the global one. Two copies of one
    expert may share a GPU; the placement then has ``colocated=True``. ``deadline``
    (``time.monotonic()``) raises ``TimeLimitError`` between layers once passed, on inputs of
    more than ``ALWAYS_FINISH_SLOTS`` slots over all layers.
    """
    load = np.asarray(load)
    L, N, P = _check(load, num_gpus, num_nodes, replicas)
    deadline = _guard(deadline, L, P)
    g = resolve_groups(num_groups, N, num_nodes)
    layers = []
    for l in range(L):
        _check_deadline(deadline, "EPLB", l, L)
        layers.append(_deepseek_layer(load[l], num_gpus, num_nodes, P, g))
    rows = np.stack(layers)
    per = rows.reshape(L, num_gpus, P // num_gpus)
    srt = np.sort(per, axis=2)
    colocated = bool((srt[:, :, 1:] == srt[:, :, :-1]).any()) if per.shape[2] > 1 else False
    policy = "hierarchical" if g % num_nodes == 0 and num_nodes > 1 else "global"
    return Placement(rows, num_gpus, num_nodes, N, colocated=colocated,
                     info={"method": "eplb", "num_groups": g, "policy": policy})


def eplb_distinct(load: np.ndarray, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
                  num_groups: int | None = None, deadline: float | None = None) -> Placement:
    """EPLB that never puts two copies of one expert on one GPU, with replica counts chosen
    knowing that rule; groups and nodes as in ``eplb``."""
    load = np.asarray(load)
    L, N, P = _check(load, num_gpus, num_nodes, replicas)
    deadline = _guard(deadline, L, P)
    if P // num_gpus > N:
        raise InfeasibleError("more slots per GPU than distinct experts")
    g = resolve_groups(num_groups, N, num_nodes)
    M = num_nodes if g % num_nodes == 0 else 1
    G_dom = num_gpus // M
    S = P // num_gpus
    if N // M < S:  # a node's experts cannot fill a GPU with distinct ones: balance globally
        M, G_dom = 1, num_gpus
    rows = []
    for l in range(L):
        _check_deadline(deadline, "EPLB (distinct copies)", l, L)
        w = load[l].astype(np.float64)
        doms = _node_domains(load[l], M, g if M > 1 else 1)
        row: list[int] = []
        for experts in doms:
            bins = _distinct_domain(w[experts], G_dom, S)
            row += [int(experts[e]) for b in bins for e in b]
        rows.append(row)
    return Placement(np.array(rows, np.int64), num_gpus, num_nodes, N,
                     info={"method": "eplb-distinct", "num_groups": g,
                           "policy": "hierarchical" if M > 1 else "global"})


def default_groups(stats: RoutingStats, model_shape: str | None = None) -> int | None:
    """The model's expert groups (``n_group``) for EPLB: from the statistics' metadata, else
    from a known model named by ``model_shape`` or the trace; ``None`` when unknown (EPLB then
    runs with 1 group, as vLLM and SGLang do for models without groups)."""
    g = stats.meta.extra.get("n_group")
    if isinstance(g, int) and g > 0:
        return g
    for name in (model_shape, stats.meta.model):
        key = guess_model(name)
        if key is not None and KNOWN[key].num_experts == stats.num_experts:
            return KNOWN[key].n_group
    return None


def baseline(method: str, stats: RoutingStats, c: Cluster, seed: int = 0,
             num_groups: int | None = None, deadline: float | None = None) -> Placement:
    """A baseline placement (``names(baseline=True)``: eplb, eplb-distinct, contiguous,
    round_robin, random) without solving or bounds; ``num_groups`` defaults to the model's
    (``default_groups``)."""
    solver = get(method)
    if not solver.baseline:
        raise InputError("solve", "--method", f"{method} is not a baseline",
                         f"use one of {names(baseline=True)}")
    options = SolveOptions(seed=seed, num_groups=num_groups, deadline=deadline)
    check_supported(solver, c, options)
    return solver.solve(stats, c, options)[0]


# ---- the baselines as methods (see moeplace.solvers.registry) --------------------------------
class _Baseline(Solver):
    baseline = True
    replicas = True

    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        return self.place(stats, cluster, options), MethodResult("baseline")

    @abstractmethod
    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        """The baseline's layout."""

    @staticmethod
    def groups(stats: RoutingStats, options: SolveOptions) -> int | None:
        return default_groups(stats) if options.num_groups is None else options.num_groups


@register
class EPLBBaseline(_Baseline):
    """DeepSeek's EPLB as vLLM and SGLang run it (copies of one expert may share a GPU)."""

    name = "eplb"
    rank = 60

    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        return eplb(stats.load, c.num_gpus, c.num_nodes, c.replicas,
                    num_groups=self.groups(stats, options), deadline=options.deadline)


@register
class EPLBDistinctBaseline(_Baseline):
    """EPLB with the copies of one expert on distinct GPUs (the search's start)."""

    name = "eplb-distinct"
    rank = 61

    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        return eplb_distinct(stats.load, c.num_gpus, c.num_nodes, c.replicas,
                             num_groups=self.groups(stats, options), deadline=options.deadline)


@register
class ContiguousBaseline(_Baseline):
    """Experts in id order, S per GPU (vLLM ``linear``, SGLang ``trivial``)."""

    name = "contiguous"
    rank = 70

    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        L, N = stats.load.shape
        return contiguous(L, N, c.num_gpus, c.num_nodes, replicas=c.replicas)


@register
class RoundRobinBaseline(_Baseline):
    """Expert e on GPU e mod G; it has no rule for replicas."""

    name = "round_robin"
    rank = 71
    replicas = False

    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        L, N = stats.load.shape
        return round_robin(L, N, c.num_gpus, c.num_nodes)


@register
class RandomBaseline(_Baseline):
    """A seeded random balanced placement."""

    name = "random"
    rank = 72

    def place(self, stats: RoutingStats, c: Cluster, options: SolveOptions) -> Placement:
        L, N = stats.load.shape
        return random_placement(L, N, c.num_gpus, c.num_nodes, c.replicas, seed=options.seed)


# ---- speed-aware start ----------------------------------------------------------------------
def _swap_improve(w: np.ndarray, gpu: np.ndarray, load: np.ndarray, s: np.ndarray,
                  max_rounds: int) -> None:
    """Swap an expert of the slowest GPU (highest ``load / s``) with one elsewhere while that
    lowers the pair's larger time below the current maximum; best swap first. In place."""
    eps = 1e-12 * max(float(w.sum()), 1.0)
    for _ in range(max_rounds):
        r = load / s
        g = int(np.argmax(r))
        cur = r[g]
        a = np.flatnonzero(gpu == g)
        b = np.flatnonzero(gpu != g)
        if not a.size or not b.size:
            return
        h = gpu[b]
        d = w[b][None, :] - w[a][:, None]                 # [A, B] what g gains
        new_g = (load[g] + d) / s[g]
        new_h = (load[h][None, :] - d) / s[h][None, :]
        worst = np.maximum(new_g, new_h)
        i = int(np.argmin(worst))
        if worst.flat[i] >= cur - eps:
            return
        ia, ib = divmod(i, b.size)
        ea, eb = a[ia], b[ib]
        hb = gpu[eb]
        load[g] += w[eb] - w[ea]
        load[hb] += w[ea] - w[eb]
        gpu[ea], gpu[eb] = hb, g


def eplb_where_distinct(load: np.ndarray, num_gpus: int, num_nodes: int = 1, replicas: int = 0,
                        num_groups: int | None = None, deadline: float | None = None
                        ) -> Placement:
    """Per layer, the stacks' ``eplb`` where it keeps the copies of each expert on distinct
    GPUs, else ``eplb_distinct``: the closest start to what the stacks run that moeplace's
    own solvers may start from (they never put two copies of one expert on one GPU)."""
    b = eplb_distinct(load, num_gpus, num_nodes, replicas, num_groups=num_groups,
                      deadline=deadline)
    if not replicas:
        return b
    a = eplb(load, num_gpus, num_nodes, replicas, num_groups=num_groups, deadline=deadline)
    slots = np.sort(a.phy2log.reshape(a.num_layers, num_gpus, -1), axis=2)
    shared = (slots[:, :, 1:] == slots[:, :, :-1]).any(axis=(1, 2))
    phy = np.where(shared[:, None], b.phy2log, a.phy2log)
    return replace(b, phy2log=phy, info={**b.info, "eplb_layers": int((~shared).sum())})


def balanced_placement(cost: np.ndarray, num_gpus: int, num_nodes: int = 1,
                       speeds: np.ndarray | None = None, max_rounds: int | None = None
                       ) -> Placement:
    """One copy per expert, exactly ``N / num_gpus`` experts per GPU, balancing ``cost``
    ``[L, N]`` (token load for prefill, ``cost.expert_cost`` for decode) in proportion to
    ``speeds`` (``[G]``, default equal).

    Per layer: experts by decreasing cost, each to the GPU with a free slot whose time
    ``(load + cost) / speed`` after taking it is smallest (lowest index on ties); then swaps
    of one expert of the slowest GPU with one elsewhere while they lower the maximum
    (``max_rounds`` swaps at most, default ``4 N``). Nodes only label GPUs (``num_nodes``
    contiguous groups); node balance is not optimised. The start EPLB cannot give on unequal
    GPUs: EPLB packs for equal ones.
    """
    w_all = np.asarray(cost, np.float64)
    if w_all.ndim != 2:
        raise InputError("balanced_placement", "cost", f"shape {w_all.shape} is not "
                         "[layers, experts]", "pass per-layer expert costs")
    if not np.isfinite(w_all).all() or (w_all < 0).any():
        raise InputError("balanced_placement", "cost", "costs must be finite and >= 0",
                         "pass loads or expert_cost(...)")
    L, N = w_all.shape
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes or N % num_gpus:
        raise InfeasibleError(f"{N} experts do not split evenly over {num_gpus} GPUs in "
                              f"{num_nodes} nodes")
    S = N // num_gpus
    s = np.ones(num_gpus) if speeds is None else np.asarray(speeds, np.float64)
    if s.shape != (num_gpus,) or not np.isfinite(s).all() or (s <= 0).any():
        raise InputError("balanced_placement", "speeds", f"need {num_gpus} finite speeds > 0",
                         "pass parse_gpu_speeds(...)")
    rounds = 4 * N if max_rounds is None else int(max_rounds)
    rows = np.empty((L, N), np.int64)
    for l in range(L):
        w = w_all[l]
        gpu = np.empty(N, np.int64)
        load = np.zeros(num_gpus)
        fill = np.zeros(num_gpus, np.int64)
        for e in np.argsort(-w, kind="stable"):
            t = np.where(fill < S, (load + w[e]) / s, np.inf)
            g = int(np.argmin(t))
            gpu[e] = g
            load[g] += w[e]
            fill[g] += 1
        _swap_improve(w, gpu, load, s, rounds)
        # slots in GPU order; inside a GPU, heavier experts first
        order = np.lexsort((-w, gpu))
        rows[l] = order
    return Placement(rows, num_gpus, num_nodes, N,
                     info={"method": "balanced", "speeds": [float(x) for x in s]})

"""Replay a trace the way an engine runs online EPLB, and score every policy on traffic it
has not seen (``moeplace replay``; docs/objective.md, "Online rebalancing").

The trace is put in replay order (``arrival``: request, then position; ``step``: serving
step, then file order; ``file``: as stored) and cut into intervals of ``interval`` tokens.
Every policy starts from the stacks' initial map (slot ``p`` holds expert ``p mod N``, as
vLLM's ``EplbState`` builds it) and, at the start of each interval after the first, is asked
for the map to serve next with what an engine would know at that moment: the load of the
interval that just ended, the load of the last ``window`` tokens (vLLM's sliding window), the
load of everything seen so far, and the map in effect. The map it returns is scored on the
*next* interval only, which no policy has seen.

Per interval: ``load_imbalance`` (per layer, the busiest GPU's token-expert assignments over
the mean, a replicated expert's load split evenly over its copies, averaged over layers: the
stats view of ``evaluate``), ``moved_copies`` (per layer and GPU, experts the GPU holds now
and did not before: what vLLM's migration scheduler transfers), ``moved_bytes``
(``moved_copies x expert_bytes``), ``stall_s`` (the slowest GPU's receive time at the
hardware profile's link rates, ``online.transfer_stall``), ``rebalanced`` (the policy chose
to rebalance) and ``cpu_s`` (the policy's own CPU time for that decision).

The trace is streamed twice: once for the replay order (the per-token request, position
and step ids only are kept), once to add each token's experts into the block of the replay
it falls in. Memory is the per-block load tables, not the trace.

Policies are objects with ``name``, ``source`` (one line: whose algorithm) and
``decide(obs) -> (phy2log, rebalanced)``; the engines' own algorithms are adapted in
``moeplace.integrations.engine_policies`` (this module never imports an engine).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moeplace._limits import check_memory
from moeplace.errors import InputError
from moeplace.solvers.baselines import eplb, eplb_where_distinct, resolve_groups
from moeplace.solvers.online import OnlinePolicy, moved_copies, preserve_slots, transfer_stall
from moeplace.traces import Trace, TraceReader
from moeplace.traces.store import as_chunks

__all__ = [
    "ORDERS",
    "POLICIES",
    "EplbPolicy",
    "NeverPolicy",
    "Observation",
    "OnlineReplayPolicy",
    "ReplayPolicy",
    "ReplayResult",
    "StaticPolicy",
    "builtin_policy",
    "check_shape",
    "initial_map",
    "interval_imbalance",
    "replay",
    "replay_order",
    "write_placements",
]

ORDERS = ("arrival", "step", "file")
POLICIES = ("moeplace", "vllm", "sglang", "eplb", "eplb-cumulative", "static", "never")
ENGINE_POLICIES = ("vllm", "sglang")


@dataclass
class Observation:
    """What an engine knows at the start of interval ``interval`` (token ``start_token``)."""

    interval: int
    start_token: int
    last: np.ndarray      # [L, N] load of the interval that just ended
    window: np.ndarray    # [L, N] load of the last ``window`` tokens before start_token
    seen: np.ndarray      # [L, N] load of every token before start_token
    current: np.ndarray   # [L, P] phy2log in effect
    num_gpus: int
    num_nodes: int
    num_groups: int


class ReplayPolicy(Protocol):
    """A policy the replay can call."""

    name: str
    source: str

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        """``(phy2log [L, P] to serve next, whether the policy chose to rebalance)``."""
        ...


# ---- built-in policies --------------------------------------------------------------------
class EplbPolicy:
    """DeepSeek's EPLB refit (moeplace's re-implementation, ``baselines.eplb``) on the last
    ``window`` tokens, or on everything seen (``cumulative``), slots preserved per GPU."""

    def __init__(self, cumulative: bool = False) -> None:
        self.cumulative = cumulative
        self.name = "eplb-cumulative" if cumulative else "eplb"
        self.source = ("DeepSeek EPLB re-implemented in moeplace, refit on "
                       + ("all tokens seen" if cumulative else "the sliding window"))

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        w = obs.seen if self.cumulative else obs.window
        _L, P = obs.current.shape
        pl = eplb(w, obs.num_gpus, obs.num_nodes, P - w.shape[1], num_groups=obs.num_groups)
        return preserve_slots(pl.phy2log, obs.current, obs.num_gpus), True


class StaticPolicy:
    """One placement fitted on the first interval (``eplb_where_distinct``: EPLB with every
    expert's copies on distinct GPUs), never changed afterwards."""

    name = "static"
    source = "fitted once on the first interval (EPLB, copies on distinct GPUs), then kept"

    def __init__(self) -> None:
        self.done = False

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        if self.done:
            return obs.current, False
        self.done = True
        _L, P = obs.current.shape
        pl = eplb_where_distinct(obs.last, obs.num_gpus, obs.num_nodes, P - obs.last.shape[1],
                                 num_groups=obs.num_groups)
        return preserve_slots(pl.phy2log, obs.current, obs.num_gpus), True


class NeverPolicy:
    """The initial map forever (EPLB off)."""

    name = "never"
    source = "the initial map, never rebalanced"

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        return obs.current, False


class OnlineReplayPolicy:
    """moeplace's ``OnlinePolicy``, fed the load of each interval as an engine would."""

    name = "moeplace"

    def __init__(self, num_gpus: int, num_nodes: int, num_groups: int, *,
                 expert_bytes: int = 0, hardware: Any = None, phase: str = "prefill",
                 **tuning: Any) -> None:
        self.policy = OnlinePolicy(num_gpus, num_nodes, num_groups, expert_bytes=expert_bytes,
                                   hardware=hardware, phase=phase, **tuning)
        self.source = "moeplace.solvers.online.OnlinePolicy"
        self.reasons: list[str] = []

    def decide(self, obs: Observation) -> tuple[np.ndarray, bool]:
        d = self.policy.step(obs.last, obs.current)
        self.reasons.append(d.reason)
        return d.phy2log, d.rebalance


def builtin_policy(name: str, num_gpus: int, num_nodes: int, num_groups: int, *,
                   expert_bytes: int = 0, hardware: Any = None,
                   phase: str = "prefill") -> ReplayPolicy:
    """A policy of this module by its ``--policy`` name (the engines' are in integrations);
    ``phase``: the instance moeplace's policy serves (``OnlinePolicy``)."""
    if name == "moeplace":
        return OnlineReplayPolicy(num_gpus, num_nodes, num_groups, expert_bytes=expert_bytes,
                                  hardware=hardware, phase=phase)
    if name in ("eplb", "eplb-cumulative"):
        return EplbPolicy(cumulative=name == "eplb-cumulative")
    if name == "static":
        return StaticPolicy()
    if name == "never":
        return NeverPolicy()
    raise InputError("--policy", "value", f"{name!r} is not a built-in policy",
                     f"use one of {', '.join(POLICIES)}")


# ---- order and counting -------------------------------------------------------------------
def replay_order(tokens: dict[str, np.ndarray], num_tokens: int, order: str,
                 source: object) -> np.ndarray | None:
    """``[T]`` rank of every token (file order) in the replay, or None when the file is
    already in that order."""
    if order not in ORDERS:
        raise InputError("--order", "value", f"{order!r} unknown", f"use one of {ORDERS}")
    if order == "file":
        return None
    idx = np.arange(num_tokens, dtype=np.int64)
    if order == "arrival":
        if "request" not in tokens:
            raise InputError(source, "request", "the trace has no request ids, so no arrival "
                             "order", "pass --order file (or --order step if it has step ids)")
        keys = [idx]
        if "position" in tokens:
            keys.append(tokens["position"])
        keys.append(tokens["request"])
    else:
        if "step" not in tokens:
            raise InputError(source, "step", "the trace has no step ids",
                             "pass --order file (or --order arrival if it has request ids)")
        keys = [idx, tokens["step"]]
    perm = np.lexsort(keys)
    if (perm == idx).all():
        return None
    rank = np.empty(num_tokens, np.int64)
    rank[perm] = idx
    return rank


def initial_map(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """The stacks' initial ``phy2log``: slot ``p`` holds expert ``p mod N`` in every layer."""
    return np.tile(np.arange(num_slots, dtype=np.int64) % num_experts, (num_layers, 1))


def interval_imbalance(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]`` busiest GPU's load over the mean on ``load [L, N]`` under ``phy2log [L, P]``
    (an expert's load split evenly over its copies; a layer with no load counts 1)."""
    L, P = phy2log.shape
    N = load.shape[1]
    cnt = np.zeros((L, N))
    np.add.at(cnt, (np.arange(L)[:, None], phy2log), 1.0)
    per = np.take_along_axis(load / np.maximum(cnt, 1.0), phy2log, axis=1)
    gl = per.reshape(L, num_gpus, P // num_gpus).sum(axis=2)
    mean = gl.mean(axis=1)
    return np.where(mean > 0, gl.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


@dataclass
class ReplayResult:
    """Per policy: ``intervals`` (one dict per interval), ``summary``, ``placements``."""

    intervals: dict[str, list[dict[str, Any]]]
    summary: dict[str, dict[str, Any]]
    placements: dict[str, list[np.ndarray]]
    starts: list[int]
    sources: dict[str, str]
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: setup, per-policy summary and per-interval rows."""
        return {"setup": self.setup,
                "policies": {n: {"source": self.sources[n], "summary": self.summary[n],
                                 "intervals": self.intervals[n]} for n in self.summary}}


def check_shape(num_gpus: int, num_nodes: int, replicas: int, L: int, N: int,
                 source: object) -> int:
    """Slots per layer of the cluster; ``InputError`` naming the flag when it cannot be."""
    if num_gpus % num_nodes:
        raise InputError("--nodes", "value", f"{num_gpus} GPUs do not split into {num_nodes} "
                         "nodes", "use a node count that divides --gpus")
    P = N + replicas
    if P % num_gpus:
        raise InputError("--replicas", "value", f"{N} experts + {replicas} replicas = {P} slots "
                         f"do not split over {num_gpus} GPUs",
                         f"use --replicas {(-N) % num_gpus} (+ a multiple of {num_gpus})")
    if P // num_gpus > N:
        raise InputError("--gpus", "value", f"{P // num_gpus} slots per GPU for {N} experts",
                         "use fewer GPUs or replicas")
    check_memory(8.0 * L * P * 4, "the replay's maps", source, "experts")
    return P


def _block_loads(source: Trace | TraceReader, edges: np.ndarray, rank: np.ndarray | None,
                 L: int, N: int) -> np.ndarray:
    """``[B, L, N]`` token-expert assignments of each replay block ``[edges[b], edges[b+1])``."""
    B = len(edges) - 1
    check_memory(8.0 * B * L * N * 2, "the replay's per-block loads", "trace", "--interval")
    out = np.zeros(B * L * N, np.int64)
    chunks, _, _ = as_chunks(source, weights=False, token_fields=False)
    seen = 0
    lay = (np.arange(L, dtype=np.int64) * N)[None, :, None]
    for ch in chunks:
        T = ch.num_tokens
        r = (np.arange(seen, seen + T, dtype=np.int64) if rank is None
             else rank[seen:seen + T])
        seen += T
        blk = np.searchsorted(edges, r, side="right") - 1
        flat = blk[:, None, None] * (L * N) + lay + ch.experts.astype(np.int64)
        out += np.bincount(flat.ravel(), minlength=B * L * N)
    return out.reshape(B, L, N)


def _token_fields(source: Trace | TraceReader) -> tuple[dict[str, np.ndarray], int]:
    if isinstance(source, Trace):
        return source.tokens, source.num_tokens
    parts: dict[str, list[np.ndarray]] = {n: [] for n in source.token_fields}
    check_memory(8.0 * len(parts) * source.num_tokens, "the replay order's keys",
                 source.meta.source, "tokens")
    total = 0
    for ch in source.iter_chunks(weights=False):
        total += ch.num_tokens
        for n in parts:
            parts[n].append(ch.tokens[n])
    return {n: np.concatenate(v) if v else np.zeros(0, np.int64) for n, v in parts.items()}, total


def replay(source: Trace | TraceReader, policies: Sequence[ReplayPolicy], *, num_gpus: int,
           num_nodes: int = 1, replicas: int = 0, num_groups: int | None = None,
           interval: int = 4096, window: int | None = None, order: str = "arrival",
           expert_bytes: int = 0, hardware: Any = None) -> ReplayResult:
    """Replay ``source`` through every policy side by side (one pass over the trace) and
    score each decision on the next interval (see the module docstring)."""
    from moeplace.solvers.online import _hardware

    if not policies:
        raise InputError("--policy", "value", "no policy given", "name at least one policy")
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError("--policy", "value", f"{dup!r} given twice", "name each policy once")
    if interval < 1:
        raise InputError("--interval", "value", f"{interval} < 1", "pass --interval >= 1")
    window = interval if window is None else int(window)
    if window < 1:
        raise InputError("--window", "value", f"{window} < 1", "pass --window >= 1")
    hw = _hardware(hardware)
    meta = source.meta
    L, N = meta.num_layers, meta.num_experts
    src = meta.source or "trace"
    P = check_shape(num_gpus, num_nodes, replicas, L, N, src)
    groups = resolve_groups(num_groups, N, num_nodes)
    tokens, T = _token_fields(source)
    if T == 0:
        raise InputError(src, "experts", "the trace has no tokens", "replay a non-empty trace")
    if T <= interval:
        raise InputError("--interval", "value", f"{interval:,} tokens is the whole trace "
                         f"({T:,} tokens): nothing would be scored after a decision",
                         f"use --interval below {T:,}")
    rank = replay_order(tokens, T, order, src)
    K = -(-T // interval)
    starts = [k * interval for k in range(K)]
    edges = np.unique(np.array([0, T] + starts[1:] + [max(0, s - window) for s in starts[1:]],
                               np.int64))
    blocks = _block_loads(source, edges, rank, L, N)
    cum = np.concatenate([np.zeros((1, L, N), np.int64), np.cumsum(blocks, axis=0)])

    def between(a: int, b: int) -> np.ndarray:
        return (cum[np.searchsorted(edges, b)] - cum[np.searchsorted(edges, a)]).astype(
            np.float64)

    init = initial_map(L, N, P)
    current = {n: init.copy() for n in names}
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    plcs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for k, s in enumerate(starts):
        e = min(T, s + interval)
        nxt = between(s, e)
        for pol in policies:
            n = pol.name
            old = current[n]
            cpu = 0.0
            reb = False
            new = old
            if k > 0:
                obs = Observation(k, s, between(starts[k - 1], s), between(max(0, s - window), s),
                                  between(0, s), old.copy(), num_gpus, num_nodes, groups)
                t0 = time.process_time()
                got, reb = pol.decide(obs)
                cpu = time.process_time() - t0
                new = _check_map(got, L, N, P, n)
            moved = int(moved_copies(old, new, num_gpus).sum()) if k > 0 else 0
            stall = (transfer_stall(old, new, num_gpus, num_nodes, expert_bytes, hw)
                     if moved else 0.0)
            imb = interval_imbalance(new, nxt, num_gpus)
            rows[n].append({"interval": k, "start_token": s, "tokens": e - s,
                            "load_imbalance": float(imb.mean()),
                            "load_imbalance_max": float(imb.max()),
                            "rebalanced": bool(reb), "moved_copies": moved,
                            "moved_bytes": moved * int(expert_bytes), "stall_s": stall,
                            "cpu_s": cpu})
            plcs[n].append(new)
            current[n] = new
    summary = {n: _summary(rows[n], P * L) for n in names}
    setup = {"trace": str(src), "tokens": T, "num_layers": L, "num_experts": N,
             "num_gpus": num_gpus, "num_nodes": num_nodes, "replicas": replicas,
             "num_slots": P, "num_groups": groups, "interval": interval, "window": window,
             "order": order, "expert_bytes": int(expert_bytes), "intervals": K,
             "hardware": hw.name, "hardware_source": hw.source,
             "link_rates": _link_sources(hw),
             "initial_map": "slot p holds expert p mod N (vLLM's EplbState start)"}
    return ReplayResult(rows, summary, plcs, starts, {p.name: p.source for p in policies}, setup)


def _link_sources(hw: Any) -> dict[str, Any]:
    """The profile's link rates the stall uses, each with the source the profile gives."""
    src: dict[str, Any] = {}
    try:
        with open(hw.source) as f:
            src = json.load(f).get("sources", {}) or {}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return {k: {"value": float(getattr(hw, k)), "source": str(src.get(k, "not stated"))}
            for k in ("nvlink_bytes_per_s", "network_bytes_per_s", "network_efficiency")}


def _check_map(m: Any, L: int, N: int, P: int, name: str) -> np.ndarray:
    a = np.asarray(m)
    if a.shape != (L, P) or a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= N:
        raise InputError(f"policy {name}", "phy2log", f"returned shape {a.shape} dtype "
                         f"{a.dtype}, not [{L}, {P}] of expert ids < {N}", "fix the policy")
    a = a.astype(np.int64)
    cnt = np.zeros((L, N), np.int64)
    np.add.at(cnt, (np.arange(L)[:, None], a), 1)
    if (cnt == 0).any():
        raise InputError(f"policy {name}", "phy2log", "returned a map that leaves an expert "
                         "with no copy", "fix the policy")
    return a


def _summary(rows: list[dict[str, Any]], copies: int) -> dict[str, Any]:
    dec = rows[1:]
    return {
        "intervals": len(rows),
        "load_imbalance_mean": float(np.mean([r["load_imbalance"] for r in rows])),
        "load_imbalance_mean_after_decisions": float(np.mean([r["load_imbalance"]
                                                               for r in dec])),
        "moved_copies": int(sum(r["moved_copies"] for r in rows)),
        "moved_copies_per_decision": float(np.mean([r["moved_copies"] for r in dec])),
        "moved_fraction_per_decision": float(np.mean([r["moved_copies"] for r in dec])
                                             / copies),
        "moved_bytes": int(sum(r["moved_bytes"] for r in rows)),
        "stall_s": float(sum(r["stall_s"] for r in rows)),
        "rebalances": int(sum(r["rebalanced"] for r in rows)),
        "decisions": len(dec),
        "cpu_s": float(sum(r["cpu_s"] for r in rows)),
        "cpu_s_per_decision": float(np.mean([r["cpu_s"] for r in dec])),
    }


# ---- output ---------------------------------------------------------------------------------
def write_placements(res: ReplayResult, out: str | os.PathLike[str]) -> list[str]:
    """Write ``OUT/placements.jsonl`` (one policy) or ``OUT/POLICY/placements.jsonl`` (several)
    and ``OUT/summary.json``, atomically; returns the files written (relative to OUT)."""
    from moeplace._fileio import atomic_path

    names = list(res.summary)
    written: list[str] = []
    with atomic_path(out, directory=True) as tmp:
        tmp.mkdir()
        for n in names:
            d = tmp if len(names) == 1 else tmp / n
            d.mkdir(exist_ok=True)
            with open(d / "placements.jsonl", "w") as f:
                for row, m in zip(res.intervals[n], res.placements[n], strict=True):
                    f.write(json.dumps({"interval": row["interval"],
                                        "start_token": row["start_token"],
                                        "rebalanced": row["rebalanced"],
                                        "policy": n, "phy2log": m.tolist()}) + "\n")
            written.append(str((d / "placements.jsonl").relative_to(tmp)))
        with open(tmp / "summary.json", "w") as f:
            json.dump(res.to_dict(), f, indent=1)
        written.append("summary.json")
    return written


def plot(res: ReplayResult, path: str) -> None:
    """Save next-interval imbalance and moved copies over the replay for every policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from moeplace.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "--plot", "plot") from None
    from moeplace._fileio import atomic_path

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for n, rows in res.intervals.items():
        x = [r["start_token"] for r in rows]
        a.plot(x, [r["load_imbalance"] for r in rows], marker=".", label=n)
        b.plot(x, [r["moved_copies"] for r in rows], marker=".", label=n)
    a.set(ylabel="load_imbalance (next interval)",
          title=f"{os.path.basename(str(res.setup.get('trace', '')))}: {res.setup['num_gpus']} "
                f"GPUs, {res.setup['num_nodes']} nodes, {res.setup['replicas']} replicas, "
                f"interval {res.setup['interval']}")
    b.set(ylabel="moved_copies", xlabel="start_token (replay order)")
    b.set_yscale("symlog")
    a.legend(fontsize=8)
    fig.tight_layout()
    suffix = path.rsplit(".", 1)[-1] if "." in path else "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=suffix)
    plt.close(fig)


def summary_table(res: ReplayResult, reference: str | None = "vllm") -> list[dict[str, Any]]:
    """One row per policy; with ``reference`` among the policies, each row's imbalance and
    moved copies against it (measured in the same replay)."""
    ref = res.summary.get(reference) if reference else None
    out = []
    for n, s in res.summary.items():
        row = {"policy": n, "load_imbalance_mean": s["load_imbalance_mean"],
               "moved_copies": s["moved_copies"],
               "moved_fraction_per_decision": s["moved_fraction_per_decision"],
               "rebalances": s["rebalances"], "decisions": s["decisions"],
               "moved_bytes": s["moved_bytes"], "stall_s": s["stall_s"],
               "cpu_ms_per_decision": 1e3 * s["cpu_s_per_decision"]}
        if ref is not None:
            row["imbalance_vs_ref"] = s["load_imbalance_mean"] / ref["load_imbalance_mean"]
            row["moves_vs_ref"] = (s["moved_copies"] / ref["moved_copies"]
                                   if ref["moved_copies"] else float("nan"))
        out.append(row)
    return out


# The engines' own rebalancing, strongest first: the installed engine's code, else its refit.
_REFERENCES = ("vllm", "sglang", "eplb", "eplb-cumulative")


def replay_headline(res: ReplayResult) -> str:
    """The one sentence of a replay: moeplace's policy against the engine default replayed
    beside it (imbalance on the next interval, copies moved), else the best-balanced policy."""
    s = res.summary
    ref = next((r for r in _REFERENCES if r in s), None)
    if "moeplace" in s and ref is not None:
        m, r = s["moeplace"], s[ref]
        a, b = m["load_imbalance_mean"], r["load_imbalance_mean"]
        word = "lower than" if a < b - 5e-5 else ("the same as" if abs(a - b) <= 5e-5
                                                  else "higher than")
        ratio = (f" ({m['moved_copies'] / r['moved_copies']:.2f}x)" if r["moved_copies"]
                 else "")
        return (f"moeplace's policy left a next-interval imbalance of {a:.3f}, {word} {ref}'s "
                f"{b:.3f}, moving {m['moved_copies']:,} expert copies against {ref}'s "
                f"{r['moved_copies']:,}{ratio}.")
    best = min(s, key=lambda n: s[n]["load_imbalance_mean"])
    return (f"{best} left the lowest next-interval imbalance ({s[best]['load_imbalance_mean']:.3f}), "
            f"moving {s[best]['moved_copies']:,} expert copies.")

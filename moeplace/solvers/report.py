"""What a person reads first: the one-sentence verdict against the strongest baseline, the metric
columns that can differ in this setting, and the per-layer picture against EPLB.

``solve``, ``evaluate`` and ``demo`` open with ``headline``: the placement's traffic (remote GPUs,
and remote nodes on several nodes), balance and simulated step time, each against the baseline
that is best at that quantity, on held-out traffic when there is some and saying which traffic
otherwise. ``visible_columns`` drops columns that cannot differ between placements here (node
metrics on one node, per-step active experts when every expert is active in every step,
migration without a current placement); JSON output never hides anything. ``plot_against``
draws per-GPU load and per-layer traffic against EPLB (matplotlib is imported only there).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moeplace.errors import InputError, MissingDependencyError, MoeplaceError
from moeplace.placement import Placement
from moeplace.traces import Trace, TraceReader

# Which traffic the figures were measured on; the sentence opens with the matching phrase.
WHERE = {
    "holdout": "On held-out requests",
    "holdout-one": "On the held-out request",
    "fit": "On the fitted traffic (no held-out split; --holdout 0.3 holds requests back)",
    "stats": "On the fitted statistics (no per-token trace: no held-out split, and cross-layer "
             "pairs stand in for per-token traffic)",
    "trace": "On this trace, to which the baselines are fitted,",
}

# The baselines the comparison may name (the same set as ``solvers.solve.BASELINES``, kept here
# so that reading a table needs no solver imports).
BASELINE_NAMES = ("contiguous", "round_robin", "random", "eplb", "eplb-distinct")

# Columns (and summary keys) that measure nodes: all zero, or equal to the GPU figure, on one node.
_NODE_COLUMN = re.compile(r"^(cross_node_pair_fraction(_to_next)?|traffic_(static|follow)_"
                          r"(remote_nodes|inter_node|intra_node|inter|intra|nodes))$")
_CROSS_LAYER = re.compile(r"^cross_(gpu|node)_pair_fraction(_to_next)?$")
_TRAFFIC = re.compile(r"^(traffic_(static|follow)(_.*)?|cross_(gpu|node)_pair_fraction.*)$")
_ACTIVE = ("active_experts_max", "active_experts_imbalance")
_MIGRATION = ("experts_moved", "copies_transferred", "bytes_transferred")


@dataclass(frozen=True)
class Hidden:
    """Columns left out of a printed table, and why (for the one-line note under it)."""

    columns: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    def note(self) -> str:
        """``(not shown, cannot differ here: ...; --all-metrics shows them)``, or ``""``."""
        if not self.columns:
            return ""
        return (f"(not shown, as they cannot differ here: {'; '.join(self.reasons)}; "
                "--all-metrics shows them)")


def hidden_columns(names: Iterable[str], *, num_gpus: int, num_nodes: int, num_layers: int,
                   current: bool = False, expert_bytes: int = 0,
                   rows: pd.DataFrame | None = None, one_window: bool = False) -> Hidden:
    """The columns among ``names`` that cannot differ between placements in this setting.

    - one node: every node metric is 0 (or, for intra-node traffic, the GPU figure itself);
    - one GPU: no traffic of any kind; one MoE layer: no cross-layer pairs;
    - ``active_experts_*`` when every row has the same value: that is what happens when every
      expert is active in every step (prefill-sized steps), where each GPU reads all its experts
      whatever the placement (``rows`` is the table to check);
    - migration columns without a current placement, ``bytes_transferred`` without
      ``--expert-bytes``;
    - ``window_imbalance_*`` when the trace fits in one window (``one_window``): they are
      ``load_imbalance_*`` then.
    """
    names = list(names)
    out: list[str] = []
    reasons: list[str] = []

    def drop(cols: list[str], why: str) -> None:
        cols = [c for c in cols if c not in out]
        if cols:
            out.extend(cols)
            reasons.append(f"{', '.join(cols)} ({why})")

    if num_gpus <= 1:
        drop([n for n in names if _TRAFFIC.match(n)], "one GPU")
    if num_nodes <= 1:
        drop([n for n in names if _NODE_COLUMN.match(n)], "one node")
    if num_layers <= 1:
        drop([n for n in names if _CROSS_LAYER.match(n)], "one MoE layer")
    if rows is not None and len(rows) > 1:
        same = [c for c in _ACTIVE if c in names and c in rows and _constant(rows[c])]
        drop(same, "equal for every placement: every expert is active in every step")
    if one_window:
        drop([n for n in names if n.startswith("window_imbalance_")],
             "the trace fits in one --window: equal to load_imbalance_*")
    if not current:
        drop([c for c in _MIGRATION if c in names], "no --current placement")
    elif not expert_bytes:
        drop([c for c in ("bytes_transferred",) if c in names], "no --expert-bytes")
    return Hidden(tuple(out), tuple(reasons))


def _constant(col: pd.Series) -> bool:
    v = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
    return bool(np.isfinite(v).all() and np.allclose(v, v[0], rtol=1e-9, atol=1e-12))


def visible_columns(df: pd.DataFrame, *, num_gpus: int, num_nodes: int, num_layers: int,
                    current: bool = False, expert_bytes: int = 0,
                    all_metrics: bool = False) -> tuple[pd.DataFrame, Hidden]:
    """``df`` without the columns that cannot differ here (see ``hidden_columns``), and what was
    left out; ``all_metrics`` keeps everything."""
    if all_metrics:
        return df, Hidden()
    h = hidden_columns(df.columns, num_gpus=num_gpus, num_nodes=num_nodes,
                       num_layers=num_layers, current=current, expert_bytes=expert_bytes,
                       rows=df)
    return df.drop(columns=list(h.columns)), h


# ---- the headline ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """One quantity of ``ours`` against the baseline best at it (lower is better)."""

    metric: str
    value: float
    baseline: str
    baseline_value: float

    @property
    def change(self) -> float:
        """(value - baseline_value) / baseline_value, as ``vs_strongest_baseline`` reports it."""
        if self.baseline_value:
            return (self.value - self.baseline_value) / self.baseline_value
        return 0.0 if self.value == 0 else float("inf")


def best_baseline(rows: pd.DataFrame, ours: str, metric: str) -> Comparison | None:
    """``ours`` against the baseline with the lowest ``metric`` (ties to the first row, as the
    gains table picks), or None when either figure is missing."""
    if metric not in rows or "placement" not in rows:
        return None
    me = rows[rows["placement"] == ours]
    base = rows[rows["placement"].isin(BASELINE_NAMES) & (rows["placement"] != ours)]
    vals = pd.to_numeric(base[metric], errors="coerce")
    if not len(me) or vals.isna().all():
        return None
    v = float(me[metric].iloc[0])
    if not np.isfinite(v):
        return None
    b = base.loc[vals.idxmin()]
    return Comparison(metric, v, str(b["placement"]), float(b[metric]))


def _pct(x: float) -> str:
    """A percentage as a person reads it: whole percent from 10%, one decimal below."""
    return f"{x:.0f}%" if x >= 9.95 else f"{x:.1f}%"


def _fewer(c: Comparison, unit: str) -> tuple[str, str]:
    """('21% fewer remote GPUs', 'than') / ('4.0% more remote GPUs', 'than') /
    ('as many remote GPUs', 'as'): the phrase and the word before the baseline."""
    if not np.isfinite(c.change):
        return f"{c.value:.3f} {unit} per token where none are needed", "by"
    p = _pct(abs(100.0 * c.change))
    if p in ("0.0%", "0%"):
        return f"as many {unit}", "as"
    return f"{p} {'fewer' if c.change < 0 else 'more'} {unit}", "than"


def headline(rows: pd.DataFrame, ours: str, *, where: str = "holdout", num_nodes: int = 1,
             engine: str = "sglang", balance: str = "load_imbalance_mean",
             subject: str = "this placement", no_step: str = "", home: str = "static",
             skipped: Sequence[str] = ()) -> str:
    """One sentence: ``ours`` against the strongest baseline on the quantities a person weighs.

    ``rows`` is a metric table (one row per ``placement``, the evaluator's column names);
    ``where`` a key of ``WHERE`` (or a phrase of its own) saying which traffic the table
    measured. Each quantity is compared with the baseline best at it, named where it is not the
    one named last: the engine's traffic (static engines: remote GPUs per token,
    ``traffic_static``, and on several nodes remote nodes, ``traffic_static_remote_nodes``;
    ``home="follow"``: the follow-home figures; ``exflow`` or statistics only: the cross-layer
    pair fractions), the balance (``balance``, max / mean) and the simulated step time
    (``step_ms``; ``no_step`` says why it is missing). ``skipped``: baselines left out of the
    table (time limit); the sentence says its gains are only against those compared.
    Percentages are ``vs_strongest_baseline``'s ``change``: 100 x (value - baseline) / baseline.
    """
    opening = WHERE.get(where, where)
    static = engine != "exflow" and f"traffic_{home}" in rows
    gpu_m, node_m = ((f"traffic_{home}", f"traffic_{home}_remote_nodes") if static else
                     ("cross_gpu_pair_fraction", "cross_node_pair_fraction"))
    units = (("remote GPUs", "remote nodes") if static else
             ("consecutive-layer expert pairs across GPUs", "pairs across nodes"))
    gpu = best_baseline(rows, ours, gpu_m)
    bal = best_baseline(rows, ours, balance)
    if gpu is None and bal is None:
        return f"{opening} no baseline was scored next to {subject}, so no gain is stated."
    parts: list[str] = []
    named: str | None = None

    def against(c: Comparison, first: str) -> str:
        nonlocal named
        if named is None:
            named = c.baseline
            return f" {first} ({c.baseline})"
        return ""

    if gpu is not None:
        verb = "sends tokens to" if static else "puts"
        phrase, word = _fewer(gpu, units[0])
        text = f"{verb} {phrase} {word}{against(gpu, 'the best baseline')}"
        node = best_baseline(rows, ours, node_m) if num_nodes > 1 else None
        if node is not None:
            text += f" and {_fewer(node, units[1])[0]}"
            if node.baseline != named:
                text += f" (against {node.baseline})"
                named = node.baseline  # the last one named is the one a reader compares to
        parts.append(text)
    if bal is not None:
        what = "max/mean" if balance == "load_imbalance_mean" else "active experts max/mean"
        v, b = f"{bal.value:.2f}", f"{bal.baseline_value:.2f}"
        word = ("at the same balance" if v == b else
                "better balanced" if bal.value < bal.baseline_value else "less balanced")
        if not parts:  # the sentence's first clause needs its verb
            word = "has the same balance" if v == b else f"is {word}"
        vs = f" for {bal.baseline}" if named is not None and bal.baseline != named else ""
        parts.append(f"{word} ({what} {v} vs {b}{vs}"
                     f"{f', the best baseline: {bal.baseline}' if named is None else ''})")
        named = bal.baseline
    step = best_baseline(rows, ours, "step_ms")
    if step is not None:
        s = _pct(abs(100.0 * step.change))
        tail = "" if step.baseline == named else f" than {step.baseline}"
        parts.append("simulated step as fast" + (f" as {step.baseline}" if tail else "")
                     if s in ("0.0%", "0%") else
                     f"simulated step {s} {'faster' if step.change < 0 else 'slower'}{tail}")
    elif no_step:
        parts.append(no_step)
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", " + parts[-1]
    if skipped:  # a gain over the baselines that were scored is not one over those that were not
        body += (f" (against the baselines scored; {', '.join(skipped)} "
                 f"{'was' if len(skipped) == 1 else 'were'} not, at the time limit)")
    return f"{opening} {subject} {body}."


# ---- evaluate: the placement next to the baselines -------------------------------------------
@dataclass
class Evaluation:
    """``evaluate``'s result: the placement's own summary (as ``solvers.evaluate`` gives it),
    its per-layer table, and the metric table with the baselines fitted to the same trace."""

    summary: dict[str, Any]
    per_layer: pd.DataFrame
    rows: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    step_note: str = ""


def bound_line(objective: dict[str, Any], bound: dict[str, Any], gap: float | None,
               weights: Any, num_nodes: int, replicas: int = 0) -> str:
    """``solve``'s objective line: the total, its lower bound and the gap, and the bound on
    each term the objective weighs (a term with weight 0 is not part of the total: under
    deepep-ll the command line zeroes the traffic weights, since without replicas no
    placement changes the copies that kernel sends)."""
    eng, phase = objective.get("engine", "exflow"), objective.get("phase", "prefill")
    parts = [f"active_experts_imbalance >= {bound['active_experts_imbalance']:.3f}"
             if bound.get("active_experts_imbalance") is not None else
             f"imbalance >= {bound['load_imbalance_mean']:.3f}"]
    static = eng != "exflow"
    names = (("traffic", "traffic_static" if static else "cross_gpu_pair_fraction"),
             ("node", "traffic_static_remote_nodes" if static else "cross_node_pair_fraction"),
             ("coact", "coactivation_spread"))
    for weight, key in names:
        if getattr(weights, weight) > 0 and (weight != "node" or num_nodes > 1):
            parts.append(f"{key} >= {bound[key]:.3f}")
    if not weights.traffic and not weights.node and bound.get("dispatch") == "deepep-ll":
        parts.append("no traffic term: every placement sends the same deepep-ll copies"
                     if not replicas else "no traffic term under deepep-ll")
    kernel = f", {bound['dispatch']}" if bound.get("dispatch") else ""
    shown = "n/a" if gap is None else f"{gap:.1%}"
    return (f"objective ({eng}, {phase}{kernel}) {objective['total']:.4f}, lower bound "
            f"{bound['total']:.4f}, gap {shown} (bounds: {', '.join(parts)})")


def kernel_line(objective: dict[str, Any], bound: dict[str, Any], replicas: int,
                num_nodes: int, hardware: str | None = None, tokens_per_step: int = 4096
                ) -> str | None:
    """``solve``'s line on the dispatch kernel: the placement's NVLink, RDMA and total copies
    per token and MoE layer with their lower bounds (``solvers.kernel_bounds``; equal for
    every placement under deepep-ll without replicas), and the bound on the priced dispatch
    and combine when a simulator profile is known. None without a token sample."""
    if "copies_per_token" not in bound:
        return None
    kernel = bound["dispatch"]
    same = kernel == "deepep-ll" and replicas == 0
    keys = [("NVLink", "nvlink_copies_per_token")]
    if num_nodes > 1:
        keys.append(("RDMA", "rdma_copies_per_token"))
    keys.append(("total", "copies_per_token"))
    terms = []
    for name, key in keys:
        value = objective.get(key)
        if same or value is None:
            terms.append(f"{name} {'' if same else '>= '}{bound[key]:.3f}")
        else:
            terms.append(f"{name} {value:.3f} >= {bound[key]:.3f}")
    line = (f"{kernel} copies per token and MoE layer (homes uniform): {', '.join(terms)}"
            f"{', the same for every placement' if same else ''}")
    if "dispatch_us" in bound:
        line += (f"; per layer dispatch >= {bound['dispatch_us']:.1f} us, combine >= "
                 f"{bound['combine_us']:.1f} us ({hardware or 'profile'}, "
                 f"{tokens_per_step}-token steps)")
    return line


def _table_row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"placement": name, **{k: v for k, v in s.items()
                                  if isinstance(v, (int, float, np.integer, np.floating))
                                  and not isinstance(v, bool) and k not in _NOT_METRICS}}


# The comparison table's columns, as solve prints them (the JSON rows keep every metric).
TABLE_COLUMNS = ("placement", "load_imbalance_mean", "load_imbalance_max",
                 "cross_gpu_pair_fraction", "cross_node_pair_fraction", "traffic_static",
                 "traffic_static_remote_nodes", "traffic_follow", "active_experts_max",
                 "active_experts_imbalance", "step_ms")


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """The printed comparison: ``TABLE_COLUMNS`` that ``rows`` has, in that order."""
    return rows[[c for c in TABLE_COLUMNS if c in rows]]


# Summary fields that describe the run, not the placement (left out of the comparison table).
_NOT_METRICS = frozenset({"tokens", "num_layers", "num_experts", "num_gpus", "num_nodes",
                          "window", "steps", "tokens_per_step", "sample_fraction", "sample_seed",
                          "stopped_at_deadline"})

# Steps simulated for evaluate's step time: enough for a stable mean, few enough to be quick.
EVAL_SIM_STEPS = 16


def evaluate_with_baselines(source: Trace | TraceReader, placement: Placement, *,
                            window: int = 4096, home: str = "static",
                            current: Placement | None = None, expert_bytes: int = 0,
                            tokens_per_step: int | None = None,
                            gpu_speeds: np.ndarray | None = None,
                            name: str = "placement",
                            hardware: str = "h800-ib", kernel: str | None = "deepep-normal",
                            model_shape: str | None = None) -> Evaluation:
    """Score ``placement`` and the baselines (fitted to this same trace, which favours them) in
    one evaluator pass after one statistics pass; simulate the step time of each on the first
    ``EVAL_SIM_STEPS`` steps when ``model_shape`` is given or the trace names a model the
    simulator knows, its dispatch priced by ``kernel`` (``simulator.step_time``)."""
    from moeplace.solvers.evaluator import evaluate_many, migration
    from moeplace.solvers.registry import Cluster
    from moeplace.solvers.solve import baseline, default_groups
    from moeplace.traces import compute_stats

    # The baselines read the load only.
    stats = compute_stats(source, transitions=False, coactivation=False, samples=False,
                          show_progress=False)
    cluster = Cluster(placement.num_gpus, placement.num_nodes, placement.num_replicas)
    groups = default_groups(stats, None)
    plcs: dict[str, Placement] = {name: placement}
    skipped: list[str] = []
    for b in ("contiguous", "round_robin", "eplb", "eplb-distinct"):
        if b == "round_robin" and cluster.replicas:
            continue  # round-robin has no rule for replicas
        try:
            plcs[b] = baseline(b, stats, cluster, num_groups=groups)
        except MoeplaceError:  # a shape this baseline cannot place; the others still compare
            skipped.append(b)
    res = evaluate_many(source, list(plcs.values()), window=window, home=home,
                        show_progress=None, tokens_per_step=tokens_per_step,
                        gpu_speeds=gpu_speeds)
    own = res[0]
    for key in ("sample_fraction", "sample_seed", "stopped_at_deadline"):
        own.summary.pop(key, None)
    if current is not None:
        own.summary.update(migration(placement, current, expert_bytes))
    step_ms, note = _simulate(source, plcs, stats, hardware, tokens_per_step, gpu_speeds, kernel,
                              model_shape)
    rows = pd.DataFrame([{**_table_row(n, r.summary),
                          **({"step_ms": step_ms[n]} if n in step_ms else {})}
                         for n, r in zip(plcs, res, strict=True)])
    return Evaluation(own.summary, own.per_layer, rows, skipped, note)


def _simulate(source: Trace | TraceReader, plcs: dict[str, Placement], stats: Any,
              hardware: str, tokens_per_step: int | None,
              gpu_speeds: np.ndarray | None, kernel: str | None = None,
              model_shape: str | None = None) -> tuple[dict[str, float], str]:
    from moeplace.solvers.scoring import head_tokens
    from moeplace.solvers.simulator import Hardware, ModelShape, guess_shape, step_time

    shape = model_shape or guess_shape(stats.meta.model or stats.meta.source or "")
    if shape is None:
        return {}, ("no simulated step (the trace names no model the simulator knows; "
                    "solve --model-shape simulates one)")
    B = tokens_per_step or 4096
    tr = head_tokens(source, EVAL_SIM_STEPS * B)
    hw, ms = Hardware.load(hardware), ModelShape.named(shape)
    return {k: 1e3 * step_time(tr, p, hw, ms, B, gpu_speeds=gpu_speeds, kernel=kernel)["step_s"]
            for k, p in plcs.items()}, ""


# ---- the picture -----------------------------------------------------------------------------
def require_matplotlib(purpose: str = "--plot") -> None:
    """Fail before any work when the plot cannot be drawn (one line: how to install it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("matplotlib", purpose, "plot") from None


def plot_against(source: Trace | TraceReader | Callable[[], Iterable[Trace]],
                 placements: dict[str, Placement], path: str, *, ours: str,
                 reference: str = "eplb", title: str = "", window: int = 4096) -> None:
    """Save per-GPU load (heatmaps, layers x GPUs, load / the layer's mean) and per-layer
    balance and traffic (remote GPUs per token, and remote nodes on several nodes) of
    ``placements[ours]`` against ``placements[reference]`` on ``source`` (a trace, or a function
    returning fresh chunks, e.g. the held-out side of a split). Loads are the evaluator's
    (static home, the replica rule); the file is written atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moeplace._fileio import atomic_path
    from moeplace.solvers.evaluator import Evaluator

    if ours not in placements or reference not in placements:
        raise InputError("--plot", "placements", f"needs {ours!r} and {reference!r}",
                         "solve with the EPLB baseline in the comparison")
    pair = [placements[ours], placements[reference]]
    chunks = source() if callable(source) else as_source_chunks(source)
    ev: Evaluator | None = None
    for c in chunks:
        if ev is None:
            ev = Evaluator(pair, c.num_layers, c.num_experts, window=window)
        ev.add(c)
    if ev is None:
        raise InputError("--plot", "trace", "no tokens to draw", "give a non-empty trace")
    res = ev.results()
    L = pair[0].num_layers
    loads = [ev.gpu_load[i, :, :p.num_gpus].astype(np.float64) for i, p in enumerate(pair)]
    rel = [x / np.maximum(x.mean(axis=1, keepdims=True), 1e-12) for x in loads]
    # One colour scale centred on the mean (1.0), so both maps read alike.
    spread = max(max(float(np.abs(r - 1.0).max()) for r in rel), 0.01)
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    names = (ours, reference)
    for j in range(2):
        im = ax[0, j].imshow(rel[j], aspect="auto", cmap="coolwarm", vmin=1.0 - spread,
                             vmax=1.0 + spread, interpolation="nearest")
        if pair[j].num_gpus <= 32:
            ax[0, j].set_xticks(np.arange(pair[j].num_gpus))
        ax[0, j].set(title=f"{names[j]}: GPU load / layer mean (max/mean "
                           f"{res[j].summary['load_imbalance_mean']:.3f})",
                     xlabel="GPU", ylabel="MoE layer")
        fig.colorbar(im, ax=ax[0, j])
    layers = np.arange(L)
    tokens = max(res[0].summary["tokens"], 1)
    for j, style in ((0, "-o"), (1, "--s")):
        ax[1, 0].plot(layers, res[j].per_layer["load_imbalance"], style, label=names[j])
        ax[1, 1].plot(layers, res[j].per_layer["traffic_static_gpus"] / tokens, style,
                      label=f"{names[j]}: remote GPUs")
        if pair[0].num_nodes > 1:
            ax[1, 1].plot(layers, res[j].per_layer["traffic_static_nodes"] / tokens, style,
                          alpha=0.5, label=f"{names[j]}: remote nodes")
    ax[1, 0].set(title="balance per layer (max/mean GPU load)", xlabel="MoE layer",
                 ylabel="max / mean")
    ax[1, 1].set(title="traffic per layer (per token, static home)", xlabel="MoE layer",
                 ylabel="per token")
    for a in (ax[1, 0], ax[1, 1]):
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title or f"{ours} vs {reference}")
    fig.tight_layout()
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format={"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix))
    finally:
        plt.close(fig)


def as_source_chunks(source: Trace | TraceReader, chunk_tokens: int = 1 << 16
                     ) -> Iterable[Trace]:
    """The chunks of an in-memory trace or a reader (streamed)."""
    from moeplace.traces.store import as_chunks

    return as_chunks(source, chunk_tokens)[0]


__all__ = ["TABLE_COLUMNS", "WHERE", "Comparison", "Evaluation", "Hidden", "best_baseline",
           "evaluate_with_baselines", "headline", "hidden_columns", "plot_against",
           "require_matplotlib", "table", "visible_columns"]

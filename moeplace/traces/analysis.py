"""Offline analysis of routing statistics: per-layer skew, cross-layer affinity and drift as DataFrames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moeplace.errors import InputError
from moeplace.traces.stats import RoutingStats
from moeplace.traces.store import TraceReader
from moeplace.traces.trace import Trace


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=axis)


def mutual_information(transitions: np.ndarray) -> np.ndarray:
    """Bits shared between a token's expert at l and at l+1, per layer pair, over k*k pairs."""
    joint = transitions.astype(np.float64)
    tot = joint.sum(axis=(1, 2), keepdims=True)
    joint = np.divide(joint, tot, out=np.zeros_like(joint), where=tot > 0)
    pa, pb = joint.sum(axis=2), joint.sum(axis=1)
    return _entropy_bits(pa) + _entropy_bits(pb) - _entropy_bits(joint.reshape(len(joint), -1))


def next_layer_concentration(transitions: np.ndarray, top: int) -> np.ndarray:
    """Per layer pair: load-weighted mean share of an expert's next-layer pairs that go to its
    ``top`` most frequent successors (``top / N`` if routing were independent and uniform)."""
    t = transitions.astype(np.float64)
    out_tot = t.sum(axis=2)
    top_sum = np.sort(t, axis=2)[:, :, ::-1][:, :, :top].sum(axis=2)
    tot = out_tot.sum(axis=1)
    return np.divide(top_sum.sum(axis=1), tot, out=np.zeros_like(tot), where=tot > 0)


def layer_table(stats: RoutingStats, top: int | None = None) -> pd.DataFrame:
    """One row per MoE layer: tokens, load skew and entropy, and affinity to the next layer."""
    L, N = stats.load.shape
    load = stats.load.astype(np.float64)
    mean = load.mean(axis=1)
    p = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    df = pd.DataFrame({
        "layer": np.arange(L),
        "hidden_layer": list(stats.meta.moe_layer_ids),
        "assignments": stats.load.sum(axis=1),
        # expert-level skew; GPU-level balance is load_imbalance (evaluator, solve)
        "expert_load_ratio": np.divide(load.max(axis=1), mean, out=np.ones(L), where=mean > 0),
        "load_cv": np.divide(load.std(axis=1), mean, out=np.zeros(L), where=mean > 0),
        "load_entropy": _entropy_bits(p) / max(np.log2(N), 1e-12),
        "hot_expert": load.argmax(axis=1),
        "hot_share": p.max(axis=1),
    })
    if stats.transitions is not None and L > 1:
        top = top or stats.meta.top_k
        mi = np.full(L, np.nan)
        mi[:-1] = mutual_information(stats.transitions)
        conc = np.full(L, np.nan)
        conc[:-1] = next_layer_concentration(stats.transitions, top)
        df["mi_next_bits"] = mi
        df[f"next_top{top}_share"] = conc
        df[f"next_top{top}_share_uniform"] = top / N
    return df


def top_transitions(stats: RoutingStats, n: int = 10) -> pd.DataFrame:
    """The ``n`` heaviest (layer, expert, next expert) transitions, with the share of the
    source expert's outgoing pairs each takes."""
    t = stats.require_transitions()
    flat = t.ravel()
    n = min(n, flat.size)
    idx = np.argpartition(-flat, n - 1)[:n]
    idx = idx[np.argsort(-flat[idx], kind="stable")]
    l, a, b = np.unravel_index(idx, t.shape)
    out_tot = t.sum(axis=2)
    return pd.DataFrame({"layer": l, "expert": a, "next_expert": b, "pairs": flat[idx],
                         "share_of_expert": flat[idx] / np.maximum(out_tot[l, a], 1)})


def drift(trace: Trace | TraceReader, windows: int = 8) -> pd.DataFrame:
    """Per window of consecutive tokens: Jensen-Shannon divergence (bits) of each layer's load
    from the whole trace's, averaged over layers; large values mean placements go stale.
    A reader is streamed (one pass, memory of ``windows`` load tables)."""
    from moeplace.traces.store import as_chunks

    chunks, meta, T = as_chunks(trace, 1 << 16, weights=False, token_fields=False)
    if T is None:
        raise InputError(meta.source or "trace", "experts", "drift needs the token count",
                         "pass a trace or a reader")
    L, N = meta.num_layers, meta.num_experts
    windows = max(1, min(windows, T))
    bounds = np.linspace(0, T, windows + 1).astype(int)
    offs = (np.arange(L) * N)[None, :, None]
    counts = np.zeros((windows, L, N), np.int64)
    start = 0
    for c in chunks:
        e = c.experts
        stop = start + len(e)
        for w in range(windows):  # the part of this chunk inside window w
            lo, hi = max(bounds[w], start), min(bounds[w + 1], stop)
            if lo < hi:
                counts[w] += np.bincount((e[lo - start:hi - start].astype(np.int64) + offs)
                                         .ravel(), minlength=L * N).reshape(L, N)
        start = stop

    def dist(c: np.ndarray) -> np.ndarray:
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1)

    whole = dist(counts.sum(axis=0))
    rows = []
    for w in range(windows):
        part = dist(counts[w])
        m = (part + whole) / 2
        js = _entropy_bits(m) - (_entropy_bits(part) + _entropy_bits(whole)) / 2
        rows.append({"window": w, "start_token": bounds[w], "tokens": bounds[w + 1] - bounds[w],
                     "js_divergence_mean": float(js.mean()), "js_divergence_max": float(js.max())})
    return pd.DataFrame(rows)


def summary(stats: RoutingStats, table: pd.DataFrame | None = None) -> dict[str, Any]:
    """Machine-readable overview (what ``moeplace analyze --json`` prints)."""
    table = layer_table(stats) if table is None else table
    out: dict[str, Any] = {
        "model": stats.meta.model,
        "source": stats.meta.source,
        "tokens": int(stats.num_tokens),
        "dropped_tokens": stats.dropped_tokens,
        "num_layers": stats.num_layers,
        "num_experts": stats.num_experts,
        "top_k": stats.meta.top_k,
        "moe_layer_ids": list(stats.meta.moe_layer_ids),
        "load": stats.load.tolist(),
        "expert_load_ratio_mean": float(table["expert_load_ratio"].mean()),
        "expert_load_ratio_max": float(table["expert_load_ratio"].max()),
        "load_entropy_mean": float(table["load_entropy"].mean()),
    }
    if "mi_next_bits" in table:
        out["mi_next_bits_median"] = float(np.nanmedian(table["mi_next_bits"]))
        col = next(c for c in table.columns if c.startswith("next_top") and
                   c.endswith("_share"))
        out["next_topk_share_mean"] = float(np.nanmean(table[col]))
    out["layers"] = table.replace({np.nan: None}).to_dict(orient="records")
    return out


def plot(stats: RoutingStats, path: str) -> None:
    """Save load and transition heatmaps as an image (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from moeplace.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "--plot", "plot") from None
    from moeplace._fileio import atomic_path

    has_t = stats.transitions is not None and stats.num_layers > 1
    fig, axes = plt.subplots(1, 2 if has_t else 1, figsize=(13 if has_t else 7, 5), squeeze=False)
    share = stats.load / np.maximum(stats.load.sum(axis=1, keepdims=True), 1)
    im = axes[0, 0].imshow(share * stats.num_experts, aspect="auto", cmap="viridis")
    axes[0, 0].set(title="expert load / mean load", xlabel="expert", ylabel="MoE layer")
    fig.colorbar(im, ax=axes[0, 0])
    if has_t:
        mi = mutual_information(stats.transitions)  # type: ignore[arg-type]
        l = int(np.argmax(mi))
        t = stats.transitions[l].astype(np.float64)  # type: ignore[index]
        rows = t / np.maximum(t.sum(axis=1, keepdims=True), 1)
        im2 = axes[0, 1].imshow(rows, aspect="auto", cmap="magma")
        axes[0, 1].set(title=f"P(next expert | expert), layer {l}->{l + 1} ({mi[l]:.2f} bits)",
                       xlabel=f"expert at layer {l + 1}", ylabel=f"expert at layer {l}")
        fig.colorbar(im2, ax=axes[0, 1])
    fig.suptitle(stats.meta.model or stats.meta.source)
    fig.tight_layout()
    suffix = path.rsplit(".", 1)[-1] if "." in path else "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=suffix)
    plt.close(fig)

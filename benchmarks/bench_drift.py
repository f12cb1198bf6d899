"""Drift splits: fit placements on one kind of traffic, score them on another (issue 12, part 2).

Each split divides a pool of tokens into two parts that differ in kind (topic, prompt source,
dataset, prefill vs decode, batching period, subject mix), never a random request split. Every
split is run in both directions (fit on A, score on B, and the reverse). For each split,
direction and cluster the placements of ``search``, the library's default (``solve_with_report``
called without ``method``), ``eplb``, ``eplb-distinct`` and ``contiguous`` are fitted on the fit
part's statistics and scored on the held-out part by the per-token evaluator
(``evaluate_many``, static home: DeepEP-style dispatch, requests round-robin over GPUs). The
check of the issue's acceptance: the default solver's held-out ``load_imbalance_mean`` is no
higher than EPLB's.

The splits (reference traces in ``--shared``/traces, see their READMEs):

- ``deepseek/topic``: DeepSeek-V2-Lite prefill over Puffin prompts, ``code`` (a prompt whose
  text, rebuilt from ``tokens.jsonl.gz`` and lower-cased, contains one of ``CODE_WORDS`` as a
  word, or a code character ``{ } ;``, ``=>``, ``c++``, ``c#`` or a code fence) vs ``other``.
- ``deepseek/half``: prompt ids 1-500 vs 501-1000 (the Puffin file's order: different chats).
- ``mixtral/dataset``: Mixtral-8x7B decode tokens of GSM8K vs HumanEval (the ``dataset`` field;
  lost records, id 255, dropped and counted as the README says).
- ``mixtral/phase``: Mixtral's HumanEval prompt tokens (``prefill_experts``, 59 complete of
  135) vs all decode tokens. Small; kept because it is the only prefill/decode pair with all
  layers.
- ``flame/prefill-vs-first10``: FLAME-MoE-290M's 2,048 contiguous tokens (4 sequences x 512) vs
  the first 10 positions of sequences 4-63 of the per-position file (sequences 0-3 repeat tokens
  of the first file and are left out, so no token is in both parts).
- ``qwen/early-late``: Qwen1.5-MoE batching steps 0-30 (the prompt prefills and early decode,
  half the tokens) vs steps 31-128 (late decode only); ``qwen/prefill-decode``: steps 0-1 vs 2-.
- ``synthetic/subjects``: a Llama-4-Maverick-like model (24 MoE layers, top-1 of 128, heavy
  skew), one synthetic model (``SyntheticRouter``) whose 58 topics stand for MMLU subjects; part
  A draws tokens from subjects 0-28, part B from 29-57 (a token keeps its subject through all
  layers), mimicking the issue's "fitted on some subjects, scored on others".

Usage::

    python benchmarks/bench_drift.py --out drift.md [--time-limit 10] [--only deepseek]

From Python, one split quickly::

    from benchmarks.bench_drift import run_one
    df = run_one("qwen/early-late", gpus=8, nodes=2, replicas=4, time_limit=5)
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moeplace.solvers import Cluster, evaluate_many, solve_with_report
from moeplace.traces import SyntheticRouter, SyntheticSpec, Trace, compute_stats, import_trace

DEFAULT_SHARED = Path(os.environ.get("MOEPLACE_SHARED",
                                     Path(__file__).resolve().parents[2] / "shared"))
# "default": solve_with_report without a method argument (whatever the library's default is).
METHODS = ("default", "search", "eplb", "eplb-distinct", "contiguous")
# Per-token metrics reported for the held-out part (and the fitted part: prefix fit_).
METRICS = ("load_imbalance_mean", "load_imbalance_max", "window_imbalance_mean",
           "traffic_static", "traffic_static_remote_nodes")

DEEPSEEK = "deepseek-v2-lite-puffin-prefill/deepseek_v2_lite_prefill_routing.npz"
DEEPSEEK_TOKENS = "deepseek-v2-lite-puffin-prefill/tokens.jsonl.gz"
MIXTRAL = "mixtral-8x7b-fp8-decode/mixtral_8x7b_fp8_decode.npz"
MIXTRAL_MISSING = 255  # the Mixtral README's lost-record marker
FLAME_PREFILL = "flame-moe-290m/flame_moe_290m_prefill_2048tok.npz"
FLAME_FIRST10 = "flame-moe-290m/flame_moe_290m_first10pos_64seq.npz"
QWEN = "qwen1.5-moe-a2.7b-5layers/qwen15_moe_a27b_5layers.npz"

# The topic rule of deepseek/topic: programming and software words (whole words of the
# lower-cased prompt text). Words that are as common outside code ("function" in maths,
# "method" in chemistry, "script" for films) are left out on purpose.
CODE_WORDS = (
    "code", "coding", "program", "programming", "programmer", "developer", "software",
    "python", "java", "javascript", "typescript", "php", "sql", "html", "css", "nodejs",
    "node.js", "react", "api", "json", "regex", "database", "server", "linux", "git", "github",
    "docker", "compile", "compiler", "debug", "bug", "excel", "spreadsheet", "sheets", "query",
    "app", "website", "backend", "frontend")
_CODE_RE = re.compile(r"(?<![a-z])(" + "|".join(re.escape(w) for w in CODE_WORDS)
                      + r")(?![a-z])|```|[{};]|=>|c\+\+|c#")

# Clusters (gpus, nodes, replicas) per model shape: 8 GPUs in 1 and 2 nodes, without and with
# 8 replicas. Qwen's 60 experts do not split over 8 GPUs, so it gets 6 GPUs without replicas
# and 8 GPUs with the 4 replicas that make the slots split evenly. Mixtral's 8 experts on 8
# GPUs without replicas leave no choice (one expert per GPU), so it uses 4 GPUs.
CLUSTERS_64 = ((8, 1, 0), (8, 2, 0), (8, 1, 8), (8, 2, 8))
CLUSTERS_QWEN = ((6, 1, 0), (6, 2, 0), (8, 1, 4), (8, 2, 4))
CLUSTERS_MIXTRAL = ((4, 1, 0), (4, 2, 0), (4, 1, 4), (8, 2, 8))


@dataclass
class Split:
    """A pool of tokens and a mask: ``pool.select(in_a)`` is part A, the rest part B."""

    name: str
    pool: Trace
    in_a: np.ndarray
    labels: tuple[str, str]
    clusters: tuple[tuple[int, int, int], ...]
    note: str = ""
    # Where each pool token came from (file and row), for the partition checks.
    origin: dict[str, np.ndarray] = field(default_factory=dict)

    def parts(self) -> tuple[Trace, Trace]:
        """(A, B), tokens in pool order."""
        return self.pool.select(self.in_a), self.pool.select(~self.in_a)

    def directions(self) -> list[tuple[str, str, Trace, Trace]]:
        """Both directions: (fit label, score label, fit part, held-out part)."""
        a, b = self.parts()
        return [(self.labels[0], self.labels[1], a, b), (self.labels[1], self.labels[0], b, a)]


# ---- reading the traces ---------------------------------------------------------------------
def _raw(path: Path, *names: str) -> dict[str, np.ndarray]:
    """Members of an npz the project's reader does not turn into trace fields."""
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in names}


def prompt_texts(path: Path) -> dict[int, str]:
    """Prompt id -> lower-cased text rebuilt from the tokenizer pieces (Ġ space, Ċ newline)."""
    out: dict[int, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            toks = row["tokens"][1:]  # drop BOS
            out[int(row["prompt_id"])] = "".join(
                t.replace("\u0120", " ").replace("\u010a", "\n") for t in toks).lower()
    return out


def is_code(text: str) -> bool:
    """The topic rule of ``deepseek/topic`` (see ``CODE_WORDS``)."""
    return _CODE_RE.search(text) is not None


def _row_origin(n: int, tag: int) -> dict[str, np.ndarray]:
    return {"file": np.full(n, tag, np.int8), "row": np.arange(n, dtype=np.int64)}


def deepseek_splits(shared: Path) -> list[Split]:
    path = shared / "traces" / DEEPSEEK
    tr = import_trace(path)
    pid = tr.tokens["request"]
    texts = prompt_texts(shared / "traces" / DEEPSEEK_TOKENS)
    missing = sorted(set(np.unique(pid).tolist()) - set(texts))
    if missing:
        raise SystemExit(f"{DEEPSEEK_TOKENS}: no text for prompts {missing[:5]}")
    code_ids = np.array(sorted(p for p, t in texts.items() if is_code(t)), np.int64)
    in_code = np.isin(pid, code_ids)
    n_code = len(np.intersect1d(code_ids, np.unique(pid)))
    origin = _row_origin(tr.num_tokens, 0)
    return [
        Split("deepseek/topic", tr, in_code, ("code", "other"), CLUSTERS_64,
              f"{n_code} code prompts / {len(np.unique(pid)) - n_code} other (keyword rule)",
              origin),
        Split("deepseek/half", tr, pid <= 500, ("prompts 1-500", "prompts 501-1000"),
              CLUSTERS_64, "first vs second half of the Puffin prompt ids", origin),
    ]


def mixtral_splits(shared: Path) -> list[Split]:
    path = shared / "traces" / MIXTRAL
    dec = import_trace(path, missing_id=MIXTRAL_MISSING)
    raw = _raw(path, "experts", "dataset", "dataset_names", "prefill_experts")
    kept = ~(raw["experts"] == MIXTRAL_MISSING).any(axis=(1, 2))
    # The reader drops the same tokens (any lost record); check rather than assume.
    if int(kept.sum()) != dec.num_tokens or not np.array_equal(raw["experts"][kept], dec.experts):
        raise SystemExit(f"{MIXTRAL}: the reader's tokens differ from the file's complete rows")
    dataset = raw["dataset"][kept]
    names = [str(x) for x in raw["dataset_names"]]
    pe = raw["prefill_experts"]
    pkeep = ~(pe == MIXTRAL_MISSING).any(axis=(1, 2))
    # Prompt tokens of HumanEval problem 0: one request, numbered after every decode request.
    req = int(dec.request_ids().max()) + 1
    pre = Trace(experts=pe[pkeep], meta=dec.meta,
                tokens={"request": np.full(int(pkeep.sum()), req, np.int64),
                        "position": np.flatnonzero(pkeep).astype(np.int32)})
    pool = Trace.concat([dec, pre])
    origin = {"file": np.r_[np.zeros(dec.num_tokens, np.int8), np.ones(pre.num_tokens, np.int8)],
              "row": np.r_[np.flatnonzero(kept), np.flatnonzero(pkeep)].astype(np.int64)}
    return [
        Split("mixtral/dataset", dec, dataset == 0, (names[0], names[1]), CLUSTERS_MIXTRAL,
              f"decode tokens; {int((~kept).sum())} with a lost record dropped",
              _row_origin(dec.num_tokens, 0) | {"row": np.flatnonzero(kept)}),
        Split("mixtral/phase", pool, np.r_[np.zeros(dec.num_tokens, bool),
                                            np.ones(pre.num_tokens, bool)],
              ("prefill", "decode"), CLUSTERS_MIXTRAL,
              f"{pre.num_tokens} complete prompt tokens of {len(pe)}; tiny", origin),
    ]


def flame_splits(shared: Path) -> list[Split]:
    a = import_trace(shared / "traces" / FLAME_PREFILL)
    b = import_trace(shared / "traces" / FLAME_FIRST10)
    if (a.num_layers, a.num_experts, a.top_k, a.meta.moe_layer_ids) != (
            b.num_layers, b.num_experts, b.top_k, b.meta.moe_layer_ids):
        raise SystemExit("FLAME files disagree in layers/experts/top-k: no split")
    # Sequences of the per-position file whose tokens are rows 512*s .. 512*s+9 of the
    # 2,048-token file (its README: s < 4) are the same tokens: leave them out of part B.
    P = int(b.tokens["position"].max()) + 1
    seq = b.tokens["request"]
    pos = b.tokens["position"]
    dup = np.zeros(b.num_tokens, bool)
    for s in np.unique(seq):
        rows = 512 * int(s) + np.arange(P)
        if rows[-1] < a.num_tokens:
            m = seq == s
            dup[m] = np.array_equal(b.experts[m][np.argsort(pos[m])], a.experts[rows])
    b_new = b.select(~dup)
    # Distinct request ids across the two files (file A: one request per 512-token sequence).
    a = Trace(experts=a.experts, meta=a.meta, weights=a.weights,
              tokens={"request": np.arange(a.num_tokens, dtype=np.int64) // 512,
                      "position": (np.arange(a.num_tokens) % 512).astype(np.int32)})
    b_new = Trace(experts=b_new.experts, meta=a.meta, weights=b_new.weights,
                  tokens={"request": b_new.tokens["request"] + 1000,
                          "position": b_new.tokens["position"]})
    pool = Trace.concat([a, b_new])
    origin = {"file": np.r_[np.zeros(a.num_tokens, np.int8), np.ones(b_new.num_tokens, np.int8)],
              "row": np.r_[np.arange(a.num_tokens), np.flatnonzero(~dup)].astype(np.int64)}
    return [Split("flame/prefill-vs-first10", pool,
                  np.r_[np.ones(a.num_tokens, bool), np.zeros(b_new.num_tokens, bool)],
                  ("2048 contiguous", "first 10 positions"), CLUSTERS_64,
                  f"{int(dup.sum())} duplicated tokens (sequences 0-3) left out", origin)]


def qwen_splits(shared: Path) -> list[Split]:
    tr = import_trace(shared / "traces" / QWEN)
    step = tr.tokens["step"]
    counts = np.bincount(step)
    half = int(np.searchsorted(np.cumsum(counts), tr.num_tokens / 2))  # step holding the median
    origin = _row_origin(tr.num_tokens, 0)
    return [
        Split("qwen/early-late", tr, step <= half, (f"steps 0-{half}", f"steps {half + 1}-"),
              CLUSTERS_QWEN, "batching steps before/after the median token", origin),
        Split("qwen/prefill-decode", tr, step <= 1, ("steps 0-1 (prefill)", "steps 2- (decode)"),
              CLUSTERS_QWEN, "prompt prefill steps vs decode steps", origin),
    ]


MAVERICK_LIKE = SyntheticSpec(num_layers=24, num_experts=128, top_k=1, skew=1.2, affinity=0.9,
                              stickiness=1.0, num_topics=58, focus_size=8,
                              model="synthetic-maverick-like")


def synthetic_split(tokens: int = 60_000, spec: SyntheticSpec = MAVERICK_LIKE,
                    seed: int = 0) -> Split:
    """Two traffic mixes of one synthetic model: subjects (topics) 0..H/2-1 vs H/2..H-1."""
    H = spec.num_topics
    parts = []
    for i, subjects in enumerate((np.arange(H // 2), np.arange(H // 2, H))):
        router = SyntheticRouter(spec, seed=seed)  # the same model for both mixes
        if not hasattr(router, "topic_prior"):
            raise SystemExit("SyntheticRouter has no topic_prior: update synthetic_split")
        prior = np.zeros(H)
        prior[subjects] = np.random.default_rng(seed + 10 + i).dirichlet(
            np.full(len(subjects), 2.0))
        router.topic_prior = prior
        tr = Trace.concat(list(router.sample(tokens, seed=seed + 100 + i)))
        # Requests of the two mixes are different requests.
        tr.tokens["request"] = tr.tokens["request"] + i * (1 << 40)
        parts.append(tr)
    pool = Trace.concat(parts)
    origin = {"file": np.r_[np.zeros(tokens, np.int8), np.ones(tokens, np.int8)],
              "row": np.r_[np.arange(tokens), np.arange(tokens)].astype(np.int64)}
    return Split("synthetic/subjects", pool, np.r_[np.ones(tokens, bool), np.zeros(tokens, bool)],
                 ("subjects 0-28", "subjects 29-57"), CLUSTERS_64,
                 f"Llama-4-Maverick-like: {spec.num_layers} x {spec.num_experts}, top-1, skew "
                 f"{spec.skew}; {tokens} tokens per mix", origin)


SPLITS: dict[str, Callable[[Path], list[Split]]] = {
    "deepseek": deepseek_splits, "mixtral": mixtral_splits, "flame": flame_splits,
    "qwen": qwen_splits, "synthetic": lambda _shared: [synthetic_split()],
}
SPLIT_NAMES = ("deepseek/topic", "deepseek/half", "mixtral/dataset", "mixtral/phase",
               "flame/prefill-vs-first10", "qwen/early-late", "qwen/prefill-decode",
               "synthetic/subjects")


def build_splits(shared: Path = DEFAULT_SHARED, only: str | None = None) -> list[Split]:
    """All splits whose name contains ``only`` (all when None); a family whose files are absent
    is skipped with a note on stderr."""
    out: list[Split] = []
    for family, build in SPLITS.items():
        if only and not any(only in n for n in SPLIT_NAMES if n.startswith(family + "/")):
            continue
        try:
            splits = build(shared)
        except FileNotFoundError as exc:
            print(f"skipped {family}: {exc}", file=sys.stderr)
            continue
        out.extend(s for s in splits if not only or only in s.name)
    return out


# ---- fitting and scoring --------------------------------------------------------------------
def _accepts(fn: Callable[..., Any], **kw: Any) -> dict[str, Any]:
    """The keyword arguments ``fn`` takes (all of them if it takes ``**kwargs``): the library's
    signatures grow options, and this benchmark passes only what exists."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def _cluster(gpus: int, nodes: int, replicas: int) -> Cluster:
    return Cluster(**_accepts(Cluster, num_gpus=gpus, num_nodes=nodes, replicas=replicas))


def fit(stats: Any, cluster: Cluster, method: str, time_limit: float,
        solve_kw: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """One placement from the fit part's statistics (``default``: no method argument).
    ``solve_kw``: extra options for ``solve_with_report`` (e.g. ``engine``), passed to every
    method, the ones it does not take dropped."""
    kw: dict[str, Any] = {**(solve_kw or {}), "time_limit": time_limit}
    if method != "default":
        kw["method"] = method
    return solve_with_report(stats, cluster, **_accepts(solve_with_report, **kw))


def score(trace: Trace, placements: list[Any]) -> list[dict[str, Any]]:
    """Per-token evaluator summaries (static home), one per placement."""
    res = evaluate_many(trace, placements,
                        **_accepts(evaluate_many, home="static", show_progress=False))
    return [r.summary for r in res]


def run_split(split: Split, clusters: Iterable[tuple[int, int, int]] | None = None,
              methods: Iterable[str] = METHODS, time_limit: float = 10.0,
              directions: Iterable[int] = (0, 1), log: bool = False,
              solve_kw: dict[str, Any] | None = None) -> pd.DataFrame:
    """Fit every method on each direction's fit part and cluster; one row per
    (direction, cluster, method) with held-out metrics, fitted metrics and solve seconds."""
    rows: list[dict[str, Any]] = []
    dirs = split.directions()
    for d in directions:
        fit_label, held_label, fit_part, held_part = dirs[d]
        stats = _call_stats(fit_part)
        for G, M, R in (clusters or split.clusters):
            c = _cluster(G, M, R)
            plcs, infos = [], []
            for m in methods:
                t0 = time.perf_counter()
                try:
                    plc, rep = fit(stats, c, m, time_limit, solve_kw)
                except Exception as exc:  # a method that does not apply here: say why
                    infos.append({"method": m, "note": f"{type(exc).__name__}: {exc}"[:80]})
                    continue
                plcs.append(plc)
                infos.append({"method": m, "resolved": getattr(rep, "method", m),
                              "status": getattr(rep, "status", ""),
                              "seconds": time.perf_counter() - t0})
            held = iter(score(held_part, plcs)) if plcs else iter(())
            fitted = iter(score(fit_part, plcs)) if plcs else iter(())
            for info in infos:
                row: dict[str, Any] = {"split": split.name, "fit": fit_label,
                                       "scored": held_label, "gpus": G, "nodes": M,
                                       "replicas": R, "fit_tokens": fit_part.num_tokens,
                                       "held_tokens": held_part.num_tokens, **info}
                if "note" not in info:
                    h, f = next(held), next(fitted)
                    row["scored_tokens"] = h["tokens"]
                    row.update({k: h[k] for k in METRICS})
                    row.update({f"fit_{k}": f[k] for k in METRICS})
                rows.append(row)
            if log:
                print(f"  {split.name} {fit_label} -> {held_label} {G}/{M}/{R} done",
                      file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def _call_stats(trace: Trace) -> Any:
    return compute_stats(trace, **_accepts(compute_stats, show_progress=False))


def verdicts(df: pd.DataFrame, tol: float = 0.0) -> pd.DataFrame:
    """One row per (split, direction, cluster): held-out ``load_imbalance_mean`` of each method
    and PASS when the default's is at most EPLB's (+ ``tol``)."""
    keys = ["split", "fit", "scored", "gpus", "nodes", "replicas"]
    ok = df[df["load_imbalance_mean"].notna()] if "load_imbalance_mean" in df else df.iloc[:0]
    wide = ok.pivot_table(index=keys, columns="method", values="load_imbalance_mean",
                          sort=False).reset_index()
    # Rows in the order they were run (pivot_table groups them otherwise).
    first = {tuple(r): i for i, r in reversed(list(enumerate(ok[keys].itertuples(index=False))))}
    wide = wide.iloc[np.argsort([first[tuple(r)] for r in wide[keys].itertuples(index=False)],
                                kind="stable")].reset_index(drop=True)
    fit_def = ok[ok["method"] == "default"].set_index(keys)["fit_load_imbalance_mean"]
    wide["fit_default"] = [fit_def.get(tuple(r[k] for k in keys), np.nan)
                           for _, r in wide.iterrows()]
    if "default" in wide and "eplb" in wide:
        wide["default_minus_eplb"] = wide["default"] - wide["eplb"]
        wide["verdict"] = np.where(wide["default"] <= wide["eplb"] + tol + 1e-12, "PASS",
                                   np.where(wide["default"].isna() | wide["eplb"].isna(),
                                            "n/a", "FAIL"))
    return wide


def run_one(name: str, gpus: int | None = None, nodes: int = 1, replicas: int = 0,
            time_limit: float = 10.0, shared: Path | str = DEFAULT_SHARED,
            methods: Iterable[str] = METHODS, directions: Iterable[int] = (0, 1),
            solve_kw: dict[str, Any] | None = None) -> pd.DataFrame:
    """Rerun one split by name (e.g. ``"deepseek/topic"``) on one cluster (all of the split's
    clusters when ``gpus`` is None); returns the verdict table (``.attrs["rows"]``: all rows)."""
    splits = [s for s in build_splits(Path(shared), name.split("/")[0]) if s.name == name]
    if not splits:
        raise ValueError(f"no split {name!r}; known: {[s.name for s in build_splits(Path(shared))]}")
    clusters = None if gpus is None else [(gpus, nodes, replicas)]
    df = run_split(splits[0], clusters, methods, time_limit, directions, solve_kw=solve_kw)
    v = verdicts(df)
    v.attrs["rows"] = df
    return v


# ---- output ---------------------------------------------------------------------------------
def md_table(df: pd.DataFrame, cols: list[str] | None = None) -> str:
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        cells = []
        for v in r.tolist():
            if isinstance(v, float):
                cells.append("" if np.isnan(v) else f"{v:.3f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(df: pd.DataFrame, splits: list[Split], command: str, seconds: float,
           time_limit: float) -> str:
    v = verdicts(df)
    n_pass = int((v.get("verdict") == "PASS").sum()) if "verdict" in v else 0
    n_fail = int((v.get("verdict") == "FAIL").sum()) if "verdict" in v else 0
    resolved = sorted(set(df.loc[df["method"] == "default", "resolved"].dropna()))
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; solver time limit {time_limit:g} s; {seconds:.0f} s in all.",
        "",
        "Held-out `load_imbalance_mean` (per-token evaluator, static home) of placements fitted "
        "on the other part; `default` is `solve_with_report` without `method` (here it resolved "
        f"to {', '.join(resolved) or 'nothing'}); cluster = GPUs/nodes/replicas. PASS: default "
        "<= eplb.",
        "",
        f"**{n_pass} PASS, {n_fail} FAIL** of {len(v)} (split, direction, cluster) rows.",
        "",
        *_per_split(v),
        "",
        "Splits:",
        "",
    ]
    for s in splits:
        a, b = int(s.in_a.sum()), int((~s.in_a).sum())
        lines.append(f"- `{s.name}`: {s.labels[0]} ({a} tokens) vs {s.labels[1]} ({b} tokens); "
                     f"{s.note}")
    v = v.assign(cluster=[f"{g}/{m}/{r}" for g, m, r in zip(v["gpus"], v["nodes"],
                                                              v["replicas"], strict=True)])
    lines += ["", md_table(v, ["split", "fit", "scored", "cluster", "fit_default", "default",
                               "search", "eplb", "eplb-distinct", "contiguous",
                               "default_minus_eplb", "verdict"]), ""]
    full = df.assign(cluster=[f"{g}/{m}/{r}" for g, m, r in zip(df["gpus"], df["nodes"],
                                                                 df["replicas"], strict=True)])
    lines += ["All metrics (held-out part; `fit_` = the same on the fitted part):", "",
              md_table(full, ["split", "fit", "cluster", "method", "resolved", "seconds",
                              *METRICS, *(f"fit_{k}" for k in METRICS), "note"]), ""]
    return "\n".join(lines)


def _per_split(v: pd.DataFrame) -> list[str]:
    """One line per split: verdict counts and the largest excess of default over EPLB."""
    if "verdict" not in v:
        return []
    out = []
    for name, g in v.groupby("split", sort=False):
        worst = g["default_minus_eplb"].max()
        out.append(f"- `{name}`: {int((g['verdict'] == 'PASS').sum())} PASS, "
                   f"{int((g['verdict'] == 'FAIL').sum())} FAIL; default - eplb at most "
                   f"{worst:+.3f}")
    return out


def _parse_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--solve-arg {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(DEFAULT_SHARED))
    ap.add_argument("--out", help="write the markdown report here (also printed)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per solve")
    ap.add_argument("--only", help="run only splits whose name contains this text")
    ap.add_argument("--csv", help="also write every row as CSV")
    ap.add_argument("--solve-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra solve_with_report option for every method (VALUE read as JSON "
                    "when it parses, else a string), e.g. --solve-arg engine=sglang")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    splits = build_splits(Path(args.shared), args.only)
    if not splits:
        print("no split to run (reference traces absent?)", file=sys.stderr)
        return 2
    solve_kw = dict(_parse_arg(a) for a in args.solve_arg)
    ignored = sorted(set(solve_kw) - set(_accepts(solve_with_report, **solve_kw)))
    if ignored:
        print(f"note: solve_with_report takes no {', '.join(ignored)}: ignored", file=sys.stderr)
    frames = [run_split(s, time_limit=args.time_limit, log=True, solve_kw=solve_kw)
              for s in splits]
    df = pd.concat(frames, ignore_index=True)
    cmd = "python benchmarks/bench_drift.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(df, splits, cmd.strip(), time.perf_counter() - t0, args.time_limit)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.csv:
        df.to_csv(args.csv, index=False)
    v = verdicts(df)
    for _, r in v.iterrows():
        print(f"{r.get('verdict', 'n/a')}: {r['split']} {r['fit']} -> {r['scored']} "
              f"{r['gpus']}/{r['nodes']}/{r['replicas']}: default {r.get('default', np.nan):.4f} "
              f"eplb {r.get('eplb', np.nan):.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

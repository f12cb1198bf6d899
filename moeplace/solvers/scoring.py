"""Score several placements on a streamed trace within a time budget, stating what was scored.

One pass over the trace feeds the evaluator (all placements at once) and, when a hardware
profile is given, collects a seeded sample of serving steps for the step-time simulator. When
the whole trace would not fit the budget, a seeded sample of whole windows is scored instead
(and said so); the deadline is a hard stop either way. A request-level holdout split is a
streaming mask: a request is held out when a hash of its id and the seed falls below the
fraction, so no split needs the trace in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers.evaluator import _keep_blocks, evaluate_many
from moeplace.traces import Trace, TraceReader
from moeplace.traces.store import as_chunks
from moeplace.traces.trace import held_request_ids

# Planning rates (conservative, one core): compiled evaluator token-layer-placement records/s,
# reading and decoding token-layer records/s, and simulator step-layer-placements/s.
EVAL_RATE = 10e6
EVAL_RATE_NUMPY = 3e5
READ_RATE = 60e6
SIM_RATE = 800.0


@dataclass
class ScoreReport:
    """Per-placement evaluator summaries (and simulated step times) plus what was scored."""

    summaries: dict[str, dict[str, Any]]
    step_ms: dict[str, float] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)


def request_ids(source: Trace | TraceReader) -> np.ndarray:
    """Sorted distinct request ids of a trace; a reader reads only its ``request`` column."""
    if isinstance(source, Trace):
        if "request" not in source.tokens:
            raise InputError(source.meta.source or "trace", "request",
                             "a holdout split needs per-request ids",
                             "record per-request metadata or drop --holdout")
        return np.unique(source.tokens["request"])
    if "request" not in source.token_fields:
        raise InputError(source.path, "request", "a holdout split needs per-request ids",
                         "record per-request metadata or drop --holdout")
    parts = [np.unique(v) for v in source.iter_column("request")]  # a phase view's only
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def held_requests(source: Trace | TraceReader, fraction: float, seed: int) -> np.ndarray:
    """The held-out request ids: the same seeded choice as ``Trace.split_requests``, found
    with one pass over the request column instead of the trace in memory."""
    return held_request_ids(request_ids(source), fraction, seed,
                            getattr(source, "path", None) or source.meta.source or "trace")


def split_stream(source: Trace | TraceReader, held: np.ndarray, part: str,
                 chunk_tokens: int = 1 << 16,
                 row_groups: set[tuple[int, int]] | None = None) -> Iterator[Trace]:
    """The ``part`` (``"fit"`` or ``"holdout"``) of a request split, chunk by chunk;
    ``held`` from ``held_requests``; ``row_groups`` limits a reader to those groups."""
    if row_groups is not None and isinstance(source, TraceReader):
        chunks: Iterator[Trace] = source.iter_chunks(chunk_tokens, row_groups=row_groups)
    else:
        chunks = as_chunks(source, chunk_tokens)[0]
    for c in chunks:
        mask = np.isin(c.tokens["request"], held)
        if part == "fit":
            mask = ~mask
        if mask.all():
            yield c
        elif mask.any():
            yield c.select(mask)


def sample_row_groups(reader: TraceReader, fraction: float, seed: int
                      ) -> tuple[set[tuple[int, int]], int]:
    """A seeded choice of about ``fraction`` of a reader's row groups (at least one) and
    their tokens: a sample that skips the rest of the file instead of reading it."""
    groups = reader.row_groups()
    keep = _keep_blocks(np.arange(len(groups)), fraction, seed)
    if not keep.any():
        keep[0] = True
    chosen = {(fi, g) for (fi, g, _n), k in zip(groups, keep, strict=True) if k}
    return chosen, sum(n for (fi, g, n) in groups if (fi, g) in chosen)


def plan_sample(tokens: int, layers: int, placements: int, seconds: float,
                compiled: bool, window: int = 4096) -> float:
    """Fraction of windows to score so the pass fits ``seconds`` (1.0 when all fits), never
    below about 16 windows (the deadline still stops the pass)."""
    rate = EVAL_RATE if compiled else EVAL_RATE_NUMPY
    cost = tokens * layers * (placements / rate + 1.0 / READ_RATE)
    if cost <= 0 or seconds >= cost:
        return 1.0
    f = min(1.0, max(seconds / cost, 16 * window / max(tokens, 1)))
    # Two significant digits, rounded down: the stated rate (and so the windows chosen for a
    # seed) does not wobble with the milliseconds left.
    unit = 10.0 ** (math.floor(math.log10(f)) - 1)
    return max(math.floor(f / unit) * unit, unit)


def scoring_seconds(tokens: int, layers: int, placements: int, simulate: bool) -> float:
    """Planned seconds to score every token of a trace (and simulate 64 steps)."""
    from moeplace.traces._kernels import HAVE_NUMBA

    rate = EVAL_RATE if HAVE_NUMBA else EVAL_RATE_NUMPY
    sim = 64 * layers * placements / SIM_RATE if simulate else 0.0
    return tokens * layers * (placements / rate + 1.0 / READ_RATE) + sim


def score_placements(source: Trace | TraceReader, placements: dict[str, Placement], *,
                     total_tokens: int, num_layers: int, window: int = 4096,
                     deadline: float | None = None, seed: int = 0,
                     sim: tuple[Any, Any] | None = None, tokens_per_step: int = 4096,
                     split: tuple[np.ndarray, str] | None = None,
                     show_progress: bool | None = None, step_tokens: int | None = None,
                     gpu_speeds: np.ndarray | None = None,
                     kernel: str | None = None) -> ScoreReport:
    """Evaluate every placement in one pass (sampled when the budget requires), and simulate
    the step time on a seeded sample of steps (communication priced by ``kernel``'s rule and
    fit when given, ``simulator.step_time``).

    ``split = (held request ids, "fit" | "holdout")`` scores one side of a request split.
    A Parquet reader is sampled by whole row groups (the others are never read); an in-memory
    trace by whole windows. ``total_tokens`` is the size of what is scored when unsampled.
    ``step_tokens``: serving steps for ``active_experts_*`` (default: the trace's step ids, else
    4096 tokens); ``gpu_speeds``: speed-aware imbalances and simulated compute.
    """
    from moeplace.traces._kernels import HAVE_NUMBA

    names = list(placements)
    plcs = [placements[n] for n in names]
    P = len(plcs)
    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    # The simulator's share of the budget: at most 64 steps, fewer when time is short.
    sim_steps = 0
    if sim is not None:
        steps_all = max(1, total_tokens // tokens_per_step)
        afford = (0.25 * left * SIM_RATE / (num_layers * P)) if left is not None else 64
        sim_steps = int(min(64, steps_all, afford))
    eval_seconds = None if left is None else 0.7 * left
    sample = (1.0 if eval_seconds is None else
              plan_sample(total_tokens, num_layers, P, eval_seconds, HAVE_NUMBA, window))
    unit = "windows"
    window_sample = sample
    expected = total_tokens
    groups = None
    if sample < 1.0 and isinstance(source, TraceReader):
        groups, in_groups = sample_row_groups(source, sample, seed)
        unit, window_sample = "row groups", 1.0
        expected = round(total_tokens * in_groups / max(source.num_tokens, 1))
    if split is not None:
        chunks = split_stream(source, split[0], split[1], row_groups=groups)
    elif groups is not None:
        assert isinstance(source, TraceReader)
        chunks = source.iter_chunks(1 << 16, row_groups=groups)
    else:
        chunks = as_chunks(source, 1 << 16)[0]
    steps: list[Trace] = []
    n_steps = max(1, expected // tokens_per_step)
    step_frac = min(1.0, sim_steps / n_steps) if sim_steps else 0

    def feed() -> Iterator[Trace]:
        off = 0
        kept = 0
        for c in chunks:
            if step_frac and kept < (sim_steps + 1) * tokens_per_step:
                # whole serving steps: tokens_per_step consecutive tokens, chosen by seed
                blk = (off + np.arange(c.num_tokens)) // tokens_per_step
                keep = _keep_blocks(blk, step_frac, seed + 1)
                if keep.any():
                    steps.append(c.select(keep))
                    kept += int(keep.sum())
            off += c.num_tokens
            yield c

    eval_deadline = None if deadline is None else (
        time.monotonic() + (eval_seconds or 0.0) + 0.1 * (left or 0.0))
    t_eval = time.monotonic()
    results = evaluate_many(feed(), plcs, window=window, sample=window_sample, seed=seed,
                            deadline=eval_deadline, total_tokens=expected,
                            show_progress=show_progress, tokens_per_step=step_tokens,
                            gpu_speeds=gpu_speeds)
    summaries = {n: r.summary for n, r in zip(names, results, strict=True)}
    first = results[0].summary
    scoring = {"tokens_in_trace": total_tokens, "tokens_scored": first["tokens"],
               "sample_fraction": sample, "sample_unit": unit, "sample_seed": seed,
               "stopped_at_deadline": first["stopped_at_deadline"],
               "evaluator_seconds": round(time.monotonic() - t_eval, 2)}
    for s in summaries.values():
        s["sample_fraction"] = sample
    t_sim = time.monotonic()
    step_ms: dict[str, float] = {}
    if sim is not None and steps:
        from moeplace.solvers.simulator import step_time

        tr = Trace.concat(steps)
        for n, p in zip(names, plcs, strict=True):
            if deadline is not None and time.monotonic() > deadline:
                break
            step_ms[n] = 1e3 * step_time(tr, p, *sim, tokens_per_step,
                                         gpu_speeds=gpu_speeds, kernel=kernel)["step_s"]
        scoring["simulated_tokens"] = tr.num_tokens
        scoring["simulation_seconds"] = round(time.monotonic() - t_sim, 2)
    return ScoreReport(summaries, step_ms, scoring)


def priced_steps(source: Trace | TraceReader, placement: Placement, sim: tuple[Any, Any],
                 kernel: str, tokens_per_step: int = 4096,
                 gpu_speeds: np.ndarray | None = None, max_tokens: int = 1 << 18
                 ) -> dict[str, Any]:
    """The simulated step of ``placement`` with ``kernel``'s dispatch: ``dispatch``,
    ``hardware``, ``step_ms``, ``dispatch_us``, ``combine_us`` (slowest rank, mean per layer)
    and ``simulated_tokens``, on the first whole steps of up to ``max_tokens`` tokens (the
    simulator holds its steps in memory)."""
    from moeplace.solvers.simulator import step_time

    tr = head_tokens(source, max_tokens)
    if tr.num_tokens > tokens_per_step:  # whole steps only
        tr = tr.select(slice(0, tr.num_tokens // tokens_per_step * tokens_per_step))
    r = step_time(tr, placement, *sim, tokens_per_step, gpu_speeds=gpu_speeds, kernel=kernel)
    return {"dispatch": kernel, "hardware": sim[0].name, "step_ms": 1e3 * r["step_s"],
            "dispatch_us": 1e6 * r["dispatch_s"], "combine_us": 1e6 * r["combine_s"],
            "simulated_tokens": tr.num_tokens}


def head_tokens(source: Trace | TraceReader, max_tokens: int) -> Trace:
    """The first ``max_tokens`` tokens of a source, in memory (what the simulator steps
    through), reading no further than that."""
    parts, n = [], 0
    for chunk in as_chunks(source, min(max_tokens, 1 << 16), weights=False)[0]:
        parts.append(chunk.select(slice(0, max_tokens - n)))
        n += parts[-1].num_tokens
        if n >= max_tokens:
            break
    return Trace.concat(parts)

"""What one expert costs a GPU per step in each phase, and per-GPU speed factors.

Prefill is compute-bound: a GPU's expert time follows the tokens it processes, so an expert
costs its token load. Decode is memory-bound: a GPU's expert time per step follows how many
distinct experts it activates in that step (it reads each one's weights once, METRO,
arXiv 2512.09277), so an expert costs the probability that at least one of the step's tokens
picks it. Real clusters mix GPUs of unequal speed (GEM, arXiv 2605.19945): a GPU of speed ``s``
does the same work in ``1 / s`` of the time, so balance compares ``x_g / s_g`` with the share a
perfect split in proportion to speed would give, ``sum x / sum s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeplace.errors import InputError
from moeplace.traces import RoutingStats

PHASES = ("prefill", "decode")

__all__ = ["PHASES", "expert_cost", "parse_gpu_speeds", "speed_imbalance", "speed_load_bound"]


def expert_cost(stats: RoutingStats, phase: str, tokens_per_step: int) -> np.ndarray:
    """``[L, N]`` cost of each expert to the GPU that holds it, per serving step (``decode``)
    or over the trace (``prefill``); a GPU's cost is the sum over its experts.

    ``prefill``: the token load ``stats.load``. ``decode``: the expected number of steps of
    ``B = tokens_per_step`` tokens in which expert e is active, per step,
    ``1 - (1 - p_e) ** B`` with ``p_e = load_e / num_tokens`` (a token picks an expert at most
    once, so ``p_e`` is the chance that one token picks it).

    Tokens are treated as independent draws. Aggregated statistics (what the solvers get,
    what fleets ship) hold per-expert counts, not which experts co-occur within a step, so
    this is the best per-expert estimate they allow; and by linearity of expectation a GPU's
    expected distinct experts is then the sum over its experts, so any balancer of additive
    weights (EPLB, LPT) balances it unchanged. On the real vLLM decode steps of Qwen1.5-MoE
    (11-25 tokens) it is 5-7% above the true per-step count summed over steps (median
    per-step error 5%); tokens of one step are positively correlated, most in the first
    decode steps (tests/solvers/test_cost.py).
    """
    if phase not in PHASES:
        raise InputError("expert_cost", "phase", f"{phase!r} unknown", f"use one of {PHASES}")
    load = np.asarray(stats.load, np.float64)
    if phase == "prefill":
        return load.copy()
    if isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, (int, np.integer)) \
            or tokens_per_step < 1:
        raise InputError("expert_cost", "tokens_per_step", f"{tokens_per_step!r} is not a "
                         "positive integer", "pass the decode batch size, e.g. 256")
    if stats.num_tokens < 1:
        raise InputError(stats.meta.source or "stats", "num_tokens", "no tokens counted",
                         "compute statistics from a non-empty trace")
    return active_per_step(load, stats.num_tokens, int(tokens_per_step))


def decode_start_cost(active: np.ndarray, load: np.ndarray) -> np.ndarray:
    """``[..., N]`` what a decode GPU pays per expert, what the search balances: its share of
    the layer's expected active experts (weights read each step) plus its share of the layer's
    received copies (tokens; what DeepEP's low-latency kernels send, one per selected expert).

    Both are normalised to their layer mean, so neither unit dominates. At realistic decode
    batches almost every expert is active in every step (``active`` is flat), and balancing
    this is balancing tokens; at tiny batches ``active`` is about ``p * B``, proportional to the
    tokens, and the two agree. Balancing ``active`` alone would leave token balance to chance
    exactly where it is all that differs."""
    a = np.asarray(active, np.float64)
    t = np.asarray(load, np.float64)
    a_mean = a.mean(axis=-1, keepdims=True)
    t_mean = t.mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        sa = np.where(a_mean > 0, a / a_mean, 0.0)
        st = np.where(t_mean > 0, t / t_mean, 0.0)
    return sa + st


def active_per_step(counts: np.ndarray, num_tokens: np.ndarray | float, tokens_per_step: int
                    ) -> np.ndarray:
    """``1 - (1 - p)^B`` with ``p = counts / num_tokens``: the chance an expert is active in a
    step of B independent tokens (``num_tokens`` broadcasts against ``counts``)."""
    p = np.clip(np.asarray(counts, np.float64) / num_tokens, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        # 1 - (1 - p)^B without cancellation for small p
        return -np.expm1(tokens_per_step * np.log1p(-p))


def parse_gpu_speeds(value: str | Sequence[Any] | np.ndarray, num_gpus: int,
                     source: object = "--gpu-speeds", field: str = "value") -> np.ndarray:
    """Per-GPU speed factors ``[G]`` from ``"1,1,0.7,0.7"`` (a flag) or a JSON list (a
    hardware file's ``gpu_speeds``): finite, > 0, one per GPU, relative to a GPU of speed 1.
    Anything else raises one ``InputError`` naming ``source`` and ``field``."""
    fix = f"give {num_gpus} positive numbers, one per GPU in rank order, e.g. " \
          + ",".join(["1"] * min(num_gpus, 2) + ["0.7"] * min(max(num_gpus - 2, 0), 2)) \
          + ("..." if num_gpus > 4 else "")
    if isinstance(value, str):
        parts = [x.strip() for x in value.split(",")]
        vals: list[float] = []
        for x in parts:
            try:
                vals.append(float(x))
            except ValueError:
                raise InputError(source, field, f"{x[:40]!r} is not a number", fix) from None
    elif isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=object).ravel() if not isinstance(value, np.ndarray) \
            else value.ravel()
        vals = []
        for x in arr:
            if isinstance(x, (bool, np.bool_)) or not isinstance(
                    x, (int, float, np.integer, np.floating)):
                raise InputError(source, field, f"{x!r:.40} is not a number", fix)
            vals.append(float(x))
    else:
        raise InputError(source, field, f"{type(value).__name__} is not a list of numbers", fix)
    if len(vals) != num_gpus:
        raise InputError(source, field, f"{len(vals)} speeds for {num_gpus} GPUs", fix)
    for v in vals:
        if not math.isfinite(v) or v <= 0:
            raise InputError(source, field, f"speed {v} is not a finite number > 0", fix)
    return np.array(vals, np.float64)


def unequal_speeds(value: str | Sequence[Any] | np.ndarray | None, num_gpus: int,
                   source: str = "--gpu-speeds", field: str = "value") -> np.ndarray | None:
    """``parse_gpu_speeds``, or None when there are none or all are equal: the speed-blind
    arithmetic then runs unchanged (equal speeds mean the same imbalance)."""
    if value is None:
        return None
    sp = parse_gpu_speeds(value, num_gpus, source, field)
    return None if (sp == sp[0]).all() else sp


def speed_imbalance(gpu_load: np.ndarray, speeds: np.ndarray) -> np.ndarray:
    """``max_g(x_g / s_g) / (sum x / sum s)`` over the last axis (1.0 where nothing ran):
    the slowest GPU's time over the time of a split in proportion to speed. With equal speeds
    it is max / mean."""
    s = np.asarray(speeds, np.float64)
    x = np.asarray(gpu_load, np.float64)
    tot = x.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (x / s).max(axis=-1) / (tot / s.sum()), 1.0)


def speed_load_bound(load: np.ndarray, speeds: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """``[L]`` lower bound of ``speed_imbalance`` over every placement of the ``[L, N]`` loads
    with one copy per expert and exactly ``slots_per_gpu`` (S) experts per GPU.

    With ``T = max_g load_g / s_g`` for some placement, three facts bound T from below:
    the fluid split ``sum w / sum s``; for each j, the j heaviest experts lie on some m GPUs,
    ``ceil(j / S) <= m <= min(j, G)``, which also hold ``m S - j`` other experts (at least the
    lightest ones) and have total speed at most the m fastest speeds, so
    ``T >= min over m of (top_j + lightest_{mS - j}) / fastest_m``; and any j GPUs hold j S
    experts, so ``T >= lightest_{jS} / slowest_j``. The bound is the largest over fluid
    split. With replicas (``G S > N``) a copy can carry any share of an expert and only the
    fluid bound (1.0) holds; it is what is returned.
    """
    w = np.asarray(load, np.float64)
    if w.ndim != 2:
        raise InputError("speed_load_bound", "load", f"shape {w.shape} is not [layers, experts]",
                         "pass per-layer expert loads")
    s = np.asarray(speeds, np.float64)
    L, N = w.shape
    G, S = s.shape[0], int(slots_per_gpu)
    if S < 1 or G * S < N:
        raise InputError("speed_load_bound", "slots_per_gpu", f"{G} GPUs x {S} slots cannot "
                         f"hold {N} experts", "pass the placement's slots per GPU")
    out = np.ones(L)
    if G * S > N:
        return out
    s_fast = np.r_[0.0, np.cumsum(np.sort(s)[::-1])]   # [G+1] sum of the m fastest
    s_slow = np.r_[0.0, np.cumsum(np.sort(s))]         # [G+1] sum of the m slowest
    j = np.arange(1, N + 1)[:, None]                   # [N, 1]
    m = np.arange(1, G + 1)[None, :]                   # [1, G]
    ok = (m * S >= j) & (m <= j)
    fill = np.clip(m * S - j, 0, N)                    # other experts those m GPUs hold
    for l in range(L):
        tot = w[l].sum()
        if tot <= 0:
            continue
        fluid = tot / s.sum()
        top = np.r_[0.0, np.cumsum(np.sort(w[l])[::-1])]
        light = np.r_[0.0, np.cumsum(np.sort(w[l]))]
        val = np.where(ok, (top[j] + light[fill]) / s_fast[m], np.inf)
        heavy = val.min(axis=1).max()
        jj = np.arange(1, G + 1)
        slow = (light[jj * S] / s_slow[jj]).max()
        out[l] = max(fluid, heavy, slow) / fluid
    return out

"""Token bookkeeping for one forward call: which routed rows are real tokens, and their request,
position, phase and step.

Everything read from the model's inputs here is either a shape (free) or stays a device tensor
(masks and positions are computed on the device and copied back with the expert ids), so the
forward never waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL


@dataclass
class Step:
    """One forward call of the recorded model."""

    index: int
    batch: int
    seqlen: int
    phase: int
    requests: np.ndarray  # [batch] request id of each row
    valid: Any = None  # device bool [batch * seqlen], or None when every row is a token
    position: Any = None  # device int32 [batch * seqlen], or None: past + 0..seqlen-1
    past: int = 0
    last_ids: Any = None  # device [batch] input id of each row (decode steps), for liveness
    calls: int = 0  # routers that ran
    mismatch: bool = False  # a router saw another row count than the inputs: not recorded

    @property
    def num_rows(self) -> int:
        return self.batch * self.seqlen


def _cache_length(cache: Any) -> int:
    """Tokens already in a transformers cache, read from tensor shapes (never a device sync)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers:
        keys = getattr(layers[0], "keys", None)
        if keys is not None and getattr(keys, "ndim", 0) >= 2:
            return int(keys.shape[-2])
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])  # legacy tuple-of-tuples cache
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def batch_shape(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, Any] | None:
    """(batch, seqlen, input ids or None) from a forward call's inputs, or None if unknown."""
    ids = kwargs.get("input_ids")
    if ids is None and args and hasattr(args[0], "shape"):
        ids = args[0]
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None or not hasattr(x, "shape"):
        return None
    floating = x.dtype.is_floating_point
    if floating:
        b, t = (x.shape[0], x.shape[1]) if x.ndim == 3 else (1, x.shape[0])
        return int(b), int(t), None
    b, t = (x.shape[0], x.shape[1]) if x.ndim == 2 else (1, x.shape[0])
    return int(b), int(t), x if x.ndim == 2 else x[None]


def open_step(index: int, args: tuple, kwargs: dict[str, Any], requests: np.ndarray | None,
              next_request: int, given: list[int] | None, track_liveness: bool
              ) -> tuple[Step | None, np.ndarray | None, int]:
    """Describe the forward call about to run.

    ``requests``: the rows' ids of the previous call (kept by cache continuations);
    ``given``: ids the user set for the next new batch. Returns (step, row ids, next counter).
    """
    shape = batch_shape(args, kwargs)
    if shape is None:
        return None, requests, next_request
    b, t, ids = shape
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "ndim", 0) == 2 and mask.shape[0] == b:
        past = int(mask.shape[1]) - t
        valid = (mask[:, -t:] != 0).reshape(-1)
        # A token's position counts the real tokens before it in its own sequence.
        position = (mask.long().cumsum(-1)[:, -t:] - 1).clamp_min(0).int().reshape(-1)
    else:
        # 5.24's generate() passes the cache as ``cache`` and drops an all-ones mask.
        cache = kwargs.get("past_key_values")
        past = _cache_length(cache if cache is not None else kwargs.get("cache"))
        valid = position = None
    phase = PHASE_PREFILL if past == 0 or t > 1 else PHASE_DECODE
    if past == 0 or requests is None or len(requests) != b:
        if given is not None and len(given) == b:
            requests = np.asarray(given, np.int64)
        else:
            requests = np.arange(next_request, next_request + b, dtype=np.int64)
        next_request = max(next_request, int(requests.max()) + 1)
    last = ids[:, -1] if (track_liveness and phase == PHASE_DECODE and ids is not None) else None
    step = Step(index, b, t, phase, requests, valid, position, past, last)
    return step, requests, next_request


def implicit_step(index: int, rows: int, next_request: int) -> tuple[Step, int]:
    """A step for a call whose inputs were not recognised: one request, rows in order."""
    return Step(index, 1, rows, PHASE_PREFILL, np.array([next_request], np.int64)), next_request + 1


class Liveness:
    """Tracks which requests have finished in ``generate()``: once a row's decode input is an
    end-of-sequence id, that token and every later one of the row are padding, not work."""

    def __init__(self, eos_ids: set[int]) -> None:
        self.eos = np.array(sorted(eos_ids), np.int64)
        self.finished: set[int] = set()

    def rows_live(self, requests: np.ndarray, last_ids: np.ndarray | None, fresh: bool
                  ) -> np.ndarray:
        """Live rows of one step; ``fresh``: the step starts these requests (a new prompt)."""
        if fresh:
            self.finished.difference_update(requests.tolist())
        live = np.array([r not in self.finished for r in requests.tolist()], bool)
        if last_ids is not None and self.eos.size:
            ended = np.isin(last_ids, self.eos)
            for r in requests[ended & live].tolist():
                self.finished.add(r)
            live &= ~ended
        return live

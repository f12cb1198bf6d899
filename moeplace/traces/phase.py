"""One serving phase's tokens of a trace: what ``solve``, ``evaluate`` and ``replay --phase``
fit and score when prefill and decode run on separate instances (SGLang's prefill-decode
disaggregation), each with its own dispatch kernel.

A trace says each token's phase in its optional ``phase`` column (``trace.PHASE_PREFILL`` 0,
``PHASE_DECODE`` 1, ``PHASE_UNKNOWN`` -1; written by ``moeplace profile``, the vLLM importer
given prompt lengths, the SGLang importer, ``synth --prompt-tokens``). ``select_phase`` keeps
the tokens of one phase, streamed for Parquet traces (a view of the reader: nothing is loaded
that a whole-trace pass would not load); a trace without the column has no phase to select,
and all its tokens are used (``PhaseSelection.column`` is False: say so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.errors import InputError
from moeplace.traces.store import TraceReader
from moeplace.traces.trace import PHASE_DECODE, PHASE_NAMES, PHASE_PREFILL, Trace

__all__ = ["PHASES", "PhaseSelection", "phase_code", "select_phase"]

PHASES = ("prefill", "decode")
_CODES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}


def phase_code(phase: str) -> int:
    """The ``phase`` column's value of a phase name (``"prefill"`` 0, ``"decode"`` 1)."""
    if phase not in _CODES:
        raise InputError("--phase", "value", f"{phase!r} is not a phase", f"use one of {PHASES}")
    return _CODES[phase]


@dataclass(frozen=True)
class PhaseSelection:
    """The tokens of one phase: ``source`` (an in-memory trace, or a streamed view of a Parquet
    reader) holds ``tokens`` of the trace's ``tokens_in_trace``; ``column`` says whether the
    trace had a phase column (without one, ``source`` is the whole trace)."""

    source: Trace | TraceReader
    phase: str
    tokens: int
    tokens_in_trace: int
    column: bool

    def note(self, name: object) -> str:
        """One line for the user: how many tokens of the phase were used, of how many."""
        if not self.column:
            return (f"{name}: no phase column, so all {self.tokens_in_trace:,} tokens are used "
                    f"for --phase {self.phase}")
        share = self.tokens / max(self.tokens_in_trace, 1)
        return (f"{name}: --phase {self.phase}: {self.tokens:,} of {self.tokens_in_trace:,} "
                f"tokens ({share:.0%}, by the trace's phase column)")

    def as_dict(self) -> dict[str, object]:
        """For ``--json``: ``name``, ``tokens``, ``tokens_in_trace``, ``phase_column``."""
        return {"name": self.phase, "tokens": self.tokens,
                "tokens_in_trace": self.tokens_in_trace, "phase_column": self.column}


def _describe(counts: np.ndarray) -> str:
    """'prefill 1,024, unknown 12' from 256 counts indexed by value + 128."""
    parts = []
    for i in np.flatnonzero(counts):
        v = int(i) - 128
        parts.append(f"{PHASE_NAMES.get(v, f'value {v}')} {int(counts[i]):,}")
    return ", ".join(parts) or "none"


def select_phase(source: Trace | TraceReader, phase: str) -> PhaseSelection:
    """The tokens of ``phase`` (``"prefill"`` or ``"decode"``) in ``source``.

    A Parquet reader gives a streamed view (``TraceReader.only_phase``, one pass over the phase
    column to count); an in-memory trace a selection of it. Without a phase column every token
    is used (``column`` False). A phase column holding no token of ``phase`` raises
    ``InputError`` naming the file, the ``phase`` field, what the column holds and the fix.
    """
    code = phase_code(phase)
    if isinstance(source, TraceReader):
        name: object = source.path
        total = source.num_tokens
        if "phase" not in source.token_fields:
            return PhaseSelection(source, phase, total, total, False)
        per_group = source.phase_counts()
        counts = sum(per_group.values(), np.zeros(256, np.int64))
        view: Trace | TraceReader | None = None
        if counts[code + 128]:
            view = source.only_phase(code, per_group)
    else:
        name = source.meta.source or "trace"
        total = source.num_tokens
        if "phase" not in source.tokens:
            return PhaseSelection(source, phase, total, total, False)
        col = source.tokens["phase"].astype(np.int64)  # int8 in a Trace
        counts = np.bincount(col + 128, minlength=256)
        mask = col == code
        view = source.select(mask) if mask.any() else None
    if view is None:
        other = next(p for p in PHASES if p != phase)
        use = (f"use --phase {other} or no --phase" if counts[phase_code(other) + 128]
               else "use no --phase")
        raise InputError(name, "phase", f"no {phase} token among the {total:,} tokens "
                         f"(the phase column holds {_describe(counts)})",
                         f"{use} with this trace, or give one that recorded {phase} tokens")
    return PhaseSelection(view, phase, int(counts[code + 128]), total, True)

"""Routing traces: the trace type, Parquet storage, importers, statistics, synthetic traces, analysis."""

from moeplace.traces.importers import detect_format, import_trace, load_routing
from moeplace.traces.phase import PhaseSelection, select_phase
from moeplace.traces.stats import RoutingStats, compute_stats
from moeplace.traces.store import TraceReader, TraceWriter, open_trace, read_trace, write_trace
from moeplace.traces.synthetic import PRESETS, SyntheticRouter, SyntheticSpec, synthetic_trace
from moeplace.traces.trace import Trace, TraceMeta

__all__ = [
    "PRESETS",
    "PhaseSelection",
    "RoutingStats",
    "SyntheticRouter",
    "SyntheticSpec",
    "Trace",
    "TraceMeta",
    "TraceReader",
    "TraceWriter",
    "compute_stats",
    "detect_format",
    "import_trace",
    "load_routing",
    "open_trace",
    "read_trace",
    "select_phase",
    "synthetic_trace",
    "write_trace",
]

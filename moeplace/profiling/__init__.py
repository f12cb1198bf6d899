"""Profiling: record routing traces from a running transformers (or custom torch) MoE model.

``with moeplace.profiling.record(model) as rec: ...`` then ``rec.trace()``; torch is imported
only when recording starts.
"""

from moeplace.profiling.recorder import Recorder, record
from moeplace.profiling.routers import Router, find_routers

__all__ = ["Recorder", "Router", "find_routers", "record"]

"""Profiling: record routing traces from running models (not implemented yet; see issue 4)."""

"""The serving engines' own code for tests: vLLM and SGLang, each installed ``--no-deps`` (with only
the small packages the modules under test import) under ``{sys.prefix}/engines/NAME`` by
``.ci/run``. Tests run engine code in a subprocess with that directory on ``PYTHONPATH``, so the
engine never leaks into the main test process, and skip cleanly where it is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENGINES = {"vllm": "0.34.0", "sglang": "0.5.23"}


def engine_path(name: str) -> Path:
    """The engine's install directory, skipping the test when it is not there."""
    p = Path(sys.prefix) / "engines" / name
    if not (p / name).is_dir():
        pytest.skip(f"{name} is not installed under {p} (.ci/run installs {name}=={ENGINES[name]})")
    return p


def engine_env(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python imports the installed engine (and moeplace as installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(engine_path(name)), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def run_with_engine(name: str, code: str, *, extra_env: dict[str, str] | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that sees the engine; the caller checks the result."""
    return subprocess.run([sys.executable, "-c", code], env=engine_env(name, extra_env), text=True,
                          capture_output=True, timeout=timeout)

"""The recorder tests again under older transformers releases whose router conventions differ
(4.57: nn.Linear gates, DeepSeek-V3 (indices, weights), GPT-OSS (scores, indices); 5.0.0:
DeepSeek-V3 gate returns logits only). CI installs them side by side (see .ci/run) and names
them in MOEPLACE_TRANSFORMERS_ALT; without it these tests skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ALT = [p for p in os.environ.get("MOEPLACE_TRANSFORMERS_ALT", "").split(os.pathsep) if p]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not ALT, reason="MOEPLACE_TRANSFORMERS_ALT names no other transformers")
@pytest.mark.parametrize("site", ALT or ["none"])
def test_recorder_under_other_transformers_release(site, tmp_path):
    # Only the other transformers goes on the path, and the run starts outside the source tree,
    # so the moeplace under test is the same one as in the parent run (the installed package).
    env = {**os.environ, "PYTHONPATH": site}
    version = subprocess.run([sys.executable, "-c", "import transformers as t; print(t.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert version and not version.startswith("5.24"), version
    # -n 0: one process. The pyproject's -n auto would start a worker per core inside this one
    # test (each importing torch and transformers again) while the outer run's workers are busy.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                          "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
                          str(ROOT / "tests/profiling/test_recorder.py")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, f"transformers {version}:\n{run.stdout[-3000:]}"
    assert " passed" in run.stdout.strip().splitlines()[-1], run.stdout[-500:]

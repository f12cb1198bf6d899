"""Outputs never destroy what is there, never leave partial files, and signals clean up."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeplace._fileio import atomic_path, check_output, protected_inputs
from moeplace.cli import main
from moeplace.errors import InputError
from moeplace.traces import write_trace
from tests.conftest import random_trace


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def trace_file(tmp_path, rng):
    p = tmp_path / "t.parquet"
    write_trace(random_trace(rng, 64, 3, 8, 2, requests=4), p)
    return p


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("moeplace: error:"), r.stderr
    return lines[0]


@pytest.mark.parametrize("cmd", ["synth", "convert", "stats"])
def test_user_directory_as_out_is_left_alone(tmp_path, trace_file, cmd):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    before = _digest(user)
    args = {"synth": ["synth", "--preset", "flame-moe-290m", "--tokens", "100", "--out", str(user)],
            "convert": ["convert", str(trace_file), str(user)],
            "stats": ["stats", str(trace_file), "--out", str(user)]}[cmd]
    line = _one_error_line(run(*args))
    assert "directory" in line
    assert _digest(user) == before


def test_output_that_is_the_input_is_refused(trace_file):
    before = _digest(trace_file)
    line = _one_error_line(run("stats", str(trace_file), "--out", str(trace_file)))
    assert "input" in line
    assert _digest(trace_file) == before


def test_output_that_is_the_input_through_a_symlink_is_refused(tmp_path, trace_file):
    link = tmp_path / "alias.parquet"
    link.symlink_to(trace_file)
    before = _digest(trace_file)
    _one_error_line(run("convert", str(trace_file), str(link)))
    assert _digest(trace_file) == before and link.is_symlink()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_device_is_never_replaced(trace_file):
    line = _one_error_line(run("solve", str(trace_file), "--gpus", "4", "--time-limit", "2",
                               "--out", "/dev/null"))
    assert "regular file" in line
    assert Path("/dev/null").is_char_device()


def test_symlink_output_is_written_through(tmp_path, trace_file):
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    r = run("solve", str(trace_file), "--gpus", "4", "--time-limit", "2", "--out", str(link))
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert '"phy2log"' in target.read_text()


@pytest.mark.parametrize("out", ["", "  "])
def test_empty_output_path(trace_file, out):
    _one_error_line(run("solve", str(trace_file), "--gpus", "4", "--out", out))


def test_failed_write_leaves_nothing_and_removes_created_parents(tmp_path):
    parent = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), atomic_path(parent / "x.json") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    assert sorted(tmp_path.iterdir()) == []


def test_existing_parent_stays_and_only_the_file_is_replaced(tmp_path):
    (tmp_path / "old.json").write_text("old")
    with atomic_path(tmp_path / "old.json") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "old.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_empty_directory_may_receive_a_directory_output(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with atomic_path(d, directory=True) as tmp:
        tmp.mkdir()
        (tmp / "part-0.parquet").write_text("x")
    assert (d / "part-0.parquet").exists()


def test_library_refuses_inputs_when_told(tmp_path):
    src = tmp_path / "in.json"
    src.write_text("{}")
    with protected_inputs(src), pytest.raises(InputError, match="inputs"):
        check_output(src)
    check_output(src)  # outside the block the library does not know it is an input


def _wait_for_tmp(where: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(p.name.endswith(".tmp") for p in where.rglob(".*")):
            return
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be interrupted: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("no temporary appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_write_removes_temporaries_and_created_parents(tmp_path, sig):
    out = tmp_path / "new" / "deep" / "big"
    # A write that is still going when the signal comes (50M tokens take minutes). FlameMoE's
    # small shape: its temporary appears within a second, where DeepSeek-V3's synthetic model
    # took 5 CPU s to build before anything was written.
    proc = subprocess.Popen([sys.executable, "-m", "moeplace.cli", "synth", "--preset",
                             "flame-moe-290m", "--tokens", "50000000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    _wait_for_tmp(tmp_path, proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 128 + sig, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert sorted(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_broken_pipe_is_quiet(tmp_path, trace_file):
    proc = subprocess.Popen([sys.executable, "-m", "moeplace.cli", "analyze", str(trace_file),
                             "--top", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141)


def test_tiny_file_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    """A few tokens of a model declaring 5,000 experts: the statistics fit the cap, the solver's
    pair-count copies would not; refused with the estimate instead of growing past 2 GB."""
    import numpy as np

    from moeplace.traces import Trace, TraceMeta

    meta = TraceMeta(num_experts=5000, top_k=2, moe_layer_ids=(0, 1, 2))
    p = tmp_path / "huge.parquet"
    write_trace(Trace(np.array([[[1, 2]] * 3] * 4, np.uint16), meta), p)
    assert p.stat().st_size < 10_000
    line = _one_error_line(run("solve", str(p), "--gpus", "8", "--time-limit", "5"))
    assert "memory cap" in line and "MOEPLACE_MAX_MEMORY" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_input_is_refused_not_read(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    line = _one_error_line(run("analyze", str(fifo), "--json"))
    assert "FIFO" in line


def test_config_declaring_a_billion_layers_is_refused(tmp_path, trace_file):
    import json

    plc = tmp_path / "p.json"
    assert run("solve", str(trace_file), "--gpus", "4", "--time-limit", "2", "--out",
               str(plc)).exit_code == 0
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 10**9, "n_routed_experts": 8,
                               "num_experts_per_tok": 2}))
    line = _one_error_line(run("export", str(plc), "--format", "trtllm", "--config", str(cfg),
                               "--out", str(tmp_path / "o.yaml")))
    assert "num_hidden_layers" in line and not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize("spelling", ["ckpt", "./ckpt", "ckpt/"])
def test_apply_with_a_relative_checkpoint_path(tmp_path, monkeypatch, spelling):
    """Found by the independent fuzz campaign: a relative --checkpoint was prefixed twice."""
    from tests.fuzz import corpus

    corpus.seed_checkpoint(tmp_path)
    corpus.seed_placement(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = run("apply", "placement.json", "--checkpoint", spelling, "--out", "placed")
    assert r.exit_code == 0, r.output
    r = run("apply", "--invert", "--checkpoint", "placed", "--out", "restored")
    assert r.exit_code == 0, r.output
    import json
    import struct

    def parts(b: bytes) -> tuple[dict, bytes]:  # (header, data): the header's spacing may differ
        (n,) = struct.unpack("<Q", b[:8])
        return json.loads(b[8:8 + n]), b[8 + n:]

    for f in sorted((tmp_path / "ckpt").glob("*.safetensors")):
        assert parts((tmp_path / "restored" / f.name).read_bytes()) == parts(f.read_bytes())

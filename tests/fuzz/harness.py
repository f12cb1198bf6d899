"""Run one fuzz case and judge it by the promises: exit 2 with exactly one stderr line, or exit 0
with a valid output; no traceback; inputs unchanged; nothing left behind; bounded time and
memory (the subprocess runner measures the child's peak RSS)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RSS_LIMIT_MB = 2048


@dataclass
class Outcome:
    args: list[str]
    exit_code: int
    stderr: str
    stdout: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<link>' targets) under ``root``."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def _valid_output(path: Path, args: list[str]) -> str | None:
    """None if the output at ``path`` reads back with moeplace's own reader for what the command
    writes, else why not."""
    from moeplace.placement import Placement
    from moeplace.placement.exports import read_placement
    from moeplace.traces import RoutingStats, open_trace

    cmd = args[0] if args else ""
    try:
        if cmd in ("convert", "synth") or path.suffix == ".parquet":
            assert open_trace(path).num_tokens > 0
        elif cmd == "stats":
            assert RoutingStats.load_npz(path).num_tokens > 0
        elif cmd in ("solve", "demo"):
            Placement.load(path)
        elif cmd == "export" and "--out-dir" in args:  # prefill-decode: both maps, no more
            assert sorted(p.name for p in path.iterdir()) == ["decode.json", "prefill.json"]
            for name in ("prefill.json", "decode.json"):
                read_placement(path / name, "sglang", num_gpus=1)
        elif cmd == "export":
            fmt = args[args.index("--format") + 1] if "--format" in args else "auto"
            if fmt != "sglang-logical-count":
                read_placement(path, fmt, num_gpus=4)
        elif cmd == "apply":
            assert any(path.glob("*.safetensors")), "no shards written"
        elif path.is_file() and path.stat().st_size == 0:
            return "empty output file"
    except Exception as exc:  # any failure to read back is a finding
        return f"output {path.name} does not read back: {type(exc).__name__}: {exc}"
    return None


def judge(out: Outcome, root: Path, before: dict[str, str], inputs: set[str]) -> Outcome:
    """Fill ``out.problems`` from the promises, comparing ``root`` with its ``before`` snapshot."""
    after = snapshot(root)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    if "Traceback" in out.stderr or out.exit_code not in (0, 2):
        out.problems.append(f"exit {out.exit_code}: {out.stderr[-400:]}")
    if out.exit_code == 2 and (len(lines) != 1 or not lines[0].startswith("moeplace: error:")):
        out.problems.append(f"exit 2 without exactly one error line: {lines[:3]}")
    if "out of memory" in out.stderr or "MemoryError" in out.stderr:
        out.problems.append("MemoryError")
    if out.timed_out:
        out.problems.append(f"hang: over {out.seconds:.0f} s")
    if out.peak_rss_mb > RSS_LIMIT_MB:
        out.problems.append(f"peak RSS {out.peak_rss_mb:.0f} MB")
    for rel in inputs:
        if after.get(rel) != before.get(rel):
            out.problems.append(f"input {rel} modified or deleted")
    for rel in before:
        if rel not in after:
            out.problems.append(f"{rel} deleted")
    new = [rel for rel in after if rel not in before]
    hidden = [rel for rel in new if any(part.startswith(".") for part in Path(rel).parts)]
    if hidden:
        out.problems.append(f"temporaries left: {hidden[:3]}")
    if out.exit_code != 0 and new:
        out.problems.append(f"failed but left output: {new[:3]}")
    if out.exit_code == 0:
        tops = {Path(rel).parts[0] for rel in new}
        for top in tops:
            why = _valid_output(root / top, out.args)
            if why:
                out.problems.append(why)
    return out


def run_inprocess(args: list[str]) -> Outcome:
    """Through click's runner: fast, for the CI suite (no RSS or hang measurement)."""
    from click.testing import CliRunner

    from moeplace.cli import main

    t0 = time.perf_counter()
    r = CliRunner().invoke(main, args)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        err += "Traceback (in-process)\n" + "".join(
            traceback.format_exception(r.exception))[-1500:]
    return Outcome(args, int(r.exit_code), err, r.stdout, time.perf_counter() - t0)


def run_subprocess(args: list[str], cwd: Path, timeout: float = 120.0) -> Outcome:
    """A real process: exit code, stderr, wall time, its own peak RSS (``wait4``), killed with
    its process group after ``timeout`` seconds."""
    import tempfile
    import threading

    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        proc = subprocess.Popen([sys.executable, "-m", "moeplace.cli", *args], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                start_new_session=True)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        stdout, stderr = fout.read(), ferr.read()
    return Outcome(args, proc.returncode, stderr.decode(errors="replace"),
                   stdout.decode(errors="replace"), time.perf_counter() - t0,
                   usage.ru_maxrss / 1024, fired.is_set())

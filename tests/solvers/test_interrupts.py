"""SIGINT, SIGTERM and SIGHUP stop every exact method of a real ``moeplace solve`` at any phase:
exit 128 + signal, one stderr line, no output, no temporaries, no solver left running.

Each method gets the signal at four moments (0.5, 2, 5 and 10 s into the process: imports,
statistics and the warm start, model building, the native solve), on processes started
together. The moments are counted in the process's CPU seconds (its own and its children's) so
that on a busy machine the signal still lands in the phase it would on a quiet one; a wall-clock
cap keeps the test's cost bounded. A method that ignored the signal would run on to its 120 s
limit; the test allows 15 s, far below that and far above the second a stop takes (stop
latencies on a quiet machine are in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeplace.traces.store import write_trace
from moeplace.traces.synthetic import preset, synthetic_trace

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="POSIX signals and /proc (Linux)")

ROOT = Path(__file__).resolve().parents[2]
MOMENTS = (0.5, 2.0, 5.0, 10.0)  # CPU seconds into the process
TIME_LIMIT = 120  # what a method that ignores the signal runs on to
STOP_BOUND_S = 15.0  # generous for a busy 2-core machine; a stop takes about a second
WALL_CAP = 4.0  # the signal goes at the latest WALL_CAP x moment + 10 s of wall clock
TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``wide``: FlameMoE-290M's shape (64 experts, top-8), the real trace when ../shared has
    it; ``deep``: Mixtral's 8 experts over 64 layers, so the dp (2,520 states per layer on 4
    GPUs, about 0.25 s a layer) is still working at 10 s."""
    d = tmp_path_factory.mktemp("interrupt-traces")
    shared = Path(os.environ.get("MOEPLACE_SHARED", ROOT.parent / "shared"))
    real = shared / "traces/flame-moe-290m/flame_moe_290m_prefill_2048tok.npz"
    wide = real if real.exists() else write_trace(
        synthetic_trace("flame-moe-290m", 2048, seed=0), d / "wide.parquet")
    # ``searched``: DeepSeek-V2-Lite's shape (26 layers x 64 experts, top-6), on which the
    # static engines' search works about 25 CPU seconds.
    searched = write_trace(synthetic_trace("deepseek-v2-lite", 4000, seed=0),
                           d / "searched.parquet")
    L = 64
    deep = write_trace(synthetic_trace(preset("mixtral", num_layers=L, moe_layer_ids=tuple(range(L)),
                                              num_hidden_layers=L), 2000, seed=0), d / "deep.parquet")
    return {"wide": Path(wide), "deep": Path(deep), "searched": Path(searched)}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, of its live children (CBC runs as one) and of the children it
    has waited for (cutime + cstime): the search's restart workers end before the command does,
    and without their seconds the count fell back and a process could finish before it reached
    the moment (the exflow search at 10 s, about one run in three)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
        if p == pid:
            total += (int(fields[13]) + int(fields[14])) / TICK
    return total


def _catches_sigterm(pid: int) -> bool:
    """Whether moeplace's handlers are in (Python itself catches only SIGINT): a signal before
    that lands in interpreter start-up, which no program can answer with its own message."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def _default_signals() -> None:
    # A test run in the background of a script inherits SIGINT ignored; moeplace (rightly)
    # keeps an inherited SIG_IGN, so give the child the defaults an interactive shell would.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@dataclass
class Outcome:
    moment: float
    sig: signal.Signals
    returncode: int | None = None
    stderr: str = ""
    stop_s: float | None = None  # signal to exit
    cpu_at_signal: float = 0.0
    finished_first: bool = False
    workdir: Path | None = None
    leftovers: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()


def _run(args: list[str], moment: float, sig: signal.Signals, base: Path, wall: bool = False
         ) -> Outcome:
    """One ``moeplace solve`` in ``base``, signalled ``moment`` CPU seconds in (``wall``:
    wall-clock seconds after start, as benchmarks/bench_interrupts.py --wall measures)."""
    work = base / f"{sig.name}-{moment:g}"
    tmp = work / "tmp"
    tmp.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    res = Outcome(moment, sig, workdir=work)
    # stderr to a file beside the work directory: a pipe would block the test if a worker the
    # command forked outlived it holding the pipe's write end.
    err = base / f"{sig.name}-{moment:g}.stderr"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moeplace.cli", "solve", *args,
                                 "--time-limit", str(TIME_LIMIT), "--out", str(work / "p.json")],
                                stdout=subprocess.DEVNULL, stderr=fh, env=env, cwd=work,
                                preexec_fn=_default_signals)
    t0 = time.monotonic()
    cap = moment if wall else WALL_CAP * moment + 10.0
    while proc.poll() is None and not (
            _catches_sigterm(proc.pid)
            and ((not wall and _cpu_seconds(proc.pid) >= moment)
                 or time.monotonic() - t0 >= cap)):
        time.sleep(0.02)
    if proc.poll() is not None:
        res.finished_first = True
    else:
        res.cpu_at_signal = _cpu_seconds(proc.pid)
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=TIME_LIMIT + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        res.stop_s = time.monotonic() - sent
    res.returncode = proc.returncode
    res.stderr = err.read_text(errors="replace")
    res.leftovers = tuple(sorted(str(p.relative_to(work)) for p in work.rglob("*") if p != tmp))
    # No solver child (CBC, whose command line names our TMPDIR) or forked worker (the
    # search's restarts: the command's own command line) may outlive the command.
    time.sleep(0.2)
    res.orphans = tuple(c for c in (_cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit())
                        if str(work) + os.sep in c)
    for pid in _pids_naming(work):  # do not leave them to the machine
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return res


def _pids_naming(work: Path) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and str(work) + os.sep in _cmdline(p)]


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_concurrently(args: list[str], runs: list[tuple[float, signal.Signals]], base: Path
                         ) -> list[Outcome]:
    out: list[Outcome | None] = [None] * len(runs)

    def one(i: int) -> None:
        out[i] = _run(args, runs[i][0], runs[i][1], base)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def _check(outcomes: list[Outcome], method: str) -> None:
    problems = []
    for o in outcomes:
        what = f"{method} {o.sig.name} at {o.moment:g} CPU s (sent at {o.cpu_at_signal:.1f})"
        lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
        if o.finished_first:
            problems.append(f"{what}: finished before the signal (rc {o.returncode}; the trace "
                            f"is too small to test this moment): {o.stderr[-300:]}")
            continue
        if o.stop_s is None or o.stop_s > STOP_BOUND_S:
            problems.append(f"{what}: ran on {o.stop_s:.1f} s after the signal")
        if o.returncode != 128 + o.sig:
            problems.append(f"{what}: exit {o.returncode}, not {128 + o.sig}: {o.stderr[-500:]}")
        if len(lines) != 1 or "interrupted" not in lines[0] or "nothing written" not in lines[0]:
            problems.append(f"{what}: stderr is not one 'interrupted' line: {o.stderr[-500:]!r}")
        if o.leftovers:
            problems.append(f"{what}: left {o.leftovers}")
        if o.orphans:
            problems.append(f"{what}: solver still running: {o.orphans}")
    for o in outcomes:  # shown with -s: the latencies docs/benchmarks.md quotes
        print(f"{method} {o.sig.name} at {o.moment:g} CPU s: exit {o.returncode}, stopped in "
              f"{o.stop_s if o.stop_s is None else round(o.stop_s, 2)} s")
    assert not problems, "\n".join(problems)


EXACT = {
    "cpsat": ("wide", 8, [(signal.SIGTERM, 5.0)]),
    "ilp-cbc": ("wide", 8, []),
    "ilp-highs": ("wide", 8, [(signal.SIGHUP, 5.0)]),
    "moetuner": ("wide", 8, []),
    "dp": ("deep", 4, []),
}


@pytest.mark.parametrize("method", list(EXACT))
def test_signal_stops_every_exact_method_at_every_moment(method, traces, tmp_path):
    trace, gpus, extra = EXACT[method]
    runs = [(m, signal.SIGINT) for m in MOMENTS] + [(m, s) for s, m in extra]
    args = [str(traces[trace]), "--gpus", str(gpus), "--method", method]
    _check(_signal_concurrently(args, runs, tmp_path), method)


@pytest.mark.parametrize("engine", ["sglang", "exflow"])
def test_signal_stops_the_search(engine, traces, tmp_path):
    """Both searches: the static engines' (the default) and the cross-layer one, whose eight
    restarts keep it working past 10 s."""
    args = [str(traces["searched"]), "--gpus", "8", "--method", "search", "--engine", engine,
            *(["--restarts", "8"] if engine == "exflow" else [])]
    _check(_signal_concurrently(args, [(m, signal.SIGINT) for m in MOMENTS], tmp_path),
           f"search ({engine})")


# A command whose main thread never unwinds (a library that swallows KeyboardInterrupt, or native
# code that does not return): the watchdog must end it, with the temporaries of its output.
_STUCK = r"""
import sys, time
from moeplace._fileio import atomic_path
from moeplace._interrupts import guarded

with guarded(), atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half an output")
    ready = False
    while True:
        try:
            if not ready:
                print("ready", flush=True)
                ready = True
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass
"""


def _start_stuck(tmp_path: Path, preexec=_default_signals) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, str(tmp_path / "out" / "p.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=preexec)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", proc.communicate()
    assert list((tmp_path / "out").iterdir()), "the temporary should exist while it works"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_command_that_swallows_the_interrupt_is_still_ended(tmp_path, sig):
    proc = _start_stuck(tmp_path)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < STOP_BOUND_S
    assert proc.returncode == 128 + sig, err
    assert err.decode().splitlines() == [f"moeplace: error: interrupted ({sig.name}); "
                                         "nothing written"]
    # the temporary and the directory created for it are gone, nothing was moved into place
    assert sorted(tmp_path.iterdir()) == []


def test_a_signal_ignored_at_start_stays_ignored(tmp_path):
    """nohup and a script's background jobs start us with SIGHUP / SIGINT ignored."""
    def hup_ignored() -> None:
        _default_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = _start_stuck(tmp_path, hup_ignored)
    proc.send_signal(signal.SIGHUP)
    time.sleep(2.0)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_guard_restores_the_callers_handlers():
    """In-process callers (click's test runner) get their own handlers back afterwards."""
    from moeplace._interrupts import guarded

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with guarded():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # no descriptor left behind

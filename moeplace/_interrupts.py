"""SIGINT, SIGTERM and SIGHUP end a command within about a second, whatever it is doing.

Python runs signal handlers only in the main thread and only between bytecodes, so a main thread
inside native code (a CP-SAT or HiGHS solve, a numba kernel, a long NumPy or SciPy call, an import)
would notice Ctrl-C only when that call returns, which for a solver can be its whole time limit.
One mechanism covers every phase instead of a check per call:

- the signal's C-level handler writes the signal number to a pipe (``signal.set_wakeup_fd``), which
  a watchdog thread reads at once, whatever the main thread is doing;
- the watchdog calls the *stop* callbacks that running native work registered (``on_interrupt``:
  CP-SAT ``stop_search``, HiGHS ``cancelSolve``, killing a CBC child), so they return promptly;
- the main thread meanwhile gets ``Interrupted`` (a ``KeyboardInterrupt``) and unwinds, running
  every ``finally`` (temporaries go);
- if it has not left ``GRACE_S`` after the signal, the watchdog runs the registered *cleanup*
  callbacks (temporaries, created directories) itself and ends the process.

Either way the process leaves with one stderr line, exit status 128 + signal, and nothing written:
``committing`` refuses to move an output into place once a signal has arrived, and it holds the
lock the exit takes, so an output is never half-moved. The exit is ``os._exit`` after flushing,
because interpreter teardown under a native solver's threads can abort (SIGABRT).

Only stdlib here: ``install_early`` runs before the package's heavy imports.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

from moeplace.errors import Interrupted

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP"))
                if s is not None)
# How long the main thread may take to unwind after a signal before the watchdog ends the
# process itself: long enough for ordinary cleanup, short enough that a stop takes < 2 s.
GRACE_S = 1.0

_lock = threading.RLock()  # held while an output is moved into place, and by the exit
_ids = itertools.count()
_stops: dict[int, Callable[[], Any]] = {}
_cleanups: dict[int, Callable[[], Any]] = {}
_committed: list[str] = []
_signum: int | None = None  # the first signal seen while guarded
_raised = False  # whether the main thread has been handed Interrupted already
_deferred = False  # an output is being moved into place: the handler must not raise now
_left = threading.Event()  # the guarded command has returned (or the process is leaving)
_fds: tuple[int, int] | None = None  # the watchdog's pipe while a command is guarded


def signalled() -> int | None:
    """The signal that arrived while a command was guarded, or None."""
    return _signum


def check() -> None:
    """Raise ``Interrupted`` if a signal has arrived (for work that does not reach bytecode
    often, or threads other than the main one)."""
    global _raised
    if _signum is not None:
        _raised = True  # the handler, still pending, must not raise a second one mid-cleanup
        raise Interrupted(_signum)


@contextlib.contextmanager
def on_interrupt(stop: Callable[[], Any] | None = None,
                 cleanup: Callable[[], Any] | None = None) -> Iterator[None]:
    """While the block runs: on a signal, call ``stop()`` at once from the watchdog (ask native
    work to return: it must be thread-safe), and ``cleanup()`` if the process has to be ended
    before the main thread unwound (remove a temporary). Raises ``Interrupted`` up front when
    a signal has already arrived, so no new work starts."""
    check()
    key = next(_ids)
    if stop is not None:
        _stops[key] = stop
    if cleanup is not None:
        _cleanups[key] = cleanup
    try:
        yield
    finally:
        _stops.pop(key, None)
        _cleanups.pop(key, None)


@contextlib.contextmanager
def committing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Around moving a finished output onto ``path``: refused (``Interrupted``) once a signal
    has arrived, and never cut in the middle by the watchdog's exit."""
    global _deferred
    with _lock:
        check()
        # Held back (not lost) while the move runs, so a signal cannot land between the move
        # and its record: the exit message then says what was written.
        _deferred = True
        try:
            yield
            _committed.append(os.fspath(path))
        finally:
            _deferred = False
        _raise_once()


def _message(signum: int) -> str:
    name = Interrupted(signum).signame
    if _committed:
        return f"moeplace: error: interrupted ({name}) after writing {', '.join(_committed)}"
    return f"moeplace: error: interrupted ({name}); nothing written"


def _leave(signum: int) -> NoReturn:
    """One stderr line, then exit 128 + signum without interpreter teardown."""
    with _lock:  # after any commit in progress; the second caller waits here forever
        _left.set()
        # Worker processes (the search's restarts fork a pool) would outlive us, blocked on
        # their task queue; subprocess children (CBC) went with their stop callbacks.
        mp = sys.modules.get("multiprocessing")
        if mp is not None:
            with contextlib.suppress(BaseException):
                for child in mp.active_children():
                    child.kill()
        for fn in list(_cleanups.values()):
            with contextlib.suppress(BaseException):
                fn()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        with contextlib.suppress(BaseException):
            os.write(2, (_message(signum) + "\n").encode())
        os._exit(128 + signum)


def exit_interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """Leave the CLI after ``exc`` unwound the command: one line, exit 128 + signal.

    A real signal leaves through ``os._exit`` (see the module docstring); a bare
    ``KeyboardInterrupt`` raised in-process (tests, a click prompt) through ``SystemExit``."""
    if _signum is not None:
        _leave(_signum)
    signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
    with contextlib.suppress(BaseException):
        sys.stderr.write(_message(signum) + "\n")
        sys.stderr.flush()
    raise SystemExit(128 + signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler (main thread): hand the main thread ``Interrupted`` once; later
    signals are ignored so they cannot cut its cleanup short (the watchdog ends it anyway)."""
    global _signum
    if _signum is None:
        _signum = signum
    if not _deferred:
        _raise_once()


def _raise_once() -> None:
    global _raised
    if _signum is not None and not _raised:
        _raised = True
        raise Interrupted(_signum)


def _watch(rfd: int) -> None:
    """The watchdog: wake on the first of our signals, stop native work, end the process
    ``GRACE_S`` later unless the main thread got out first."""
    global _signum
    while True:
        try:
            data = os.read(rfd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data or 0 in data:  # the guard is closing
            return
        ours = [s for s in data if s in SIGNALS and signal.getsignal(s) is _on_signal]
        if ours:
            break
    if _signum is None:
        _signum = ours[0]
    for fn in list(_stops.values()):
        with contextlib.suppress(BaseException):
            fn()
    if not _left.wait(GRACE_S):
        _leave(_signum)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Run a command under the mechanism above (main thread only; elsewhere a no-op).

    On return the previous handlers and wakeup descriptor are restored, so in-process callers
    (click's test runner) keep their own behaviour outside the command."""
    global _signum, _raised, _fds
    if threading.current_thread() is not threading.main_thread() or not SIGNALS:
        yield
        return
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    try:
        old_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(rfd)
        os.close(wfd)
        yield
        return
    # A signal ignored when the process started stays ignored (nohup; background jobs of a
    # script), as the convention is and as Python itself does for SIGINT.
    old = {s: signal.signal(s, _on_signal) for s in SIGNALS
           if signal.getsignal(s) is not signal.SIG_IGN}
    _signum, _raised, _fds = None, False, (rfd, wfd)
    _committed.clear()
    _left.clear()
    watchdog = threading.Thread(target=_watch, args=(rfd,), name="moeplace-interrupts",
                                daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        if _signum is None:
            _left.set()
            for s, h in old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            signal.set_wakeup_fd(old_fd)
            with contextlib.suppress(OSError):
                os.write(wfd, b"\0")
            watchdog.join(1.0)
            _fds = None
            os.close(rfd)
            os.close(wfd)
        # After a signal the process is leaving (exit_interrupted or the watchdog): keep the
        # handlers and the watchdog until it has.


def _after_fork_in_child() -> None:
    """A forked worker (the search's process pool) is not the command: it gets Python's own
    handlers back and stops writing to our watchdog's pipe, so a signal aimed at it alone is
    not taken for one aimed at the command. The command kills its workers when it leaves."""
    if _fds is None or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
        for s in SIGNALS:
            if signal.getsignal(s) in (_on_signal, _exit_at_once):
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT
                              else signal.SIG_DFL)
        for fd in _fds:
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    # Before a command starts nothing is open or half-written: leave now.
    _leave(signum)


def install_early() -> None:
    """For the ``moeplace`` command only, before its heavy imports (NumPy, pandas, Arrow: seconds
    on a busy machine): a signal then ends the process at once with the one-line message."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(s) in (signal.default_int_handler, signal.SIG_DFL):
                signal.signal(s, _exit_at_once)


def running_as_cli() -> bool:
    """Whether this process is the ``moeplace`` console script or ``python -m moeplace.cli``."""
    argv = getattr(sys, "orig_argv", None) or sys.argv
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("moeplace", "moeplace.exe"):
        return True
    return any(a == "-m" and b in ("moeplace", "moeplace.cli")
               for a, b in itertools.pairwise(argv))

"""Run a blocking native solver so that a time limit and a signal both stop it promptly.

Native solvers (CP-SAT, HiGHS, a CBC subprocess) block the thread that calls them. Running the
solve in a worker thread leaves the main thread free to watch the deadline and ask the solver to
stop (``stop``: CP-SAT ``stop_search``, HiGHS ``cancelSolve``, killing CBC). On SIGINT, SIGTERM
or SIGHUP ``moeplace._interrupts`` calls the same ``stop`` at once from its watchdog thread and
the main thread gets ``Interrupted``; the process then leaves without waiting for the solver.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from moeplace._interrupts import on_interrupt
from moeplace._progress import Progress

R = TypeVar("R")

# How long a solver may take to wind down after being asked to stop before we stop waiting.
STOP_GRACE_S = 1.5


class OutOfTime(Exception):
    """Raised inside a solver's model building when its deadline has passed."""


def check_deadline(deadline: float | None) -> None:
    """Raise ``OutOfTime`` once ``time.monotonic()`` is past ``deadline``."""
    if deadline is not None and time.monotonic() > deadline:
        raise OutOfTime


def run_stoppable(fn: Callable[[], R], stop: Callable[[], Any], hard_deadline: float,
                  desc: str = "solver") -> R | None:
    """``fn()`` in a daemon thread; ``stop()`` at ``hard_deadline`` (monotonic) or on a signal.

    Returns fn's result, or None when it had not returned ``STOP_GRACE_S`` after being stopped
    at the deadline. On a signal ``stop()`` runs at once and ``Interrupted`` reaches the caller
    without waiting for the thread (the process is leaving; the daemon thread dies with it).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    th = threading.Thread(target=target, name="moeplace-solver", daemon=True)
    stopped_at: float | None = None
    t0 = time.monotonic()
    # Time-based bar: native solvers report nothing while they run, the clock does.
    bar = Progress(round(max(hard_deadline - t0, 0.0), 1), desc, "s")
    try:
        with on_interrupt(stop=stop):
            th.start()
            while th.is_alive():
                th.join(0.05)
                now = time.monotonic()
                bar.set(round(min(now - t0, bar.total), 1))
                if stopped_at is None and now > hard_deadline:
                    stop()
                    stopped_at = now
                elif stopped_at is not None and now > stopped_at + STOP_GRACE_S:
                    return None
    except KeyboardInterrupt:
        stop()  # also for a bare KeyboardInterrupt raised in-process
        raise
    finally:
        bar.close()
    if "error" in box:
        raise box["error"]
    return box.get("value")

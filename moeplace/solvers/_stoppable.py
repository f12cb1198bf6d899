"""Run a blocking native solver so that a time limit and Ctrl-C both stop it promptly.

Native solvers (CP-SAT, HiGHS, a CBC subprocess) block the main thread, where Python delivers
SIGINT, so a ``KeyboardInterrupt`` would wait for them to return. Running the solve in a worker
thread leaves the main thread free to notice the signal or the deadline and ask the solver to
stop (``stop``: CP-SAT ``stop_search``, HiGHS ``cancelSolve``, killing CBC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from moeplace._progress import Progress

R = TypeVar("R")

# How long a solver may take to wind down after being asked to stop before we stop waiting.
STOP_GRACE_S = 1.5

# Set when a native solver thread was still running as Ctrl-C gave up on it: the process must
# then leave with os._exit after its own cleanup, since interpreter teardown while the
# solver's C++ threads run can crash (see cli.main).
abandoned_threads: list[threading.Thread] = []


class OutOfTime(Exception):
    """Raised inside a solver's model building when its deadline has passed."""


def check_deadline(deadline: float | None) -> None:
    """Raise ``OutOfTime`` once ``time.monotonic()`` is past ``deadline``."""
    if deadline is not None and time.monotonic() > deadline:
        raise OutOfTime


def run_stoppable(fn: Callable[[], R], stop: Callable[[], Any], hard_deadline: float,
                  desc: str = "solver") -> R | None:
    """``fn()`` in a daemon thread; ``stop()`` at ``hard_deadline`` (monotonic) or on Ctrl-C.

    Returns fn's result, or None when it had not returned ``STOP_GRACE_S`` after being stopped
    at the deadline; re-raises ``KeyboardInterrupt`` after stopping (the daemon thread dies
    with the process if the solver ignores the request).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    th = threading.Thread(target=target, name="moeplace-solver", daemon=True)
    th.start()
    stopped_at: float | None = None
    t0 = time.monotonic()
    # Time-based bar: native solvers report nothing while they run, the clock does.
    bar = Progress(round(max(hard_deadline - t0, 0.0), 1), desc, "s")
    try:
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
        stop()
        th.join(STOP_GRACE_S)
        if th.is_alive():
            abandoned_threads.append(th)
        raise
    finally:
        bar.close()
    if "error" in box:
        raise box["error"]
    return box.get("value")

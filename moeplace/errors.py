"""Typed exceptions that every moeplace layer raises for bad input, missing extras and infeasible requests."""

from __future__ import annotations


class MoeplaceError(Exception):
    """Base class: the CLI turns any of these into one line on stderr and exit code 2."""


class InputError(MoeplaceError, ValueError):
    """A file or argument is malformed; the message names the source, the field and the fix."""

    def __init__(self, source: object, field: str, problem: str, fix: str = "") -> None:
        self.source = str(source)
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{self.source}: {field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class MissingDependencyError(MoeplaceError, ImportError):
    """An optional extra (torch, matplotlib, numba) is needed for this call."""

    def __init__(self, package: str, purpose: str, extra: str) -> None:
        super().__init__(
            f"{purpose} needs {package}, which is not installed "
            f"(pip install 'moeplace[{extra}]')"
        )


class InfeasibleError(MoeplaceError, ValueError):
    """The request cannot be satisfied (e.g. more GPUs than slots allow)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: work stops, temporaries are removed, nothing is written.

    A ``KeyboardInterrupt`` so that code which already stops cleanly on Ctrl-C stops the same way
    on the other signals; ``exit_code`` is the shell's 128 + signal number.
    """

    def __init__(self, signum: int = 2) -> None:
        import signal

        self.signum = int(signum)
        try:
            self.signame = signal.Signals(self.signum).name
        except ValueError:
            self.signame = f"signal {self.signum}"
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TimeLimitError(MoeplaceError):
    """Work that cannot return a partial answer (e.g. a baseline) ran past ``--time-limit``."""

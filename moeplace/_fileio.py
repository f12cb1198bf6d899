"""Safe outputs: checked targets, atomic writes and cleanup, so a failure or a signal never leaves
partial output behind and an output never destroys what is already there.

The rules every writer follows (``atomic_path`` enforces them):

- an empty path, a device, FIFO or socket, or a non-empty directory is refused, never replaced;
- a symlink is written through: its target is replaced, the link itself stays;
- an output that is (or resolves to) one of the command's inputs is refused;
- parent directories the write created are removed again if it fails;
- SIGINT, SIGTERM and SIGHUP remove temporaries and never let an output be moved into place
  (``moeplace._interrupts``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moeplace._interrupts import committing, on_interrupt
from moeplace.errors import InputError

# Real paths of the current command's inputs; the CLI sets them, library callers may too.
_INPUTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("moeplace_inputs",
                                                                          default=())


@contextlib.contextmanager
def protected_inputs(*paths: str | os.PathLike[str] | None) -> Iterator[None]:
    """Within the block, ``atomic_path`` refuses any output that resolves to one of ``paths``."""
    real = tuple(os.path.realpath(p) for p in paths if p)
    token = _INPUTS.set(_INPUTS.get() + real)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def check_output(path: str | os.PathLike[str], *, directory: bool | None = None) -> Path:
    """Validate an output path and return the path to write (a symlink's target).

    ``directory``: True for a directory output, False for a file, None when either may come.
    Raises ``InputError`` naming the path, the problem and the fix.
    """
    raw = os.fspath(path)
    if not raw.strip():
        raise InputError("--out", "path", "is empty", "give a file name")
    final = Path(os.path.realpath(raw))  # through symlinks: the link stays, its target is written
    if Path(raw).is_symlink() and not final.parent.is_dir():
        raise InputError(raw, "path", f"is a symlink to {final}, whose directory does not exist",
                         "fix the link or write elsewhere")
    real = str(final)
    for inp in _INPUTS.get():
        if real == inp:
            raise InputError(raw, "path", "is one of this command's inputs",
                             "write the output to a new path; inputs are never overwritten")
        if inp.startswith(real.rstrip(os.sep) + os.sep):
            raise InputError(raw, "path", f"contains this command's input {inp}",
                             "write the output somewhere else")
    try:
        st = os.stat(final)
    except FileNotFoundError:
        return final
    except OSError as exc:
        raise InputError(raw, "path", f"cannot be inspected ({exc.strerror})",
                         "check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        if directory is False:
            raise InputError(raw, "path", "is a directory", "give a file name inside it")
        if any(final.iterdir()):
            raise InputError(raw, "path", "is a directory that is not empty",
                             "choose a new path; moeplace never deletes what is there")
    elif not stat.S_ISREG(st.st_mode):
        raise InputError(raw, "path", "is not a regular file (a device, FIFO or socket)",
                         "give a path to a regular file")
    elif directory is True:
        raise InputError(raw, "path", "is an existing file, but a directory would be written",
                         "choose a new path")
    return final


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return the ones created, deepest first."""
    missing: list[Path] = []
    p = parent
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_dirs(missing)
            raise InputError(d, "path", f"cannot create directory ({exc.strerror})",
                             "check the path and its permissions") from None
    return missing


def _remove_dirs(created: list[Path]) -> None:
    for d in created:  # deepest first; only ever empty directories this write made
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The caller creates a file or a directory at the yielded path. ``path`` is checked first
    (``check_output``); on any failure, including a signal, the temporary and any parent
    directories created for it are removed and nothing appears at ``path``.
    """
    final = check_output(path, directory=directory)
    created: list[Path] = []
    made: list[Path] = []
    ok = False

    def remove() -> None:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        if not ok:
            _remove_dirs(created)

    # If a signal has to end the process before this unwinds, the exit removes them instead.
    with on_interrupt(cleanup=remove):
        try:
            created += _make_parents(final.parent)
            try:
                made.append(Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp",
                                                  dir=final.parent)))
            except OSError as exc:
                raise InputError(path, "path", f"cannot write here ({exc.strerror})",
                                 "check the directory and its permissions") from None
            tmp = made[0] / final.name
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"nothing was written to {final}")
            # Checked again: something may have appeared at the path while the work ran.
            check_output(path, directory=tmp.is_dir())
            # rename(2) replaces an empty directory and refuses a non-empty one, so the target
            # stays intact whatever happens to it meanwhile. Refused once a signal arrived.
            with committing(final):
                os.replace(tmp, final)
                ok = True
        finally:
            remove()

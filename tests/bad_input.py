"""Assertions shared by the bad-input tables: a typed error in the library, one line in the CLI."""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.errors import InputError


def raises_input(fn: Callable[[], Any], needle: str, field: str | None = None) -> InputError:
    """``fn()`` raises ``InputError`` (not a bare ValueError, RecursionError, MemoryError, ...)
    whose one-line message contains ``needle``; ``field``, when given, is the field it names."""
    with pytest.raises(InputError) as ei:
        fn()
    err = ei.value
    msg = str(err)
    assert needle in msg, msg
    assert "\n" not in msg, msg
    if field is not None:
        assert field in err.field, (err.field, msg)
    return err


def cli_fails(args: list[str], needle: str) -> str:
    """The CLI exits 2 with exactly one stderr line containing ``needle``, nothing on stdout
    and no traceback; returns that line."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, (args, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, (args, r.stderr)
    assert needle in lines[0], (args, lines[0])
    assert lines[0].startswith("moeplace: error: "), lines[0]
    assert r.stdout == "", (args, r.stdout)
    return lines[0]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB, Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""The serving engines' own code for tests: vLLM and SGLang, each installed ``--no-deps`` (with only
the small packages the modules under test import) under ``{sys.prefix}/engines/NAME`` by
``.ci/run``. Tests run engine code in a subprocess with that directory on ``PYTHONPATH``, so the
engine never leaks into the main test process, and skip cleanly where it is not installed."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ENGINES = {"vllm": "0.34.0", "sglang": "0.5.23"}


def engine_path(name: str) -> Path:
    """The engine's install directory, skipping the test when it is not there."""
    p = Path(sys.prefix) / "engines" / name
    if not (p / name).is_dir():
        pytest.skip(f"{name} is not installed under {p} (.ci/run installs {name}=={ENGINES[name]})")
    return p


def engine_env(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python imports the installed engine (and moeplace as installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(engine_path(name)), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def run_with_engine(name: str, code: str, *, extra_env: dict[str, str] | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that sees the engine; the caller checks the result."""
    return subprocess.run([sys.executable, "-c", code], env=engine_env(name, extra_env), text=True,
                          capture_output=True, timeout=timeout)


# ---- one engine import per test process, a fork per check ------------------------------------
# Importing torch and an engine costs 8-10 CPU s, and the integration tests ran about thirty such
# interpreters. A check still needs a process of its own (engine plug-in state, environment
# variables read when a plug-in loads, monkeypatched engine classes), but not a fresh import: a
# server interpreter imports the engine once (``prelude``) and forks one child per check, which
# starts from that state, with nothing of an earlier check in it, exactly as a new interpreter
# would after running the prelude. The child gets the environment ``run_with_engine`` would pass,
# runs the code as ``python -c`` would (``__main__``, exit status, traceback on stderr) and its
# stdout and stderr come back as a ``CompletedProcess``.
_SERVER = r"""
import json, os, signal, sys, tempfile, threading, traceback
proto = os.fdopen(os.dup(1), "w")
# what the prelude prints goes to files, and to the head of every check's stdout and stderr
said = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
os.dup2(said[0].fileno(), 1)
os.dup2(said[1].fileno(), 2)
main = {"__name__": "__main__"}  # the script's globals: a check goes on where the prelude ended
try:
    exec(compile(json.loads(sys.argv[1]), "<string>", "exec"), main)
except BaseException:
    tb = traceback.format_exc()
    sys.stderr.flush()
    said[1].seek(0)
    proto.write(json.dumps({"error": said[1].read().decode(errors="replace") + tb}) + "\n")
    raise SystemExit(1)
sys.stdout.flush()
sys.stderr.flush()
heads = []
for f in said:
    f.seek(0)
    heads.append(f.read())
# fork copies only the calling thread: a prelude that started Python threads cannot serve
proto.write(json.dumps({"threads": threading.active_count()}) + "\n")
proto.flush()
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(os.devnull)
        for fd, path, head in ((1, req["stdout"], heads[0]), (2, req["stderr"], heads[1])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.write(fd, head)
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["-c"]
        signal.alarm(req["timeout"])  # as subprocess.run's timeout: the check is killed
        rc = 0
        try:
            exec(compile(req["code"], "<string>", "exec"), main)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                rc = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                rc = 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
    proto.flush()
"""


class _Server:
    def __init__(self, name: str, prelude: str) -> None:
        self.name, self.prelude = name, prelude
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(prelude)],
                                     env=engine_env(name), text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.ready = json.loads(self.proc.stdout.readline() or '{"error": "server died"}')

    def run(self, code: str, extra_env: dict[str, str] | None, timeout: float
            ) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            self.proc.stdin.write(json.dumps({
                "code": code, "env": engine_env(self.name, extra_env), "timeout": max(1, int(timeout)),
                "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            assert reply, f"the {self.name} server ended (exit {self.proc.poll()})"
            rc = json.loads(reply)["rc"]
            if rc == -signal.SIGALRM:
                raise subprocess.TimeoutExpired(["<forked check>"], timeout)
            return subprocess.CompletedProcess(["<forked check>"], rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVERS: dict[tuple[str, str], _Server] = {}


@atexit.register
def _close_servers() -> None:
    for s in _SERVERS.values():
        s.close()


# vLLM's EPLB policies, with torch: what every vLLM check imports first (one server for all of them).
VLLM_PRELUDE = "import numpy, torch\nimport vllm.distributed.eplb.policy\n"


def _server(name: str, prelude: str) -> _Server:
    engine_path(name)
    key = (name, prelude)
    if key not in _SERVERS:
        _SERVERS[key] = _Server(name, prelude)
    return _SERVERS[key]


def prelude_error(name: str, prelude: str) -> str | None:
    """The last line of the error ``prelude`` ends with under the engine (None: it runs)."""
    err = _server(name, prelude).ready.get("error")
    return err.strip().splitlines()[-1] if err else None


def run_forked(name: str, prelude: str, code: str, *, extra_env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """What ``run_with_engine(name, prelude + code, ...)`` returns, from a child forked off one
    interpreter (per test process) that has run ``prelude`` (``code`` sees its globals); where
    the prelude fails (the engine does not import), that failure as the check's result (exit 1,
    the traceback on stderr), as the fresh interpreter would have ended."""
    s = _server(name, prelude)
    if "error" in s.ready:
        return subprocess.CompletedProcess(["<prelude>"], 1, "", s.ready["error"])
    if s.ready["threads"] != 1:  # not safe to fork: a fresh interpreter per check instead
        return run_with_engine(name, prelude + "\n" + code, extra_env=extra_env, timeout=timeout)
    return s.run(code, extra_env, timeout)

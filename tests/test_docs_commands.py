"""The documentation is executed: every shell block in README.md and docs/*.md runs as printed.

Each fenced ``bash``/``sh``/``console`` block is one of:

- runnable: every command is ``moeplace ...`` (or ``export NAME=VALUE``); a document's runnable
  blocks run in order in one fresh directory (files made by one command feed the next), with
  placeholders mapped to the bundled trace (``PLACEHOLDERS``) and ``moeplace serve ... &``
  started on a free port, the client commands pointed at it, and stopped afterwards;
- a usage synopsis, marked ``<!-- synopsis -->`` directly above it: its subcommands must exist
  and every flag it shows must be in that subcommand's ``--help`` (choices too);
- marked ``<!-- not run: REASON -->`` directly above it, the reason saying why in the document.

A block that is none of these, a marker without a reason, or a marker that is not directly
above a shell block fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.traces.demo import demo_trace_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "console")
MARKER = re.compile(r"^<!--\s*(not run|synopsis)\b\s*(:?)(.*?)-->\s*$")
# Placeholder words as the documents print them, and what they stand for here (given the
# working directory and the files the document's commands wrote so far, newest last).
PLACEHOLDERS = {
    "TRACE": lambda d, made: str(demo_trace_path()),
    "TRACES_DIR": lambda d, made: str(_shard_dir(d)),
    "DIR": lambda d, made: str(_shard_dir(d)),
    "HOST:PORT": lambda d, made: "local",
    "PLACEMENT.json": lambda d, made: _latest(made, ".json", "PLACEMENT.json"),
}
COMMAND_TIMEOUT = 900  # seconds per command: generous, the suite's own limit is the real bound


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # "not run" | "synopsis"
    reason: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        name = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc.name
        return f"{name}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced shell blocks of ``doc`` with the marker directly above each; markers that are
    not directly above a shell block are reported as a problem of a pseudo-block."""
    lines = doc.read_text().splitlines()
    out: list[Block] = []
    i = 0
    fence = None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(`{3,})\s*([\w+-]*)\s*$", line)
        if fence is None and m:
            fence, lang, start, body = m.group(1), m.group(2), i, []
            i += 1
            while i < len(lines) and lines[i].strip() != fence:
                body.append(lines[i])
                i += 1
            fence = None
            if lang in SHELL:
                b = Block(doc, start + 1, lang, "\n".join(body))
                above = lines[start - 1] if start else ""
                mk = MARKER.match(above.strip())
                if mk:
                    b.marker = mk.group(1)
                    b.reason = mk.group(3).strip()
                    if b.marker == "not run" and (not mk.group(2) or not b.reason):
                        b.problems.append("'<!-- not run: REASON -->' needs a reason")
                out.append(b)
        elif MARKER.match(line.strip()):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.match(r"^`{3,}\s*(bash|sh|console)\s*$", nxt):
                b = Block(doc, i + 1, "", "", "stray")
                b.problems.append("marker not directly above a bash/sh/console block")
                out.append(b)
        i += 1
    return out


def commands(text: str, *, synopsis: bool = False, lang: str = "bash") -> list[str]:
    """The block's commands: backslash continuations joined (and, in a synopsis, indented lines
    joined to the command above), blank and comment lines dropped; in a ``console`` block only
    the ``$ `` lines (the rest is output)."""
    out: list[str] = []
    cont = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if lang == "console" and not cont:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not line.strip() or (line.lstrip().startswith("#") and not cont):
            cont = False
            continue
        if cont or (synopsis and out and raw[:1].isspace()):
            out[-1] += " " + line.strip().rstrip("\\").strip()
        else:
            out.append(line.strip().rstrip("\\").strip())
        cont = line.endswith("\\")
    return out


def _strip_comment(cmd: str) -> str:
    # "  # ..." ends a command line in these documents (shlex would also eat "#" inside words).
    return re.split(r"\s+#\s", cmd, maxsplit=1)[0].strip()


def _subcommands() -> dict[str, click.Command]:
    assert isinstance(main, click.Group)
    return dict(main.commands)


def runnable_problems(b: Block) -> list[str]:
    """Why an unmarked block cannot run here (empty: it can)."""
    probs = []
    subs = _subcommands()
    for cmd in commands(b.text, lang=b.lang):
        try:
            words = shlex.split(cmd, comments=True)
        except ValueError as exc:
            probs.append(f"{cmd!r}: {exc}")
            continue
        if "$(" in cmd or "`" in cmd:
            probs.append(f"{cmd!r}: command substitution")
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words = words[1:]
        if not words:
            continue
        if words[0] == "export":
            continue
        if words[0] != "moeplace":
            probs.append(f"{cmd!r}: only moeplace commands run here")
        elif len(words) < 2 or words[1] not in subs:
            probs.append(f"{cmd!r}: unknown subcommand")
        for w in words:
            for tok in re.findall(r"\b[A-Z][A-Z0-9_]*(?::[A-Z]+|\.json)?\b", w):
                if tok not in PLACEHOLDERS and not re.match(r"^[A-Z_]+=", w) \
                        and not tok.startswith("MOEPLACE_"):
                    probs.append(f"{cmd!r}: placeholder {tok} has no stand-in")
    return probs


ALL = [b for d in DOCS for b in blocks(d)]


@pytest.mark.parametrize("b", ALL, ids=[b.where for b in ALL])
def test_every_block_runs_is_a_synopsis_or_says_why_not(b: Block) -> None:
    assert not b.problems, f"{b.where}: {b.problems}"
    if b.marker == "not run":
        return
    if b.marker == "synopsis":
        assert any(c.startswith("moeplace ") for c in commands(b.text, synopsis=True)), \
            f"{b.where}: a synopsis without moeplace commands"
        return
    probs = runnable_problems(b)
    assert not probs, (f"{b.where}: cannot run {probs}; fix the block or mark it "
                       "'<!-- not run: REASON -->'")


def test_markers_are_checked() -> None:
    """The parser sees the markers this test relies on (a regression in it would pass all)."""
    found = {(b.doc.name, b.marker) for b in ALL}
    assert ("README.md", "not run") in found and ("README.md", "synopsis") in found
    assert ("README.md", None) in found  # some README block really runs
    assert len([b for b in ALL if b.doc.name == "README.md"]) >= 5


def _bad_doc_problems(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "x.md"
    p.write_text(text)
    bs = blocks(p)
    return [q for b in bs for q in b.problems] + [
        q for b in bs if b.marker is None for q in runnable_problems(b)]


def test_the_checker_refuses_what_it_should(tmp_path) -> None:
    assert _bad_doc_problems(tmp_path, "<!-- not run -->\n```bash\npip install x\n```\n")
    assert _bad_doc_problems(tmp_path, "<!-- not run:  -->\n```bash\npip install x\n```\n")
    assert _bad_doc_problems(tmp_path, "```bash\npip install x\n```\n")
    assert _bad_doc_problems(tmp_path, "```sh\nmoeplace nosuch x\n```\n")
    assert _bad_doc_problems(tmp_path, "```bash\nmoeplace analyze UNKNOWN_THING\n```\n")
    assert _bad_doc_problems(tmp_path, "<!-- not run: why -->\n\n```bash\nls\n```\n")
    assert not _bad_doc_problems(tmp_path, "<!-- not run: needs a GPU -->\n```bash\nvllm\n```\n")
    assert not _bad_doc_problems(tmp_path, "```console\n$ moeplace analyze TRACE --json\n"
                                           "{\"tokens\": 2048}\n```\n")


def test_a_document_runs_in_order_and_a_failing_command_fails(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\nmoeplace stats TRACE --out s.npz\n"
                   "moeplace solve s.npz --gpus 4 --method eplb --out plc.json\n```\n\n"
                   "```console\n$ moeplace evaluate TRACE PLACEMENT.json --json\n{...}\n```\n")
    (tmp_path / "w").mkdir()
    ran = run_doc(doc, tmp_path / "w")
    assert ran[-1].endswith("plc.json --json") and (tmp_path / "w" / "plc.json").exists()
    doc.write_text("```bash\nmoeplace analyze no-such-trace.parquet\n```\n")
    with pytest.raises(AssertionError, match="exited 2"):
        run_doc(doc, tmp_path / "w")


# ---- synopsis blocks: subcommands and flags against --help ----------------------------------

def synopsis_problems(text: str) -> list[str]:
    subs = _subcommands()
    probs = []
    for cmd in commands(text, synopsis=True):
        words = _strip_comment(cmd).split()
        if not words or words[0] != "moeplace":
            probs.append(f"{cmd!r}: not a moeplace command")
            continue
        if len(words) < 2 or words[1] not in subs:
            probs.append(f"{cmd!r}: unknown subcommand {words[1:2]}")
            continue
        sub = subs[words[1]]
        helptext = CliRunner().invoke(main, [words[1], "--help"]).output
        opts = {o: p for p in sub.params if isinstance(p, click.Option) for o in p.opts}
        for i, w in enumerate(words):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", w):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext) \
                        or flag not in opts:
                    probs.append(f"moeplace {words[1]}: {flag} is not in its --help")
                    continue
                p = opts[flag]
                value = w.split("=", 1)[1] if "=" in w and w.startswith(flag) else (
                    words[i + 1] if i + 1 < len(words) else "")
                if isinstance(p.type, click.Choice) and "|" in value:
                    for alt in value.strip("[]").split("|"):
                        if alt not in p.type.choices:
                            probs.append(f"moeplace {words[1]} {flag}: {alt!r} is not one of "
                                         f"{list(p.type.choices)}")
    return probs


SYNOPSES = [b for b in ALL if b.marker == "synopsis"]


@pytest.mark.parametrize("b", SYNOPSES, ids=[b.where for b in SYNOPSES])
def test_synopsis_flags_exist(b: Block) -> None:
    probs = synopsis_problems(b.text)
    assert not probs, f"{b.where}: {probs}"


def test_synopsis_check_catches_a_wrong_flag() -> None:
    assert synopsis_problems("moeplace solve TRACE --gpus 8 [--no-such-flag 3]")
    assert synopsis_problems("moeplace solve TRACE --gpus 8 [--engine sglang|nosuch]")
    assert synopsis_problems("moeplace nosuch --x")
    assert not synopsis_problems("moeplace solve TRACE --gpus 8\n   [--engine sglang|exflow]")


# ---- running the documents ------------------------------------------------------------------

def _moeplace() -> list[str]:
    """The installed entry point beside this interpreter, else the same through -c."""
    script = Path(sys.executable).with_name("moeplace")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from moeplace.cli import main; "
            "sys.argv[0] = 'moeplace'; sys.exit(main())"]


def _shard_dir(d: Path) -> Path:
    out = d / "traces-dir"
    if not out.exists():
        out.mkdir()
        shutil.copy(demo_trace_path(), out / "part-00000.parquet")
    return out


def _latest(made: list[str], suffix: str, name: str) -> str:
    found = [m for m in made if m.endswith(suffix)]
    assert found, f"{name}: no earlier command in this document wrote a {suffix} file"
    return found[-1]


def _substitute(word: str, d: Path, made: list[str]) -> str:
    for name, value in sorted(PLACEHOLDERS.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", word):
            stand_in = value(d, made)
            word = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])",
                          lambda _m, v=stand_in: v, word)
    return word


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"moeplace serve exited {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("moeplace serve did not answer /healthz")


def _needs(b: Block) -> list[str]:
    """Optional extras a block's commands need (the test skips without them)."""
    need = []
    if "--ray" in b.text:
        need.append("ray")
    if re.search(r"moeplace (serve|push-stats|pull-placement|collect)\b", b.text):
        need += ["fastapi", "uvicorn", "httpx"]
    return need


def run_doc(doc: Path, work: Path) -> list[str]:
    """Run ``doc``'s runnable blocks in order in ``work``; the commands run, as printed."""
    env = dict(os.environ)
    env.pop("MOEPLACE_TOKEN", None)
    subs = _subcommands()
    servers: list[subprocess.Popen] = []
    port = None
    ran: list[str] = []
    made: list[str] = []  # files the commands wrote (--out), for PLACEMENT.json and the like
    try:
        for b in blocks(doc):
            if b.marker is not None:
                continue
            for cmd in commands(b.text, lang=b.lang):
                words = shlex.split(cmd, comments=True)
                assign = {}
                while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    assign[k] = v
                if words and words[0] == "export":
                    for w in words[1:]:
                        k, v = w.split("=", 1)
                        env[k] = v
                    continue
                background = words[-1] == "&"
                words = [_substitute(w, work, made) for w in (words[:-1] if background else words)]
                sub = subs[words[1]]
                names = {o for p in sub.params for o in getattr(p, "opts", ())}
                if background:
                    assert words[1] == "serve", f"{b.where}: only serve runs in the background"
                    port = _free_port()
                    words += ["--port", str(port)]
                elif port is not None and "--service" in names and "--service" not in words:
                    words += ["--service", f"http://127.0.0.1:{port}"]
                argv = _moeplace() + words[1:]
                ran.append(" ".join(words))
                cenv = {**env, **assign}
                if background:
                    proc = subprocess.Popen(argv, cwd=work, env=cenv, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
                    servers.append(proc)
                    _wait_healthy(port, proc)
                    continue
                r = subprocess.run(argv, cwd=work, env=cenv, capture_output=True, text=True,
                                   timeout=COMMAND_TIMEOUT)
                assert r.returncode == 0, (f"{b.where}: `{cmd}` exited {r.returncode}\n"
                                           f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
                assert "Traceback" not in r.stderr, f"{b.where}: `{cmd}`\n{r.stderr[-2000:]}"
                made += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"]
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return ran


RUNNABLE = [d for d in DOCS if any(b.marker is None for b in blocks(d))]


@pytest.mark.parametrize("doc", RUNNABLE, ids=[d.name for d in RUNNABLE])
def test_documented_commands_run_as_printed(doc: Path, tmp_path) -> None:
    for b in blocks(doc):
        if b.marker is None:
            for mod in _needs(b):
                if importlib.util.find_spec(mod) is None:
                    pytest.skip(f"{b.where} needs {mod} (moeplace[dev])")
    ran = run_doc(doc, tmp_path)
    assert ran, f"{doc.name}: nothing ran"

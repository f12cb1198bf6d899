"""Durable state of the placement service: SQLite (WAL) for records, ``.npz`` files beside it.

Layout under ``DATA_DIR``::

    moeplace.db                         deployments, batches, placements, jobs (schema versioned)
    stats/<deployment>/<window>/<uuid>.npz   one validated statistics upload per accepted batch
    placements/<deployment>/<version>.json   solved placements (``Placement`` JSON with its report)
    jobs/<job>/                          a solve job's inputs and result while it runs

Durability: an upload's file is written to a temporary name, fsynced, renamed and its directory
fsynced; only then is its ``batches`` row committed (``synchronous=FULL``), and only after the
commit does the service answer. The row is the commit point: a crash before it leaves an orphan
file that the next start removes; a crash after it loses nothing. The row's primary key
``(deployment, batch_id)`` makes a retried upload count once, decided inside that transaction.

Windows and expiry: an upload belongs to the window of its arrival time
(``floor(t / window_seconds)``). Statistics are kept exactly (integer counts, no decay) for the
newest ``retain_windows`` windows; older windows expire: their files are deleted, their batch ids
are kept, so a late retry of an expired batch is still recognised and not counted again. "Recent"
statistics, which solves and drift use, are the exact sum of the newest ``recent_windows``
windows that hold data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._fileio import atomic_path
from moeplace._limits import check_memory
from moeplace.errors import InputError, MoeplaceError
from moeplace.traces import RoutingStats, TraceMeta

SCHEMA_VERSION = 1
DB_NAME = "moeplace.db"
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_BATCH_ID = 200


class NotFound(MoeplaceError):
    """An id (deployment, job, placement version) that the service does not hold: HTTP 404."""


class Conflict(MoeplaceError):
    """The request contradicts stored state (a name taken, a batch id reused for other data): 409."""


@dataclass(frozen=True)
class Policy:
    """How uploads are grouped in time and how long they count."""

    window_seconds: float = 600.0
    retain_windows: int = 144
    recent_windows: int = 6

    def as_dict(self) -> dict[str, Any]:
        return {"window_seconds": self.window_seconds, "retain_windows": self.retain_windows,
                "recent_windows": self.recent_windows,
                "rule": "windows are exact sums of the uploads that arrived in them; the newest "
                        "retain_windows windows are kept, older ones expire (files deleted, batch "
                        "ids kept for de-duplication); solves and drift use the newest "
                        "recent_windows windows that hold data"}


@dataclass
class _Window:
    tokens: int
    batches: int
    load: np.ndarray
    transitions: bool  # every batch in it carries transitions


@dataclass
class _Agg:
    """In-memory per-window sums of one deployment (rebuilt from the files at start)."""

    windows: dict[int, _Window] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_spec(spec: dict[str, Any]) -> None:
    """Cross-field checks of a deployment spec (types and ranges come from the API model)."""
    src = f"deployment {spec.get('name')!r}"
    L, N, k = spec["num_layers"], spec["num_experts"], spec["top_k"]
    ids = spec["moe_layer_ids"]
    if len(ids) != L:
        raise InputError(src, "moe_layer_ids", f"{len(ids)} ids for {L} MoE layers",
                         "give one hidden-layer id per MoE layer")
    if len(set(ids)) != len(ids):
        raise InputError(src, "moe_layer_ids", "an id appears twice", "list each id once")
    H = spec.get("num_hidden_layers")
    if H is not None and max(ids) >= H:
        raise InputError(src, "num_hidden_layers", f"{H} hidden layers cannot hold MoE layer "
                         f"{max(ids)}", "give the model's num_hidden_layers")
    if k > N:
        raise InputError(src, "top_k", f"{k} > {N} experts", "top_k lies in 1..num_experts")
    shape, hw = spec.get("model_shape"), spec.get("hardware")
    if shape is not None:
        from moeplace.solvers.simulator import ModelShape

        ModelShape.named(shape)
    if hw is not None:
        # Bundled names only (a remote caller must not name files on the server); the
        # simulator's own loader finds and validates the profile.
        if not isinstance(hw, str) or not re.fullmatch(r"[a-z0-9-]{1,40}", hw):
            raise InputError(src, "hardware", f"{hw!r:.60} is not a bundled hardware profile",
                             "use h100-nvlink or h100-ib")
        from moeplace.solvers.simulator import Hardware

        Hardware.load(hw)
    c = spec["cluster"]
    G, M, R = c["num_gpus"], c["num_nodes"], c["replicas"]
    if G % M:
        raise InputError(src, "cluster.num_nodes", f"{G} GPUs do not split into {M} nodes",
                         "use a node count that divides num_gpus")
    if G > N + R or (N + R) % G:
        raise InputError(src, "cluster", f"{N} experts + {R} replicas do not fill {G} GPUs evenly",
                         "choose replicas so (num_experts + replicas) % num_gpus == 0")
    if R and (N + R) // G > N:
        raise InputError(src, "cluster.replicas", "more slots per GPU than experts",
                         "use fewer replicas")


class Store:
    """All durable state; thread-safe (one SQLite connection behind a lock)."""

    def __init__(self, data_dir: str | os.PathLike[str], policy: Policy = Policy(),
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(data_dir)
        self.policy = policy
        self.clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._all_readers: list[sqlite3.Connection] = []
        self.db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False,
                                  isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._readers = threading.local()  # WAL: readers never wait for a writer's commit
        self.latest: dict[str, int] = {}  # newest placement version (GET .../latest, no query)
        self.aggs: dict[str, _Agg] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self._load()

    # ---- schema ----------------------------------------------------------------------------
    def _migrate(self) -> None:
        v = self.db.execute("PRAGMA user_version").fetchone()[0]
        if v > SCHEMA_VERSION:
            raise InputError(self.root / DB_NAME, "schema", f"version {v} is newer than this "
                             f"moeplace understands ({SCHEMA_VERSION})", "upgrade moeplace")
        if v == SCHEMA_VERSION:
            return
        with self.tx():
            for stmt in filter(str.strip, """
            CREATE TABLE IF NOT EXISTS deployments (
                id TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL,
                current_version INTEGER);
            CREATE TABLE IF NOT EXISTS batches (
                deployment TEXT NOT NULL, batch_id TEXT NOT NULL, digest TEXT NOT NULL,
                window INTEGER NOT NULL, tokens INTEGER NOT NULL, file TEXT,
                created REAL NOT NULL, PRIMARY KEY (deployment, batch_id));
            CREATE INDEX IF NOT EXISTS batches_window ON batches (deployment, window);
            CREATE TABLE IF NOT EXISTS placements (
                deployment TEXT NOT NULL, version INTEGER NOT NULL, job TEXT,
                created REAL NOT NULL, report TEXT NOT NULL, PRIMARY KEY (deployment, version));
            CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, deployment TEXT NOT NULL, state TEXT NOT NULL,
                params TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
                error TEXT, version INTEGER);
            """.split(";")):
                self.db.execute(stmt)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read on this thread's own connection: it sees every committed write and does not
        wait for the writer's lock (an upload's commit fsync) in WAL mode."""
        db = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / DB_NAME, isolation_level=None, timeout=30)
            db.row_factory = sqlite3.Row
            self._readers.db = db
            self._all_readers.append(db)
        return db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.db.close()
            for db in self._all_readers:
                with contextlib.suppress(sqlite3.Error):
                    db.close()

    # ---- start-up ----------------------------------------------------------------------------
    def _load(self) -> None:
        """Rebuild the in-memory sums from committed rows; remove files no row references."""
        for r in self.query("SELECT id, spec FROM deployments"):
            self.specs[r["id"]] = json.loads(r["spec"])
            self.aggs[r["id"]] = _Agg()
        for r in self.query("SELECT deployment, MAX(version) AS v FROM placements "
                            "GROUP BY deployment"):
            self.latest[r["deployment"]] = int(r["v"])
        referenced: set[str] = set()
        for r in self.query("SELECT deployment, window, tokens, file FROM batches "
                            "WHERE file IS NOT NULL ORDER BY deployment, window"):
            referenced.add(r["file"])
            referenced.add(str(Path(r["file"]).with_suffix(".parquet")))  # its trace shard, if any
            try:
                with np.load(self.root / r["file"], allow_pickle=False) as z:
                    load = z["load"].astype(np.int64)
                    has_tr = "transitions" in z.files
            except (OSError, ValueError, KeyError) as exc:
                # Committed uploads are never removed by the service: refuse to start rather than
                # serve totals that silently miss an acknowledged upload.
                raise InputError(self.root / r["file"], "file", f"an acknowledged upload of "
                                 f"deployment {r['deployment']!r} cannot be read ({exc})",
                                 "restore the data directory from a backup") from None
            self._add_to_window(r["deployment"], r["window"], int(r["tokens"]), load, has_tr)
        stats_dir = self.root / "stats"
        if stats_dir.is_dir():
            for p in sorted(stats_dir.rglob("*"), reverse=True):
                rel = str(p.relative_to(self.root))
                if p.is_file() and rel not in referenced:
                    p.unlink()  # an upload that crashed before its commit: never acknowledged
                elif p.is_dir() and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_dir():
                    with contextlib.suppress(OSError):
                        p.rmdir()  # only when empty
        self.expire()

    # ---- deployments ------------------------------------------------------------------------
    def create_deployment(self, spec: dict[str, Any]) -> dict[str, Any]:
        check_spec(spec)
        dep = spec["name"]
        if not ID_RE.fullmatch(dep):
            raise InputError("deployment", "name", f"{dep!r:.80} is not 1-64 of A-Z a-z 0-9 . _ - "
                             "starting with a letter or digit", "the name becomes the id")
        L, N = spec["num_layers"], spec["num_experts"]
        check_memory(8 * L * N * (self.policy.retain_windows + 2),
                     f"load windows for {L} layers x {N} experts", "deployment", "num_experts")
        now = self.clock()
        try:
            with self.tx() as db:
                db.execute("INSERT INTO deployments (id, spec, created) VALUES (?, ?, ?)",
                           (dep, json.dumps(spec), now))
        except sqlite3.IntegrityError:
            raise Conflict(f"deployment {dep!r} exists; choose another name") from None
        self.specs[dep] = spec
        self.aggs[dep] = _Agg()
        return self.deployment(dep)

    def spec(self, dep: str) -> dict[str, Any]:
        try:
            return self.specs[dep]
        except KeyError:
            raise NotFound(f"no deployment {dep!r:.80}") from None

    def deployment(self, dep: str) -> dict[str, Any]:
        spec = self.spec(dep)
        rows = self.query("SELECT created, current_version FROM deployments WHERE id = ?", (dep,))
        return {"id": dep, **spec, "created": rows[0]["created"],
                "current_version": rows[0]["current_version"],
                "latest_version": self.latest.get(dep)}

    def deployments(self) -> list[dict[str, Any]]:
        return [self.deployment(d) for d in sorted(self.specs)]

    def meta(self, dep: str) -> TraceMeta:
        s = self.spec(dep)
        return TraceMeta(num_experts=s["num_experts"], top_k=s["top_k"],
                         moe_layer_ids=tuple(s["moe_layer_ids"]), model=s.get("model") or "",
                         num_hidden_layers=s.get("num_hidden_layers"), source=f"deployment {dep}")

    # ---- statistics ---------------------------------------------------------------------------
    def window_of(self, t: float) -> int:
        return int(t // self.policy.window_seconds)

    def add_batch(self, dep: str, batch_id: str, body: bytes) -> dict[str, Any]:
        """Validate one statistics upload, store it durably, count it once per ``batch_id``."""
        spec = self.spec(dep)
        if not batch_id or len(batch_id) > MAX_BATCH_ID or not batch_id.isprintable():
            raise InputError("upload", "batch_id", "must be 1-200 printable characters",
                             "send ?batch_id=<a unique id per batch, reused on retry>")
        digest = hashlib.sha256(body).hexdigest()
        dup = self._duplicate(dep, batch_id, digest)
        if dup is not None:
            return dup
        window = self.window_of(self.clock())
        rel = f"stats/{dep}/{window}/{uuid.uuid4().hex}.npz"
        final = self.root / rel
        # Written straight to its unique final name, not through atomic_path's temporary
        # directory (its mkdtemp + rmdir doubled the cost of an upload): the batches row, not
        # the file name, is what commits an upload, and a file without a row (a crash or a
        # refusal half-way) is deleted here or at the next start, never counted.
        src = f"upload {batch_id!r:.60}"
        self._ensure_dir(final.parent)
        # A Parquet trace shard is kept beside its statistics (``<uuid>.parquet``): solves
        # simulate step times on it. Other uploads are the statistics file itself.
        shard = final.with_suffix(".parquet") if body[:4] == b"PAR1" else None
        first = shard or final
        try:
            with open(first, "xb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            stats, raw = parse_stats(first, src, spec)
            check_shape(stats, spec, src)
            if not raw:  # a shard or a dump: store its statistics, which start-up re-reads
                stats.save(final)
                with open(final, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(final.parent)
        except BaseException:
            final.unlink(missing_ok=True)
            if shard is not None:
                shard.unlink(missing_ok=True)
            raise
        tokens = int(stats.num_tokens)
        try:
            with self.lock:  # commit and in-memory sum in one critical section, in commit order
                with self.tx() as db:
                    db.execute("INSERT INTO batches (deployment, batch_id, digest, window, "
                               "tokens, file, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (dep, batch_id, digest, window, tokens, rel, self.clock()))
                self._add_to_window(dep, window, tokens, stats.load,
                                    stats.transitions is not None)
        except sqlite3.IntegrityError:
            final.unlink(missing_ok=True)  # a concurrent retry of the same batch won the race
            dup = self._duplicate(dep, batch_id, digest)
            assert dup is not None
            return dup
        self.expire()
        return {"batch_id": batch_id, "counted": True, "duplicate": False, "tokens": tokens,
                "window": window}

    def _ensure_dir(self, d: Path) -> None:
        """Create a window directory once, durably (its entry in the parent is fsynced)."""
        if d.is_dir():
            return
        d.mkdir(parents=True, exist_ok=True)
        _fsync_dir(d.parent)
        _fsync_dir(d.parent.parent)

    def _duplicate(self, dep: str, batch_id: str, digest: str) -> dict[str, Any] | None:
        rows = self.query("SELECT digest, tokens, window FROM batches WHERE deployment = ? AND "
                          "batch_id = ?", (dep, batch_id))
        if not rows:
            return None
        if rows[0]["digest"] != digest:
            raise Conflict(f"batch {batch_id!r:.60} was already uploaded with other contents; "
                           "use a new batch_id for new statistics")
        return {"batch_id": batch_id, "counted": False, "duplicate": True,
                "tokens": int(rows[0]["tokens"]), "window": int(rows[0]["window"])}

    def _add_to_window(self, dep: str, window: int, tokens: int, load: np.ndarray,
                       transitions: bool) -> None:
        with self.lock:
            agg = self.aggs.setdefault(dep, _Agg())
            w = agg.windows.get(window)
            if w is None:
                agg.windows[window] = _Window(tokens, 1, load.astype(np.int64, copy=True),
                                              transitions)
            else:
                w.tokens += tokens
                w.batches += 1
                w.load += load
                w.transitions = w.transitions and transitions

    def expire(self) -> None:
        """Drop windows older than the newest ``retain_windows`` (by the clock, not the data)."""
        cutoff = self.window_of(self.clock()) - self.policy.retain_windows + 1
        with self.lock:
            old = [(d, w) for d, a in self.aggs.items() for w in a.windows if w < cutoff]
            if not old:
                return
            rows = self.query("SELECT file FROM batches WHERE window < ? AND file IS NOT NULL",
                              (cutoff,))
            with self.tx() as db:
                db.execute("UPDATE batches SET file = NULL WHERE window < ?", (cutoff,))
            for d, w in old:
                del self.aggs[d].windows[w]
        for r in rows:  # after the commit: a crash here leaves orphans, removed at next start
            (self.root / r["file"]).unlink(missing_ok=True)
            (self.root / r["file"]).with_suffix(".parquet").unlink(missing_ok=True)
        for d, w in old:
            shutil.rmtree(self.root / "stats" / d / str(w), ignore_errors=True)

    def stats_summary(self, dep: str) -> dict[str, Any]:
        """Exact totals over the retained windows, each window's totals, and the recent set."""
        spec = self.spec(dep)
        self.expire()
        with self.lock:
            wins = sorted(self.aggs[dep].windows.items())
            load = np.zeros((spec["num_layers"], spec["num_experts"]), np.int64)
            tokens = 0
            out = []
            for w, win in wins:
                load += win.load
                tokens += win.tokens
                out.append({"window": w, "start": w * self.policy.window_seconds,
                            "end": (w + 1) * self.policy.window_seconds, "tokens": win.tokens,
                            "batches": win.batches})
        recent = [w for w, _ in wins][-self.policy.recent_windows:]
        return {"deployment": dep, "tokens": tokens, "load": load.tolist(), "windows": out,
                "recent_windows": recent, "policy": self.policy.as_dict()}

    def window_loads(self, dep: str) -> list[tuple[int, int, int, np.ndarray]]:
        """``(window, tokens, batches, load copy)`` of each retained window, oldest first."""
        self.spec(dep)
        self.expire()
        with self.lock:
            return [(w, x.tokens, x.batches, x.load.copy())
                    for w, x in sorted(self.aggs[dep].windows.items())]

    def recent_load(self, dep: str) -> RoutingStats | None:
        """Load-only statistics of the recent windows (what drift scores on); None if empty."""
        spec = self.spec(dep)
        self.expire()
        with self.lock:
            wins = sorted(self.aggs[dep].windows.items())[-self.policy.recent_windows:]
            if not wins:
                return None
            load = np.zeros((spec["num_layers"], spec["num_experts"]), np.int64)
            tokens = 0
            for _, win in wins:
                load += win.load
                tokens += win.tokens
        return RoutingStats(self.meta(dep), tokens, load)

    def recent_files(self, dep: str) -> list[Path]:
        """The upload files of the recent windows (a solve sums them with transitions)."""
        self.spec(dep)
        with self.lock:
            wins = sorted(self.aggs[dep].windows)[-self.policy.recent_windows:]
            if not wins:
                return []
            rows = self.query("SELECT file FROM batches WHERE deployment = ? AND window >= ? AND "
                              "file IS NOT NULL ORDER BY created", (dep, wins[0]))
        return [self.root / r["file"] for r in rows]

    def totals(self) -> dict[str, dict[str, int]]:
        """Accepted uploads and tokens per deployment since creation (expired ones included)."""
        rows = self.query("SELECT deployment, COUNT(*) AS n, SUM(tokens) AS t FROM batches "
                          "GROUP BY deployment")
        return {r["deployment"]: {"uploads": int(r["n"]), "tokens": int(r["t"] or 0)} for r in rows}

    # ---- placements ---------------------------------------------------------------------------
    def placement_path(self, dep: str, version: int) -> Path:
        return self.root / "placements" / dep / f"{version}.json"

    def add_placement(self, dep: str, placement_json: dict[str, Any], report: dict[str, Any],
                      job: str | None) -> int:
        """Store a new placement version (file first, then its row: the row commits it)."""
        with self.lock:
            v = (self.query("SELECT MAX(version) AS v FROM placements WHERE deployment = ?",
                            (dep,))[0]["v"] or 0) + 1
            path = self.placement_path(dep, v)
            placement_json = {**placement_json,
                              "info": {**placement_json.get("info", {}), "version": v,
                                       "deployment": dep, "report": report}}
            with atomic_path(path) as tmp:
                with open(tmp, "w") as fh:
                    fh.write(json.dumps(placement_json, separators=(",", ":")) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            _fsync_dir(path.parent)
            with self.tx() as db:
                db.execute("INSERT INTO placements (deployment, version, job, created, report) "
                           "VALUES (?, ?, ?, ?, ?)", (dep, v, job, self.clock(), json.dumps(report)))
            self.latest[dep] = v
        return v

    def resolve_version(self, dep: str, version: str) -> int:
        self.spec(dep)
        if version in ("latest", "current"):
            if version == "latest":
                v = self.latest.get(dep)
            else:
                v = self.query("SELECT current_version AS v FROM deployments WHERE id = ?",
                               (dep,))[0]["v"]
            if v is None:
                raise NotFound(f"deployment {dep!r} has no {version} placement yet"
                               + (" (POST .../solve)" if version == "latest" else
                                  " (POST .../placements/{version}/current)"))
            return int(v)
        if not version.isdigit() or len(version) > 12:
            raise InputError("placements", "version", f"{version[:40]!r} is not a version",
                             "use a version number, latest or current")
        v = int(version)
        if not self.query("SELECT 1 FROM placements WHERE deployment = ? AND version = ?",
                          (dep, v)):
            raise NotFound(f"deployment {dep!r} has no placement version {v}")
        return v

    def placement_record(self, dep: str, version: int) -> dict[str, Any]:
        r = self.query("SELECT version, job, created, report FROM placements WHERE deployment = ? "
                       "AND version = ?", (dep, version))[0]
        return {"version": r["version"], "job": r["job"], "created": r["created"],
                "report": json.loads(r["report"])}

    def placements(self, dep: str) -> list[dict[str, Any]]:
        self.spec(dep)
        rows = self.query("SELECT version FROM placements WHERE deployment = ? ORDER BY version",
                          (dep,))
        return [self.placement_record(dep, r["version"]) for r in rows]

    def set_current(self, dep: str, version: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE deployments SET current_version = ? WHERE id = ?", (version, dep))

    def current_version(self, dep: str) -> int | None:
        self.spec(dep)
        v = self.query("SELECT current_version AS v FROM deployments WHERE id = ?", (dep,))[0]["v"]
        return None if v is None else int(v)


def parse_stats(path: Path, source: str, spec: dict[str, Any] | None = None
                ) -> tuple[RoutingStats, bool]:
    """A statistics upload: a ``moeplace stats`` .npz, a Parquet trace shard, or an SGLang
    expert-distribution recorder dump (torch ``.pt``, needs torch); the flag says whether the
    file is already the statistics .npz (the others are stored as their statistics)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(b"PK"):
        if spec is not None and _is_torch_zip(path):
            return _sglang_dump(path, source, spec), False
        if spec is not None:
            _precheck_npz(path, source, spec)
        return RoutingStats.load_npz(path), True
    if magic == b"PAR1":
        from moeplace.traces import compute_stats

        return compute_stats(path, coactivation=False, show_progress=False), False
    raise InputError(source, "body", "is not a moeplace stats .npz, a Parquet trace shard or an "
                     "SGLang expert-distribution dump",
                     "send the file moeplace stats --out writes, or one of the others")


def _precheck_npz(path: Path, source: str, spec: dict[str, Any]) -> None:
    """Refuse statistics of another shape from their header alone, before ``load_npz`` reads
    (and may allocate up to the memory cap for) arrays the deployment would refuse anyway.
    Anything unusual is left to ``load_npz``, which reports it."""
    from moeplace._validate import NpzMembers

    with NpzMembers(path) as z:
        if "header" not in z:
            return
        hshape, hdtype = z.header("header")
        if hshape != () or hdtype.kind not in "US" or hdtype.itemsize > 1 << 20:
            return
        try:
            header = json.loads(str(z.read("header")))
            meta = TraceMeta.from_dict(header["meta"], source)
        except (ValueError, KeyError, TypeError):
            return
    if (meta.num_layers, meta.num_experts) != (spec["num_layers"], spec["num_experts"]):
        raise InputError(source, "header.meta", f"{meta.num_layers} layers x {meta.num_experts} "
                         f"experts, but deployment {spec['name']!r} has {spec['num_layers']} x "
                         f"{spec['num_experts']}", "upload statistics of the deployment's model")


def _is_torch_zip(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # load_npz gives the one-line reason


def _sglang_dump(path: Path, source: str, spec: dict[str, Any]) -> RoutingStats:
    """An SGLang recorder dump in the deployment's shape. ``stat`` dumps state neither top-k nor
    tokens: with the deployment's top-k, every MoE layer must count the same multiple of it
    (each token adds top-k to each layer), which gives the tokens exactly; else 422."""
    from dataclasses import replace

    from moeplace.traces import Trace, compute_stats
    from moeplace.traces.importers.sglang import read_sglang_dump

    got = read_sglang_dump(path, num_experts=spec["num_experts"],
                           moe_layer_ids=list(spec["moe_layer_ids"]), model=spec.get("model", ""))
    if isinstance(got, Trace):
        return compute_stats(got, coactivation=False, show_progress=False)
    k = spec["top_k"]
    sums = got.load.sum(axis=1)
    if len(set(sums.tolist())) != 1 or int(sums[0]) % k:
        raise InputError(source, "logical_count", f"MoE layers count {int(sums.min())}.."
                         f"{int(sums.max())} assignments, not one multiple of top_k={k}",
                         "send the stat dump of this deployment unmodified")
    extra = {key: v for key, v in got.meta.extra.items() if key != "top_k_unknown"}
    meta = replace(got.meta, top_k=k, extra=extra, source=source)
    return RoutingStats(meta, int(sums[0]) // k, got.load)


def check_shape(stats: RoutingStats, spec: dict[str, Any], source: str) -> None:
    """The upload must describe the deployment's model: layers, experts, top-k, layer ids."""
    want = (spec["num_layers"], spec["num_experts"])
    if (stats.num_layers, stats.num_experts) != want:
        raise InputError(source, "load", f"{stats.num_layers} layers x {stats.num_experts} experts, "
                         f"but deployment {spec['name']!r} has {want[0]} x {want[1]}",
                         "upload statistics of the deployment's model")
    if stats.meta.top_k != spec["top_k"]:
        raise InputError(source, "meta.top_k", f"{stats.meta.top_k}, deployment has "
                         f"{spec['top_k']}", "upload statistics of the deployment's model")
    if list(stats.meta.moe_layer_ids) != list(spec["moe_layer_ids"]):
        raise InputError(source, "meta.moe_layer_ids", "differ from the deployment's",
                         "upload statistics of the deployment's model")

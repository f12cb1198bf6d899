"""Solve jobs: each runs in its own worker process, under its time limit, off the API's threads.

A dispatcher thread starts queued jobs (``max_workers`` at a time), reaps finished ones and
kills any that overrun ``time_limit + grace``. The worker sums the recent statistics files,
calls ``moeplace.solvers.solve_with_report`` and writes its result atomically; the dispatcher
stores the placement as a new version and marks the job done. States:
``queued -> running -> done | failed | cancelled``.

After a crash of the service, jobs that were running are marked ``failed`` with the reason
(their worker died with the service: it watches its parent and exits), and queued jobs run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeplace.service.store import Conflict, NotFound, Store

STATES = ("queued", "running", "done", "failed", "cancelled")
# Loading statistics, bounds and saving come on top of the solver's own limit.
GRACE_S = 30.0
MAX_TIME_LIMIT = 24 * 3600.0


def _watch_parent(parent: int) -> None:
    """Exit when the service that started this worker is gone (SIGKILL leaves no one to stop us)."""
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.5)


def run_worker(job_dir: str, parent: int) -> None:
    """Worker process body: read ``input.json``, solve, write ``result.json`` or ``error.json``."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    # Solves are background work: on a busy machine the API's requests go first.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    d = Path(job_dir)
    try:
        spec = json.loads((d / "input.json").read_text())
        result = _solve(spec)
        out = d / "result.json"
    except Exception as exc:  # reported to the API as the job's one-line reason
        from moeplace.errors import MoeplaceError

        msg = str(exc) if isinstance(exc, MoeplaceError) else f"{type(exc).__name__}: {exc}"
        result = {"error": " ".join(msg.split())[:2000]}
        out = d / "error.json"
    from moeplace._fileio import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result))


def _solve(spec: dict[str, Any]) -> dict[str, Any]:
    from moeplace.placement import Placement
    from moeplace.solvers import Cluster, Weights, evaluate_stats, migration, solve_with_report
    from moeplace.traces import RoutingStats

    files = spec["files"]
    stats: RoutingStats | None = None
    for f in files:
        s = RoutingStats.load_npz(f)
        stats = s if stats is None else stats + s
    assert stats is not None
    c = spec["cluster"]
    cluster = Cluster(c["num_gpus"], c["num_nodes"], c["replicas"])
    current = Placement.load(spec["current"]) if spec.get("current") else None
    weights = Weights.parse(spec.get("weights"))
    use_current = current if spec.get("use_current") else None
    plc, rep = solve_with_report(stats, cluster, method=spec["method"], weights=weights,
                                 time_limit=spec["time_limit"], current=use_current,
                                 seed=spec.get("seed", 0), engine=spec.get("engine", "sglang"))
    report = rep.as_dict()
    report["simulation"] = _simulate(spec, plc, current, stats)
    report["tokens"] = stats.num_tokens
    report["batches"] = len(files)
    report["metrics"] = evaluate_stats(stats, plc)
    if current is not None:
        try:
            report["current_metrics"] = evaluate_stats(stats, current)
            report["migration_from_current"] = {
                "version": spec.get("current_version"),
                **migration(plc, current, spec.get("expert_bytes") or 0)}
        except Exception as exc:  # a current placement of another cluster: say so, keep the result
            report["migration_from_current"] = {"error": " ".join(str(exc).split())}
    return {"placement": plc.to_dict(), "report": report}


def _start_worker(job_dir: Path) -> subprocess.Popen[bytes]:
    """A fresh interpreter (not fork: the server has threads; not multiprocessing's spawn: it
    re-imports the caller's ``__main__``), with this moeplace first on its path."""
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    log = open(job_dir / "worker.log", "wb")  # the child holds its own descriptor
    try:
        return subprocess.Popen([sys.executable, "-m", "moeplace.service.jobs", str(job_dir),
                                 str(os.getpid())], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, close_fds=True)
    finally:
        log.close()


def _simulate(spec: dict[str, Any], plc: Any, current: Any, stats: Any) -> dict[str, Any]:
    """Simulated step-time speedup of the new placement over the current one (else over EPLB)
    on the newest uploaded trace shard; the reason when it cannot be simulated. The simulator
    needs per-token routing, which statistics alone do not carry."""
    from moeplace.solvers.simulator import Hardware, ModelShape, guess_shape, speedup

    shards = [f for f in spec.get("shards", []) if Path(f).exists()]
    if not shards:
        return {"speedup": None, "reason": "no Parquet trace shard in the recent windows (the "
                "simulator needs per-token routing; statistics carry counts only)"}
    name = spec.get("model_shape") or guess_shape(spec.get("model") or "")
    if name is None:
        return {"speedup": None, "reason": "model shape unknown: set the deployment's model_shape"}
    from moeplace.solvers import Cluster
    from moeplace.solvers.solve import baseline
    from moeplace.traces import read_trace

    trace = read_trace(shards[-1])
    if current is not None and current.num_gpus == plc.num_gpus:
        base, base_name = current, "current"
    else:
        # The stacks' EPLB with the model's groups, as every other report compares against.
        base = baseline("eplb", stats, Cluster(plc.num_gpus, plc.num_nodes, plc.num_replicas))
        base_name = "eplb"
    hw = Hardware.load(spec.get("hardware") or "h100-nvlink")
    return {"speedup": speedup(trace, plc, base, hw, ModelShape.named(name)),
            "over": base_name, "model_shape": name, "hardware": hw.name,
            "tokens": trace.num_tokens, "shard": Path(shards[-1]).name}


class JobManager:
    """Queue, run, time-limit and cancel solve jobs; state lives in the store's ``jobs`` table."""

    def __init__(self, store: Store, max_workers: int = 1, grace_s: float = GRACE_S,
                 on_finish: Callable[[str, str, float], None] | None = None,
                 resolve_every: float | None = None, resolve_time_limit: float = 60.0) -> None:
        self.store = store
        # Scheduled re-solves: every ``resolve_every`` s, each deployment with uploads newer than
        # its newest job (and no job queued or running) gets a solve of its recent windows.
        self.resolve_every = resolve_every
        self.resolve_time_limit = resolve_time_limit
        self._online_seen: dict[str, Any] = {}  # deployment -> newest upload the policy has seen
        self.next_resolve = time.monotonic() + (resolve_every or 0)
        self.max_workers = max_workers
        self.grace_s = grace_s
        self.on_finish = on_finish
        # job -> (worker process, start, deadline), monotonic clock
        self.procs: dict[str, tuple[subprocess.Popen[bytes], float, float]] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.jobs_dir = store.root / "jobs"
        self._recover()
        self.thread = threading.Thread(target=self._loop, name="moeplace-jobs", daemon=True)
        self.thread.start()

    # ---- lifecycle ----------------------------------------------------------------------------
    def _recover(self) -> None:
        now = self.store.clock()
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE state = "
                       "'running'", (now, "interrupted: the service stopped while this job ran; "
                                     "submit the solve again"))
        # Directories of finished jobs are kept only while they run.
        if self.jobs_dir.is_dir():
            live = {r["id"] for r in self.store.query("SELECT id FROM jobs WHERE state = 'queued'")}
            for p in self.jobs_dir.iterdir():
                if p.name not in live:
                    shutil.rmtree(p, ignore_errors=True)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)
        for job, (proc, _, _) in list(self.procs.items()):
            proc.kill()
            proc.wait(timeout=5)
            self._finish(job, "failed", "interrupted: the service stopped while this job ran; "
                         "submit the solve again")

    # ---- API ----------------------------------------------------------------------------------
    def submit(self, dep: str, params: dict[str, Any]) -> dict[str, Any]:
        """Queue a solve of ``dep``'s recent statistics; returns the job record."""
        from moeplace.errors import InputError

        spec = self.store.spec(dep)
        if not self.store.recent_files(dep):
            raise Conflict(f"deployment {dep!r} has no statistics in its recent windows; upload "
                           "statistics first")
        tl = params["time_limit"]
        if not 0 < tl <= MAX_TIME_LIMIT:
            raise InputError("solve", "time_limit", f"{tl} is not in (0, {MAX_TIME_LIMIT:g}]",
                             "give seconds > 0")
        c = dict(spec["cluster"])
        if params.get("replicas") is not None:
            c["replicas"] = params["replicas"]
            from moeplace.service.store import check_spec

            check_spec({**spec, "cluster": c})
        if params.get("weights"):
            from moeplace.solvers import Weights

            Weights.parse(params["weights"])  # one-line 4xx now, not a failed job later
        job = "j_" + uuid.uuid4().hex[:16]
        full = {**params, "cluster": c}
        with self.store.tx() as db:
            db.execute("INSERT INTO jobs (id, deployment, state, params, created) VALUES "
                       "(?, ?, 'queued', ?, ?)", (job, dep, json.dumps(full), self.store.clock()))
        self.wake.set()
        return self.get(job)

    def get(self, job: str) -> dict[str, Any]:
        rows = self.store.query("SELECT * FROM jobs WHERE id = ?", (job,))
        if not rows:
            raise NotFound(f"no job {job!r:.80}")
        r = rows[0]
        out: dict[str, Any] = {"job": r["id"], "deployment": r["deployment"], "state": r["state"],
                               "params": json.loads(r["params"]), "created": r["created"],
                               "started": r["started"], "finished": r["finished"],
                               "error": r["error"], "version": r["version"],
                               "placement": None, "report": None}
        tl = out["params"]["time_limit"]
        if r["state"] == "running" and r["started"] is not None:
            elapsed = self.store.clock() - r["started"]
            out["progress"] = {"fraction": min(0.99, elapsed / tl), "elapsed_s": elapsed,
                               "time_limit_s": tl}
        else:
            out["progress"] = {"fraction": 1.0 if r["state"] == "done" else 0.0,
                               "time_limit_s": tl}
        if r["state"] == "done" and r["version"] is not None:
            out["placement"] = (f"/v1/deployments/{r['deployment']}/placements/{r['version']}")
            out["report"] = self.store.placement_record(r["deployment"], r["version"])["report"]
        return out

    def cancel(self, job: str) -> dict[str, Any]:
        cur = self.get(job)
        if cur["state"] in ("done", "failed", "cancelled"):
            return cur
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = ? WHERE id = ? "
                       "AND state IN ('queued', 'running')",
                       (self.store.clock(), "cancelled by request", job))
        entry = self.procs.get(job)
        if entry is not None:
            entry[0].kill()
        self.wake.set()
        return self.get(job)

    def counts(self) -> dict[str, int]:
        rows = self.store.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        out = dict.fromkeys(STATES, 0)
        out.update({r["state"]: int(r["n"]) for r in rows})
        return out

    # ---- dispatcher -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            try:
                self._reap()
                if self.resolve_every and time.monotonic() >= self.next_resolve:
                    self.next_resolve = time.monotonic() + self.resolve_every
                    self._schedule()
                self._start_queued()
            except Exception:  # never let the dispatcher die; the next tick retries
                import traceback

                traceback.print_exc()
            self.wake.wait(0.2)
            self.wake.clear()

    def _schedule(self) -> list[str]:
        """Queue a re-solve for every deployment with new uploads; returns the jobs queued."""
        from moeplace.errors import MoeplaceError

        queued = []
        for dep in list(self.store.specs):
            up = self.store.query("SELECT MAX(created) AS t FROM batches WHERE deployment = ?",
                                  (dep,))[0]["t"]
            last = self.store.query("SELECT MAX(created) AS t, SUM(state IN ('queued', 'running'))"
                                    " AS busy FROM jobs WHERE deployment = ?", (dep,))[0]
            if up is None or (last["t"] is not None and (up <= last["t"] or last["busy"])):
                continue
            if self.store.current_version(dep) is not None:
                # a deployment that runs a placement: the engines' online policy decides from it
                if self._online_seen.get(dep) != up:
                    self._online_seen[dep] = up
                    try:
                        self._online_resolve(dep)
                    except MoeplaceError:
                        pass
                continue
            try:
                j = self.submit(dep, {"time_limit": self.resolve_time_limit, "method": "auto",
                                      "replicas": None, "current": True, "weights": None,
                                      "seed": 0, "scheduled": True})
            except MoeplaceError:  # e.g. its recent windows expired: nothing to solve
                continue
            queued.append(j["job"])
        return queued

    def _online_resolve(self, dep: str) -> int | None:
        """Run the online policy on ``dep``'s recent windows from its current placement; store
        its map as a new version (``report.method == "online"``) only when it rebalances."""
        from moeplace.placement import Placement
        from moeplace.service.online import online_decision

        v = self.store.current_version(dep)
        wins = self.store.window_loads(dep)[-self.store.policy.recent_windows:]
        if v is None or not wins:
            return None
        cur = Placement.load(self.store.placement_path(dep, v))
        answer, plc = online_decision([w[3] for w in wins], cur, self.store.spec(dep))
        if not answer["rebalance"]:
            return None
        report = {"method": "online", "status": "ok", "seconds": answer["cpu_s"], "scheduled": True,
                  "tokens": int(sum(w[1] for w in wins)), "batches": int(sum(w[2] for w in wins)),
                  "from_version": v, "online": answer,
                  "migration_from_current": {"copies_transferred": answer["moved_copies"]}}
        d = plc.to_dict()
        return self.store.add_placement(dep, d, report, None)

    def _start_queued(self) -> None:
        while len(self.procs) < self.max_workers:
            rows = self.store.query("SELECT id, deployment, params FROM jobs WHERE state = 'queued' "
                                    "ORDER BY created LIMIT 1")
            if not rows:
                return
            job, dep, params = rows[0]["id"], rows[0]["deployment"], json.loads(rows[0]["params"])
            spec = self.store.spec(dep)
            files = [str(p) for p in self.store.recent_files(dep)]
            cur_v = self.store.current_version(dep)
            d = self.jobs_dir / job
            d.mkdir(parents=True, exist_ok=True)
            # Inputs are hard-linked so that expiry during the solve cannot pull them away.
            linked, shards = [], []
            for i, f in enumerate(files):
                for src, dst, out in ((Path(f), d / f"in{i}.npz", linked),
                                      (Path(f).with_suffix(".parquet"), d / f"in{i}.parquet",
                                       shards)):
                    if not src.exists():
                        continue  # only trace-shard uploads have a .parquet
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                    out.append(str(dst))
            inp = {"files": linked, "cluster": params["cluster"], "method": params["method"],
                   "time_limit": params["time_limit"], "weights": params.get("weights"),
                   "seed": params.get("seed", 0), "engine": params.get("engine", "sglang"),
                   "use_current": bool(params.get("current")),
                   "current": (str(self.store.placement_path(dep, cur_v)) if cur_v else None),
                   "current_version": cur_v, "expert_bytes": spec.get("expert_bytes"),
                   "shards": shards, "model": spec.get("model"),
                   "model_shape": spec.get("model_shape"), "hardware": spec.get("hardware")}
            (d / "input.json").write_text(json.dumps(inp))
            now = self.store.clock()
            with self.store.tx() as db:
                n = db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ? AND "
                               "state = 'queued'", (now, job)).rowcount
            if not n:
                continue  # cancelled meanwhile
            proc = _start_worker(d)
            self.procs[job] = (proc, time.monotonic(),
                               time.monotonic() + params["time_limit"] + self.grace_s)
            # A cancel between the UPDATE above and this line found no process to kill: the
            # worker ran its whole solve (a 300 s limit: the test's reaper wait timed out).
            if self.store.query("SELECT state FROM jobs WHERE id = ?", (job,))[0]["state"] \
                    == "cancelled":
                proc.kill()

    def _reap(self) -> None:
        for job, (proc, t0, deadline) in list(self.procs.items()):
            if proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(timeout=5)
                    self._finish(job, "failed", "the solve overran its time limit and was stopped")
                continue
            d = self.jobs_dir / job
            state = self.get(job)["state"]
            if state == "cancelled":
                self._finish(job, "cancelled", None)
            elif (d / "result.json").exists():
                res = json.loads((d / "result.json").read_text())
                dep = self.get(job)["deployment"]
                res["report"]["wall_seconds"] = time.monotonic() - t0
                v = self.store.add_placement(dep, res["placement"], res["report"], job)
                self._finish(job, "done", None, v)
            elif (d / "error.json").exists():
                self._finish(job, "failed", json.loads((d / "error.json").read_text())["error"])
            else:
                tail = ""
                with contextlib.suppress(OSError, IndexError):
                    tail = ": " + (d / "worker.log").read_text(errors="replace").strip().splitlines()[-1]
                self._finish(job, "failed", f"the worker process exited with code {proc.returncode}"
                             f" and no result{tail[:500]}")

    def _finish(self, job: str, state: str, error: str | None, version: int | None = None) -> None:
        entry = self.procs.pop(job, None)
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET state = ?, finished = COALESCE(finished, ?), error = "
                       "COALESCE(?, error), version = ? WHERE id = ?",
                       (state, self.store.clock(), error, version, job))
        shutil.rmtree(self.jobs_dir / job, ignore_errors=True)
        if self.on_finish is not None and entry is not None:
            self.on_finish(job, state, time.monotonic() - entry[1])


if __name__ == "__main__":  # the worker process: python -m moeplace.service.jobs JOB_DIR PARENT_PID
    run_worker(sys.argv[1], int(sys.argv[2]))

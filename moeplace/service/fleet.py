"""Fleet scale on Ray: statistics summed over trace shards and search restarts run as Ray tasks.

Statistics add up exactly across shards (integer counts), so aggregation runs as one Ray task per
group of Parquet shards, each streaming its files through the same counting kernel as the
single-process path, and the partial counts are summed on the driver. Search restarts are
independent too: each seed is a task and the best placement wins (for the static engines' search,
per layer), ties to the lowest seed, so the result does not depend on where or in which order
tasks ran. Ray is an optional extra
(``pip install 'moeplace[ray]'``); nothing here imports it until asked to.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moeplace._progress import Progress
from moeplace.errors import InputError, MissingDependencyError
from moeplace.traces import RoutingStats, compute_stats
from moeplace.traces.store import TraceReader


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "--ray", "ray") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to a Ray cluster (``address``: ``host:port``, ``auto`` or ``ray://...``), or start
    a private local instance for ``local``; a local instance is shut down on exit, a cluster is
    only disconnected from."""
    ray = _ray()
    if ray.is_initialized():  # a caller (notebook, service) already connected: use it as is
        yield ray
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "configure_logging": False}
    if address == "local":
        kw["num_cpus"] = num_cpus or os.cpu_count() or 1
    else:
        _reachable(address)
        kw["address"] = address
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError("--ray", "address", f"cannot reach Ray at {address!r} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                         "give a running cluster's address, or 'local'") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``host:port`` nothing listens on; ``ray.init`` would retry for
    minutes. ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise InputError("--ray", "address", f"nothing answers at {address} ({exc})",
                         "start the cluster (ray start --head) or use --ray local") from None


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Parquet shard files named by ``sources``: files, directories of ``*.parquet``, or globs
    (quoted, so the shell leaves them); each file once, in a stable order."""
    files: list[Path] = []
    for src in sources:
        s = os.fspath(src)
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise InputError(s, "path", "directory holds no .parquet shards",
                                 "point at a trace directory, a file or a glob")
            files += found
        elif p.is_file():
            files.append(p)
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(x) for x in glob.glob(s, recursive=True) if Path(x).is_file())
            if not found:
                raise InputError(s, "path", "the pattern matches no files", "check the pattern")
            files += found
        else:
            raise InputError(s, "path", "no such file or directory", "check the path")
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _stats_of_files(paths: list[str], transitions: bool, coactivation: bool) -> RoutingStats:
    """One task's share: its shards streamed through the single-process kernel, summed."""
    total: RoutingStats | None = None
    for p in paths:
        part = compute_stats(TraceReader(p), transitions=transitions, coactivation=coactivation,
                             show_progress=False)
        total = part if total is None else total + part
    assert total is not None
    return total


def stats_on_ray(sources: Sequence[str | os.PathLike[str]], address: str = "local", *,
                 transitions: bool = True, coactivation: bool = True,
                 num_cpus: int | None = None, tasks_per_cpu: int = 4,
                 show_progress: bool | None = None) -> RoutingStats:
    """Statistics of all Parquet shards in ``sources``, counted by Ray tasks and summed.

    Integer-identical to ``compute_stats`` over the same shards in one process. Headers are
    validated on the driver first, so a bad shard fails before any task is scheduled.
    """
    files = expand_sources(sources)
    # Every header validated up front, keeping only the metadata (not thousands of open files);
    # another model's shards are refused before any task is scheduled.
    metas = [TraceReader(f).meta for f in files]
    for f, m in zip(files[1:], metas[1:], strict=True):
        metas[0].require_same_model(m, f, "aggregate shards")
    meta = metas[0].with_updates(source=",".join(map(str, sources))[:200])
    with ray_session(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per_task = max(1, math.ceil(len(files) / (cpus * tasks_per_cpu)))
        groups = [[str(f) for f in files[i:i + per_task]] for i in range(0, len(files), per_task)]
        task = ray.remote(num_cpus=1)(_stats_of_files)
        pending = [task.remote(g, transitions, coactivation) for g in groups]
        bar = Progress(len(files), "statistics (ray)", "shards", enabled=show_progress)
        sizes = {ref: len(g) for ref, g in zip(pending, groups, strict=True)}
        total: RoutingStats | None = None
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                part = ray.get(done[0])
                total = part if total is None else total + part
                bar.update(sizes[done[0]])
        except BaseException:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
    assert total is not None
    total.meta = meta
    return total


def _search_task(fn: Callable[..., Any], stats: RoutingStats, start: Any, seed: int,
                 kw: dict[str, Any]) -> Any:
    return fn(stats, start, seed=seed, **kw)


def restarts_on_ray(stats: RoutingStats, start: Any, restarts: int, seed: int,
                    address: str = "local", num_cpus: int | None = None,
                    fn: Callable[..., Any] | None = None, **kw: Any) -> list[Any]:
    """``restarts`` searches (``fn``, by default the cross-layer ``search``) from seeds
    ``seed, seed+1, ...`` as Ray tasks; the results in seed order (the caller keeps the best,
    ties to the lowest seed). With fewer CPUs in the cluster than restarts, each restart gets
    its wave's share of ``time_limit``, so all of them end within it."""
    if restarts < 1:
        raise InputError("--restarts", "value", f"{restarts} < 1", "give at least one restart")
    if fn is None:
        from moeplace.solvers.search import search as fn
    with ray_session(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if "time_limit" in kw:
            from moeplace.solvers.search_solver import restart_seconds

            kw = {**kw, "time_limit": restart_seconds(kw["time_limit"], restarts, cpus)}
        task = ray.remote(num_cpus=1)(_search_task)
        stats_ref = ray.put(stats)  # shipped once, shared by every task
        refs = [task.remote(fn, stats_ref, start, seed + i, kw) for i in range(restarts)]
        try:
            return list(ray.get(refs))
        except BaseException:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise


def ray_restart_runner(fn: Callable[..., Any], stats: RoutingStats, start: Any, restarts: int,
                       seed: int, kw: dict[str, Any]) -> list[Any]:
    """``solve_with_report(restart_runner=...)`` hook: the restarts as tasks on the Ray session
    the caller opened (``ray_session``)."""
    return restarts_on_ray(stats, start, restarts, seed, fn=fn, **kw)

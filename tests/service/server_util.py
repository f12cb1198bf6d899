"""A real ``moeplace serve`` subprocess on a free loopback port, and statistics to send it.

Network rule for every service test: traffic goes to 127.0.0.1 only, and every request loop is
bounded in count and in time.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import moeplace
from moeplace.traces import Trace, compute_stats
from tests.conftest import random_trace

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """``moeplace serve`` in a subprocess; ``kill()`` is SIGKILL, ``start()`` restarts it."""

    def __init__(self, data: Path, token: str | None = "t0ken-for-tests", port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.data, self.token, self.extra = data, token, extra
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 60.0) -> Server:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(moeplace.__file__).resolve().parents[1]), env.get("PYTHONPATH"))
            if p)
        env.pop("MOEPLACE_TOKEN", None)
        if self.token:
            env["MOEPLACE_TOKEN"] = self.token
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moeplace.cli", "serve", "--data", str(self.data), "--host",
                 HOST, "--port", str(self.port), *self.extra], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeplace serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"moeplace serve did not answer in {timeout} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)


def stats_batches(tmp: Path, n: int, L: int = 4, N: int = 16, k: int = 2, seed: int = 0,
                  tokens: tuple[int, int] = (50, 400)) -> tuple[list[bytes], list[np.ndarray],
                                                                list[int]]:
    """``n`` statistics files (bytes) of random traces, with each one's load counted
    independently (numpy bincount over the raw expert ids) and its token count."""
    rng = np.random.default_rng(seed)
    bodies, loads, toks = [], [], []
    for i in range(n):
        tr = random_trace(rng, int(rng.integers(*tokens)), L, N, k)
        # MoE layers 1..L of L + 1 hidden layers (layer 0 dense), as deployment() declares.
        tr = Trace(tr.experts, dataclasses.replace(tr.meta, moe_layer_ids=tuple(range(1, L + 1)),
                                                   num_hidden_layers=L + 1))
        p = tmp / f"batch{seed}_{i}.npz"
        compute_stats(tr, coactivation=False).save(p)
        bodies.append(p.read_bytes())
        e = tr.experts
        loads.append(np.stack([np.bincount(e[:, l, :].ravel(), minlength=N) for l in range(L)]))
        toks.append(tr.num_tokens)
    return bodies, loads, toks


def deployment(name: str, L: int = 4, N: int = 16, k: int = 2, gpus: int = 4, **kw: object
               ) -> dict[str, object]:
    return {"name": name, "num_layers": L, "num_experts": N, "top_k": k,
            "moe_layer_ids": list(range(1, L + 1)), "num_hidden_layers": L + 1,
            "cluster": {"num_gpus": gpus, "num_nodes": 1, "replicas": 0}, **kw}


# ---- load: concurrent uploaders in a child process, latency probes from this one -------------
DEEPSEEK_V3 = {"num_layers": 58, "num_experts": 256, "top_k": 8,
               "moe_layer_ids": list(range(3, 61)), "num_hidden_layers": 61}


def load_only_bodies(tmp: Path, n: int, shape: dict[str, object] = DEEPSEEK_V3,
                     seed: int = 0) -> tuple[list[Path], list[int]]:
    """``n`` load-only statistics files of ``shape`` (what an SGLang ``stat`` dump carries)."""
    from moeplace.traces import RoutingStats, TraceMeta

    rng = np.random.default_rng(seed)
    L, N, k = int(shape["num_layers"]), int(shape["num_experts"]), int(shape["top_k"])
    meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(shape["moe_layer_ids"]),
                     num_hidden_layers=shape.get("num_hidden_layers"), model="load-test")
    paths, toks = [], []
    skew = rng.dirichlet(np.full(N, 0.5), size=L)
    for i in range(n):
        T = int(rng.integers(1000, 5000))
        load = np.stack([rng.multinomial(T * k, skew[l]) for l in range(L)]).astype(np.int64)
        p = tmp / f"load{seed}_{i}.npz"
        RoutingStats(meta, T, load).save(p)
        paths.append(p)
        toks.append(T)
    return paths, toks


def _uploader(url: str, token: str | None, dep: str, paths: list[str], toks: list[int],
              seconds: float, clients: int, out: str, prefix: str) -> None:
    """Child process: ``clients`` concurrent upload loops for ``seconds``; every 8th upload is
    sent twice (a retry). Writes what was acknowledged to ``out`` (JSON)."""
    import asyncio
    import json

    bodies = [Path(p).read_bytes() for p in paths]
    acked: dict[str, int] = {}
    dups = 0
    retried = 0
    errors: list[str] = []
    lat: list[float] = []

    async def one(c: httpx.AsyncClient, bid: str, j: int) -> dict | None:
        for _ in range(5):  # bounded retries of a failed request, same batch id
            t0 = time.perf_counter()
            try:
                r = await c.post(f"/v1/deployments/{dep}/stats", params={"batch_id": bid},
                                 content=bodies[j])
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            lat.append(time.perf_counter() - t0)
            if r.status_code == 200:
                return r.json()
            errors.append(f"{r.status_code} {r.text[:200]}")
            return None
        return None

    async def client(ci: int, end: float) -> None:
        nonlocal dups, retried
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            i = 0
            while time.monotonic() < end and i < 100_000:
                bid, j = f"{prefix}c{ci}-{i}", (ci * 7 + i) % len(bodies)
                r = await one(c, bid, j)
                if r is not None and r["counted"]:
                    acked[bid] = toks[j]
                if i % 8 == 7 and r is not None:
                    retried += 1
                    r2 = await one(c, bid, j)
                    if r2 is not None and r2["duplicate"]:
                        dups += 1
                i += 1

    async def main() -> float:
        t0 = time.monotonic()
        end = t0 + seconds
        await asyncio.gather(*(client(ci, end) for ci in range(clients)))
        return time.monotonic() - t0

    wall = asyncio.run(main())
    Path(out).write_text(json.dumps({"acked": acked, "duplicates": dups, "retried": retried,
                                     "errors": errors[:20], "n_errors": len(errors),
                                     "wall_s": wall, "upload_latency_s": sorted(lat)}))


def run_load(srv: Server, dep: str, paths: list[Path], toks: list[int], seconds: float,
             clients: int = 32, probe_path: str | None = None, probe_every: float = 0.02,
             prefix: str = "") -> dict[str, object]:
    """Uploads from a child process for ``seconds`` while this process probes ``probe_path``
    (GET) every ``probe_every`` s; returns the child's record plus probe latencies."""
    import json
    import multiprocessing

    out = srv.data.parent / f"load-{time.time_ns()}.json"
    # fork: a spawned child would re-import this module by name, which fails when the tests run
    # against the installed package (the source tree is not on sys.path then).
    methods = multiprocessing.get_all_start_methods()
    proc = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Process(
        target=_uploader, args=(srv.url, srv.token, dep, [str(p) for p in paths], toks, seconds,
                                clients, str(out), prefix))
    proc.start()
    probes: list[float] = []
    deadline = time.monotonic() + seconds + 120
    with srv.client(timeout=30) as c:
        while proc.is_alive() and time.monotonic() < deadline:
            if probe_path:
                t0 = time.perf_counter()
                r = c.get(probe_path)
                probes.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
            time.sleep(probe_every)
    proc.join(timeout=max(1.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.kill()
        raise AssertionError("the load generator did not finish in time")
    res = json.loads(out.read_text())
    res["probe_latency_s"] = sorted(probes)
    return res


def v3_deployment_with_solve(c: Any, first_body: Path, time_limit: float) -> str:
    """Create the DeepSeek-V3-shape deployment ``v3`` (64 GPUs in 8 nodes), upload
    ``first_body`` as batch ``warm`` and start an EPLB solve; returns the job id. Shared by the
    load test and the load benchmark so both measure the same set-up."""
    spec = {"name": "v3", **DEEPSEEK_V3, "cluster": {"num_gpus": 64, "num_nodes": 8,
                                                    "replicas": 0}}
    assert c.post("/v1/deployments", json=spec).status_code == 201
    c.post("/v1/deployments/v3/stats?batch_id=warm", content=first_body.read_bytes())
    return c.post("/v1/deployments/v3/solve",
                  json={"time_limit": time_limit, "method": "eplb"}).json()["job"]


def wait_job(c: Any, job: str, seconds: float) -> None:
    """Poll ``job`` until it leaves queued/running, failing after ``seconds``."""
    end = time.monotonic() + seconds
    while c.get(f"/v1/jobs/{job}").json()["state"] in ("queued", "running"):
        assert time.monotonic() < end, f"job {job} did not finish in {seconds} s"
        time.sleep(0.2)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]

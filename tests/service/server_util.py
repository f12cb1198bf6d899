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

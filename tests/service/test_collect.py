"""``moeplace collect`` against a stand-in SGLang server on loopback that speaks SGLang's
expert-distribution endpoints and writes its dump format (``stat`` mode, rank 0 writes the
all-rank sum, the recorder resets after each dump), uploading into a real ``moeplace serve``."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the service extra: the tests talk to the server with it

from click.testing import CliRunner  # noqa: E402

from moeplace.cli import main  # noqa: E402
from tests.service.server_util import HOST, Server, deployment  # noqa: E402

HID, L, N, K = 5, 4, 16, 2  # hidden layer 0 dense, MoE layers 1..4 (deployment() declares them)


class StandInSGLang:
    """Records "traffic" only between start and dump; each dump writes what was recorded since
    the last one and resets, as SGLang's stat recorder does."""

    def __init__(self, dump_dir: Path, seed: int = 0) -> None:
        self.dir = dump_dir
        self.rng = np.random.default_rng(seed)
        self.recording = False
        self.dumped: list[np.ndarray] = []  # truth: [L, N] load of each dump
        self.tokens: list[int] = []
        self.calls: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.calls.append(self.path)
                if self.path == "/start_expert_distribution_record":
                    owner.recording = True
                    msg = b"Start recording the expert distribution.\n"
                elif self.path == "/stop_expert_distribution_record":
                    owner.recording = False
                    msg = b"Stop recording the expert distribution.\n"
                elif self.path == "/dump_expert_distribution_record":
                    owner.dump()
                    msg = b"Dump expert distribution record.\n"
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)

            do_GET = do_POST

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def dump(self) -> None:
        passes = []
        T = int(self.rng.integers(20, 200)) if self.recording else 0
        experts = np.argsort(self.rng.random((T, L, N)), axis=2)[:, :, :K]
        load = np.stack([np.bincount(experts[:, l].ravel(), minlength=N) for l in range(L)])
        for part in np.array_split(experts, 2):  # two forward passes in the buffer
            c = np.zeros((HID, N), np.int64)
            for l in range(L):
                c[l + 1] = np.bincount(part[:, l].ravel(), minlength=N)
            passes.append(c)
        torch.save({"rank": 0, "logical_count": torch.from_numpy(np.stack(passes)),
                    "average_utilization_rate_over_window": None},
                   self.dir / f"expert_distribution_recorder_{time.time()}.pt")
        self.dumped.append(load)
        self.tokens.append(T)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_collector_uploads_each_dump_once(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    sg = StandInSGLang(dumps, seed=41)
    srv = Server(tmp_path / "data").start()
    tokf = tmp_path / "tok"
    tokf.write_text(srv.token)
    try:
        with srv.client() as c:
            assert c.post("/v1/deployments", json=deployment("sg")).status_code == 201
        # A dump a previous collector left behind (recorded traffic, not yet uploaded), and a
        # per_token dump of rank 1, which --ranks 0 leaves alone.
        sg.recording = True
        sg.dump()
        (dumps / "expert_distribution_recorder_1.5_1.pt").write_bytes(b"rank 1, not ours")
        args = ["collect", "--sglang", sg.url, "--dump-dir", str(dumps), "--service", srv.url,
                "--deployment", "sg", "--every", "0.05", "--cycles", "3", "--token-file",
                str(tokf), "--keep"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert "4 uploaded" in r.output and "0 already counted" in r.output
        assert sg.calls[0] == "/start_expert_distribution_record"
        assert sg.calls.count("/dump_expert_distribution_record") == 3
        with srv.client() as c:
            s = c.get("/v1/deployments/sg/stats").json()
        assert s["tokens"] == sum(sg.tokens)
        assert np.array_equal(s["load"], sum(sg.dumped))
        # Kept dumps pushed again (a collector restarted before deleting them): counted once.
        r = CliRunner().invoke(main, [*args[:-1], "--cycles", "1", "--no-start"])
        assert r.exit_code == 0, r.output
        assert "1 uploaded" in r.output and "4 already counted" in r.output
        with srv.client() as c:
            s = c.get("/v1/deployments/sg/stats").json()
        assert s["tokens"] == sum(sg.tokens) and np.array_equal(s["load"], sum(sg.dumped))
        # Without --keep uploaded dumps are deleted; a corrupt dump is set aside, exit 1.
        (dumps / "expert_distribution_recorder_2.0.pt").write_bytes(b"PK\x03\x04 not torch")
        r = CliRunner().invoke(main, [*args[:-1], "--cycles", "1", "--no-start"])
        assert r.exit_code == 1 and "1 refused" in r.output, r.output
        left = sorted(p.name for p in dumps.iterdir())
        assert left == ["expert_distribution_recorder_1.5_1.pt",
                        "expert_distribution_recorder_2.0.pt.rejected"]
        # A wrong deployment fails at once, as one line.
        r = CliRunner().invoke(main, [*args[:8], "nope", *args[9:]])
        assert r.exit_code == 2 and "404" in r.output
    finally:
        srv.stop()
        sg.close()

"""The placement service against a real ``moeplace serve`` on loopback with a token.

Independent truth: per-batch loads counted with numpy ``bincount`` over the raw expert ids (not
moeplace's counting kernels), and the SGLang file's published shape.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")  # the service extra: the tests talk to the server with it
pytest.importorskip("uvicorn")

from tests.service.server_util import Server, deployment, stats_batches  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("svc")
    s = Server(d / "data", extra=("--max-upload-mb", "1")).start()
    yield s
    s.stop()


def test_token_required_healthz_open(server):
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    for path in ("/v1/deployments", "/v1/deployments/x/stats", "/v1/jobs/j", "/v1/nope",
                 "/metrics"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 401, path
        assert "token" in r.json()["error"]
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
    # An upload without the token is refused before its body is read or stored.
    r = httpx.post(f"{server.url}/v1/deployments/x/stats?batch_id=a", content=b"x" * 1000,
                   timeout=10)
    assert r.status_code == 401
    with server.client() as c:
        assert c.get("/v1/deployments").status_code == 200


def _wait_job(c: httpx.Client, job: str, states: tuple[str, ...], timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        j = c.get(f"/v1/jobs/{job}").json()
        if j["state"] in states:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job} not in {states} after {timeout} s: {j}")


def test_uploads_survive_sigkill_and_count_once(tmp_path):
    """20 uploads (one repeated), a SIGKILL halfway while uploads and a solve are in flight,
    a restart on the same data: totals equal the independent count of the 20 batches, every
    upload acknowledged before the kill is still there (a re-push is a duplicate), and the
    interrupted solve job is failed with a reason."""
    srv = Server(tmp_path / "data").start()
    bodies, loads, toks = stats_batches(tmp_path, 20, L=4, N=16, k=2, seed=1)
    acked: set[int] = set()
    try:
        with srv.client() as c:
            assert c.post("/v1/deployments", json=deployment("crash")).status_code == 201
            for i in range(8):
                r = c.post(f"/v1/deployments/crash/stats?batch_id=b{i}", content=bodies[i])
                assert r.status_code == 200 and r.json()["counted"], r.text
                acked.add(i)
            r = c.post("/v1/deployments/crash/stats?batch_id=b3", content=bodies[3])  # a retry
            assert r.status_code == 200 and r.json() == {**r.json(), "counted": False,
                                                         "duplicate": True}
            # A long solve, running when the server dies.
            job = c.post("/v1/deployments/crash/solve",
                         json={"time_limit": 300, "method": "search"}).json()["job"]
            _wait_job(c, job, ("running",), 60)

        # Uploads in flight while the server is killed: whatever was acknowledged must survive.
        stop = threading.Event()

        def pusher() -> None:
            with srv.client(timeout=10) as c2:
                for i in range(8, 14):
                    if stop.is_set():
                        return
                    try:
                        r = c2.post(f"/v1/deployments/crash/stats?batch_id=b{i}",
                                    content=bodies[i])
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acked.add(i)

        t = threading.Thread(target=pusher)
        t.start()
        time.sleep(0.05)
        srv.kill()
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()

        srv.start()
        with srv.client() as c:
            j = c.get(f"/v1/jobs/{job}").json()
            assert j["state"] == "failed" and "interrupted" in j["error"], j
            for i in range(20):
                r = c.post(f"/v1/deployments/crash/stats?batch_id=b{i}", content=bodies[i])
                assert r.status_code == 200, r.text
                if i in acked:  # acknowledged before the kill: durable, not counted again
                    assert r.json()["duplicate"], (i, r.json())
            s = c.get("/v1/deployments/crash/stats").json()
        assert s["tokens"] == sum(toks)
        assert np.array_equal(np.array(s["load"]), sum(loads))
        assert sum(w["batches"] for w in s["windows"]) == 20
        assert len(acked) >= 8
    finally:
        srv.stop()


def test_solve_job_and_exports(server, tmp_path):
    bodies, _, toks = stats_batches(tmp_path, 3, L=4, N=16, k=2, seed=2)
    with server.client() as c:
        spec = deployment("exp", gpus=4, expert_bytes=1000)
        r = c.post("/v1/deployments", json=spec)
        assert r.status_code == 201 and r.json()["id"] == "exp"
        assert c.post("/v1/deployments", json=spec).status_code == 409
        assert [d["id"] for d in c.get("/v1/deployments").json()["deployments"]] .count("exp") == 1
        assert c.get("/v1/deployments/exp/placements/latest").status_code == 404
        for i, b in enumerate(bodies):
            assert c.post(f"/v1/deployments/exp/stats?batch_id={i}", content=b).status_code == 200
        r = c.post("/v1/deployments/exp/solve", json={"time_limit": 5})
        assert r.status_code == 202
        j = _wait_job(c, r.json()["job"], ("done", "failed", "cancelled"))
        assert j["state"] == "done", j
        assert j["report"]["tokens"] == sum(toks) and j["report"]["gap"] >= 0
        assert j["version"] == 1 and j["placement"].endswith("/placements/1")

        r = c.get("/v1/deployments/exp/placements/latest", params={"format": "sglang"})
        assert r.status_code == 200 and r.headers["x-moeplace-version"] == "1"
        p2l = r.json()["physical_to_logical_map"]
        # SGLang: one row per hidden layer (5), N + R = 16 physical slots, each MoE row a
        # permutation of the 16 experts, the dense layer 0 trivial.
        assert len(p2l) == 5 and all(len(row) == 16 for row in p2l)
        assert p2l[0] == list(range(16))
        assert all(sorted(row) == list(range(16)) for row in p2l[1:])

        native = c.get("/v1/deployments/exp/placements/1").json()
        assert native["phy2log"] == p2l[1:] and native["info"]["version"] == 1
        assert native["info"]["report"]["objective"]["total"] == j["report"]["objective"]["total"]
        y = c.get("/v1/deployments/exp/placements/1", params={"format": "trtllm"}).text
        assert "num_slots: 16" in y and "  1: [" in y and "  4: [" in y
        assert c.get("/v1/deployments/exp/placements/2").status_code == 404
        assert c.get("/v1/deployments/exp/placements/x1").status_code == 422
        assert c.get("/v1/deployments/exp/placements/1",
                     params={"format": "nope"}).status_code == 422

        assert c.get("/v1/deployments/exp/drift").status_code == 409  # nothing marked current
        r = c.post("/v1/deployments/exp/placements/1/current")
        assert r.json() == {"deployment": "exp", "current_version": 1}
        d = c.get("/v1/deployments/exp/drift", params={"threshold": 0.0}).json()
        assert d["current_version"] == 1 and d["tokens"] == sum(toks)
        assert d["recommendation"] in ("keep", "rebalance")
        assert d["recommendation"] == ("rebalance" if d["expected_gain"] >= 0 else "keep")
        m = d["migration"]
        assert m["bytes_transferred"] == 1000 * m["copies_transferred"]
        assert c.get("/v1/deployments/exp/drift", params={"threshold": 2}).status_code == 422

        text = c.get("/metrics").text
        assert 'moeplace_uploads_total{deployment="exp"} 3' in text
        assert f'moeplace_tokens_total{{deployment="exp"}} {sum(toks)}' in text
        assert 'moeplace_load_imbalance{deployment="exp"}' in text
        # Request latency per route template; a histogram's +Inf bucket equals its count.
        lab = 'method="GET",route="/v1/deployments/{dep}/placements/{version}",status="2xx"'
        inf = [ln for ln in text.splitlines()
               if ln.startswith(f'moeplace_request_seconds_bucket{{{lab},le="+Inf"}}')]
        cnt = [ln for ln in text.splitlines()
               if ln.startswith(f"moeplace_request_seconds_count{{{lab}}}")]
        assert len(inf) == 1 and len(cnt) == 1 and inf[0].split()[-1] == cnt[0].split()[-1]
        assert int(cnt[0].split()[-1]) >= 3  # latest (sglang), 1 (native), 1 (trtllm)


def test_bad_input_is_4xx_with_one_line(server, tmp_path):
    bodies, _, _ = stats_batches(tmp_path, 1, L=4, N=16, k=2, seed=3)
    wrong, _, _ = stats_batches(tmp_path, 1, L=5, N=16, k=2, seed=4)
    with server.client() as c:
        assert c.post("/v1/deployments", json=deployment("bad")).status_code == 201
        cases = [
            ("POST", "/v1/deployments", {"content": b"{not json", "headers":
                                         {"content-type": "application/json"}}, 400),
            ("POST", "/v1/deployments", {"json": {"name": "x"}}, 422),
            ("POST", "/v1/deployments", {"json": {**deployment("y"), "top_k": "2"}}, 422),
            ("POST", "/v1/deployments", {"json": {**deployment("y"), "moe_layer_ids": [1, 1, 2, 3]}},
             422),
            ("POST", "/v1/deployments", {"json": deployment("z", gpus=5)}, 422),
            ("POST", "/v1/deployments", {"json": {**deployment("ü/x")}}, 422),
            ("POST", "/v1/deployments", {"json": [1, 2]}, 422),
            ("GET", "/v1/deployments/nope", {}, 404),
            ("POST", "/v1/deployments/nope/stats?batch_id=a", {"content": bodies[0]}, 404),
            ("POST", "/v1/deployments/bad/stats", {"content": bodies[0]}, 422),  # no batch_id
            ("POST", "/v1/deployments/bad/stats?batch_id=a", {"content": b""}, 422),
            ("POST", "/v1/deployments/bad/stats?batch_id=a", {"content": b"PK\x03\x04junk"}, 422),
            ("POST", "/v1/deployments/bad/stats?batch_id=a", {"content": bodies[0][:500]}, 422),
            ("POST", "/v1/deployments/bad/stats?batch_id=a", {"content": wrong[0]}, 422),
            ("POST", "/v1/deployments/bad/stats?batch_id=a", {"content": b"x" * (2 << 20)}, 413),
            ("POST", "/v1/deployments/bad/solve", {"json": {"time_limit": 5}}, 409),  # no stats
            ("POST", "/v1/deployments/bad/solve", {"json": {"time_limit": -1}}, 422),
            ("POST", "/v1/deployments/bad/solve", {"json": {"method": "magic"}}, 422),
            ("POST", "/v1/deployments/nope/solve", {"json": {"time_limit": 5}}, 404),
            ("GET", "/v1/jobs/j_nope", {}, 404),
            ("DELETE", "/v1/jobs/j_nope", {}, 404),
            ("GET", "/v1/deployments/bad/placements/latest", {}, 404),
            ("POST", "/v1/deployments/bad/placements/7/current", {}, 404),
            ("PUT", "/v1/deployments", {}, 405),
        ]
        for method, path, kw, want in cases:
            r = c.request(method, path, **kw)
            assert r.status_code == want, (method, path, r.status_code, r.text)
            err = r.json()["error"]
            assert isinstance(err, str) and err and "\n" not in err
        # Nothing was counted by any refused upload; a batch id reused for other data is 409.
        assert c.get("/v1/deployments/bad/stats").json()["tokens"] == 0
        assert c.post("/v1/deployments/bad/stats?batch_id=a", content=bodies[0]).status_code == 200
        other, _, _ = stats_batches(tmp_path, 1, L=4, N=16, k=2, seed=5)
        r = c.post("/v1/deployments/bad/stats?batch_id=a", content=other[0])
        assert r.status_code == 409 and "other contents" in r.json()["error"]


def test_client_and_cli_verbs(server, tmp_path):
    from click.testing import CliRunner

    from moeplace.cli import main
    from moeplace.service import Client, ServiceError

    bodies, _, toks = stats_batches(tmp_path, 2, L=4, N=16, k=2, seed=6)
    files = []
    for i, b in enumerate(bodies):
        files.append(tmp_path / f"s{i}.npz")
        files[-1].write_bytes(b)
    tokf = tmp_path / "tok"
    tokf.write_text(server.token + "\n")
    run = CliRunner().invoke
    common = ["--service", server.url, "--deployment", "cli", "--token-file", str(tokf)]
    r = run(main, ["push-stats", *map(str, files), str(files[0]), *common, "--gpus", "4"])
    assert r.exit_code == 0, r.output
    assert "created deployment cli" in r.output and "already counted" in r.output
    out = tmp_path / "sg.json"
    r = run(main, ["pull-placement", *common, "--solve", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == 5
    with Client(server.url, server.token) as c:
        assert c.stats("cli")["tokens"] == sum(toks)
        v, data = c.placement("cli", "latest", "eplb")
        assert v == 1 and data[:2] == b"PK"
        with pytest.raises(ServiceError) as e:
            c.deployment("missing")
        assert e.value.status == 404
    with Client(server.url, "wrong") as c, pytest.raises(ServiceError) as e:
        c.deployments()
    assert e.value.status == 401
    r = run(main, ["pull-placement", "--service", server.url, "--deployment", "cli",
                   "--out", str(tmp_path / "x.json")], env={"MOEPLACE_TOKEN": ""})
    assert r.exit_code == 2 and "401" in r.output


def test_concurrent_retries_of_one_batch_count_once(server, tmp_path):
    """16 clients send the same batch at once (a retry storm): the primary key, checked inside
    the commit, lets exactly one count."""
    from concurrent.futures import ThreadPoolExecutor

    bodies, loads, toks = stats_batches(tmp_path, 1, seed=7)
    with server.client() as c:
        assert c.post("/v1/deployments", json=deployment("storm")).status_code == 201

    def send(_: int) -> dict:
        with server.client() as c2:
            r = c2.post("/v1/deployments/storm/stats?batch_id=same", content=bodies[0])
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(16) as pool:
        res = list(pool.map(send, range(16)))
    assert sum(r["counted"] for r in res) == 1 and sum(r["duplicate"] for r in res) == 15
    with server.client() as c:
        s = c.get("/v1/deployments/storm/stats").json()
    assert s["tokens"] == toks[0] and np.array_equal(s["load"], loads[0])
    assert len(list((server.data / "stats" / "storm").rglob("*.npz"))) == 1  # losers' files gone

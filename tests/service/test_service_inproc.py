"""The service in process (FastAPI's TestClient, no network): windows and expiry on a fake clock,
job cancellation and time limits, Parquet uploads, and the OpenAPI schema fuzzed for 5xx."""

from __future__ import annotations

import time
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the service extra: the tests talk to the server with it
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplace.placement import contiguous
from moeplace.service.app import create_app
from moeplace.service.store import Policy
from moeplace.traces import write_trace
from tests.conftest import random_trace
from tests.service.server_util import deployment, stats_batches

TOKEN = "in-process"
H = {"Authorization": f"Bearer {TOKEN}"}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _wait(c: TestClient, job: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        j = c.get(f"/v1/jobs/{job}", headers=H).json()
        if j["state"] in states:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job}: {j}")


def test_windows_expire_by_stated_policy(tmp_path):
    clock = Clock(1000.0)  # window 100 with 10 s windows
    app = create_app(tmp_path / "d", TOKEN, clock=clock,
                     policy=Policy(window_seconds=10, retain_windows=3, recent_windows=2))
    bodies, loads, toks = stats_batches(tmp_path, 3, seed=11)
    with TestClient(app) as c:
        assert c.post("/v1/deployments", json=deployment("w"), headers=H).status_code == 201
        for i, t in enumerate((1000.0, 1010.0, 1025.0)):  # windows 100, 101, 102
            clock.t = t
            r = c.post(f"/v1/deployments/w/stats?batch_id={i}", content=bodies[i], headers=H)
            assert r.json()["window"] == 100 + i
        s = c.get("/v1/deployments/w/stats", headers=H).json()
        assert [w["window"] for w in s["windows"]] == [100, 101, 102]
        assert s["tokens"] == sum(toks) and s["recent_windows"] == [101, 102]
        assert np.array_equal(s["load"], loads[0] + loads[1] + loads[2])
        assert s["policy"]["retain_windows"] == 3

        clock.t = 1030.0  # window 103: the newest 3 are 101..103, so window 100 expires
        s = c.get("/v1/deployments/w/stats", headers=H).json()
        assert [w["window"] for w in s["windows"]] == [101, 102]
        assert s["tokens"] == toks[1] + toks[2]
        assert np.array_equal(s["load"], loads[1] + loads[2])
        assert not (tmp_path / "d" / "stats" / "w" / "100").exists()
        # A late retry of the expired batch is recognised, not counted again.
        r = c.post("/v1/deployments/w/stats?batch_id=0", content=bodies[0], headers=H)
        assert r.json()["duplicate"] and c.get("/v1/deployments/w/stats",
                                                headers=H).json()["tokens"] == toks[1] + toks[2]
        # Solves use the recent windows' files only.
        job = c.post("/v1/deployments/w/solve", json={"time_limit": 5}, headers=H).json()["job"]
        j = _wait(c, job, ("done", "failed"))
        assert j["state"] == "done" and j["report"]["tokens"] == toks[1] + toks[2], j

    # Restart on the same directory: the same sums, rebuilt from the files.
    with TestClient(create_app(tmp_path / "d", TOKEN, clock=clock,
                               policy=Policy(10, 3, 2))) as c:
        s = c.get("/v1/deployments/w/stats", headers=H).json()
        assert s["tokens"] == toks[1] + toks[2]
        assert c.get("/v1/deployments/w/placements/latest", headers=H).status_code == 200


def test_cancel_queued_and_running_and_time_limit(tmp_path):
    app = create_app(tmp_path / "d", TOKEN, max_workers=1, job_grace_s=0.0)
    bodies, _, _ = stats_batches(tmp_path, 1, seed=12)
    with TestClient(app) as c:
        c.post("/v1/deployments", json=deployment("j"), headers=H)
        c.post("/v1/deployments/j/stats?batch_id=a", content=bodies[0], headers=H)
        # With no grace a 10 ms limit cannot be met (the worker alone takes longer to start):
        # the job is stopped and failed with the reason.
        j1 = c.post("/v1/deployments/j/solve", json={"time_limit": 0.01}, headers=H).json()
        j2 = c.post("/v1/deployments/j/solve", json={"time_limit": 60}, headers=H).json()
        assert j2["state"] == "queued"
        r = c.delete(f"/v1/jobs/{j2['job']}", headers=H).json()
        assert r["state"] == "cancelled"
        j = _wait(c, j1["job"], ("done", "failed", "cancelled"))
        assert j["state"] == "failed" and "time limit" in j["error"], j
        assert _wait(c, j2["job"], ("cancelled",))["version"] is None
        # A running job is stopped by DELETE.
        j3 = c.post("/v1/deployments/j/solve", json={"time_limit": 300, "method": "search"},
                    headers=H).json()
        _wait(c, j3["job"], ("running",))
        assert c.delete(f"/v1/jobs/{j3['job']}", headers=H).json()["state"] == "cancelled"
        end = time.monotonic() + 30
        while list((tmp_path / "d" / "jobs").iterdir()):  # the reaper removes the worker's dir
            assert time.monotonic() < end, "the cancelled worker was not reaped"
            time.sleep(0.05)
        j = c.get(f"/v1/jobs/{j3['job']}", headers=H).json()
        assert j["state"] == "cancelled" and j["version"] is None
        assert c.get("/v1/deployments/j/placements", headers=H).json()["placements"] == []


def test_parquet_shard_upload(tmp_path):
    rng = np.random.default_rng(13)
    tr = random_trace(rng, 300, 4, 16, 2)
    write_trace(tr, tmp_path / "shard.parquet")
    body = (tmp_path / "shard.parquet").read_bytes()
    want = np.stack([np.bincount(tr.experts[:, l, :].ravel(), minlength=16) for l in range(4)])
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        c.post("/v1/deployments", json={**deployment("pq"), "moe_layer_ids": [0, 1, 2, 3]},
               headers=H)
        r = c.post("/v1/deployments/pq/stats?batch_id=p", content=body, headers=H)
        assert r.status_code == 200 and r.json()["tokens"] == 300, r.text
        s = c.get("/v1/deployments/pq/stats", headers=H).json()
        assert np.array_equal(s["load"], want)
        assert c.post("/v1/deployments/pq/stats?batch_id=q", content=body[:-100],
                      headers=H).status_code == 422
    # The stored file is the statistics, which a restart reads back; the shard stays beside it.
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        assert np.array_equal(c.get("/v1/deployments/pq/stats", headers=H).json()["load"], want)
    kept = sorted(p.suffix for p in (tmp_path / "d" / "stats" / "pq").rglob("*.*"))
    assert kept == [".npz", ".parquet"]


# ---- schema fuzzing: every operation of the OpenAPI schema, random parameters and bodies -----
@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    bodies, _, _ = stats_batches(d, 1, seed=14)
    # max_workers=0: fuzzed solves queue but never start a worker.
    app = create_app(d / "data", TOKEN, max_workers=0, max_upload=1 << 20, max_json=64 << 10)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.post("/v1/deployments", json=deployment("fz"), headers=H)
        c.post("/v1/deployments/fz/stats?batch_id=seed", content=bodies[0], headers=H)
        # Placement version 1, stored the way a finished job stores it, marked current, so the
        # placement, export and drift operations are fuzzed past their "not found" answers.
        plc = contiguous(4, 16, 4)
        plc.moe_layer_ids = (1, 2, 3, 4)
        app.state.store.add_placement("fz", plc.to_dict(), {"method": "contiguous"}, None)
        assert c.post("/v1/deployments/fz/placements/1/current", headers=H).status_code == 200
        yield c, bodies[0]


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=12), ch,
                                                                          max_size=5), max_leaves=12)
_ids = st.sampled_from(["fz", "nope", "latest", "current", "1", "0", "-1", "j_x", ".", "%00",
                        "9" * 30]) | st.text(max_size=30)
_scalar = (st.none() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30) | st.booleans())


def _deployment_like() -> st.SearchStrategy[dict]:
    good = deployment("g")
    return st.fixed_dictionaries({}, optional={k: st.just(v) | _json for k, v in good.items()})


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_openapi_operations_never_5xx(fuzz_client, data):
    c, stats_body = fuzz_client
    schema = c.app.openapi()
    ops = [(p, m, op) for p, item in schema["paths"].items() for m, op in item.items()]
    path, method, op = data.draw(st.sampled_from(ops))
    url = path
    query = {}
    for prm in op.get("parameters", []):
        if prm["in"] == "path":
            url = url.replace("{" + prm["name"] + "}",
                              urllib.parse.quote(str(data.draw(_ids)), safe=""))
        elif prm["in"] == "query" and data.draw(st.booleans()):
            v = data.draw(_scalar)
            if v is not None:
                query[prm["name"]] = v
    kw = {}
    if method in ("post", "put", "patch"):
        kind = data.draw(st.sampled_from(["json", "deployment", "solve", "bytes", "stats",
                                          "none"]))
        if kind == "json":
            kw["json"] = data.draw(_json)
        elif kind == "deployment":
            kw["json"] = data.draw(_deployment_like())
        elif kind == "solve":
            kw["json"] = data.draw(st.fixed_dictionaries({}, optional={
                "time_limit": _scalar, "method": st.sampled_from(["auto", "search", "eplb", "x"]),
                "replicas": _scalar, "current": _scalar, "weights": _scalar, "seed": _scalar}))
        elif kind == "bytes":
            kw["content"] = data.draw(st.binary(max_size=2000))
        elif kind == "stats":
            b = bytearray(stats_body)
            for _ in range(data.draw(st.integers(0, 4))):
                b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
            kw["content"] = bytes(b)
    headers = H if data.draw(st.integers(0, 9)) else {}
    r = c.request(method.upper(), url, params=query, headers=headers, **kw)
    assert r.status_code < 500, (method, url, query, r.status_code, r.text)
    if r.status_code >= 400 and url.startswith("/v1"):
        err = r.json()["error"]
        assert isinstance(err, str) and "\n" not in err


def test_sglang_dump_uploads(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    HID, N, k = 5, 16, 2  # hidden layer 0 dense, MoE layers 1..4
    tr = random_trace(rng, 40, 4, N, k)
    counts = np.zeros((3, HID, N), np.int32)  # three forward passes, summed by the importer
    for f, part in enumerate(np.array_split(tr.experts, 3)):
        for l in range(4):
            counts[f, l + 1] = np.bincount(part[:, l, :].ravel(), minlength=N)
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts),
                "average_utilization_rate_over_window": None}, tmp_path / "stat.pt")
    bad = counts.copy()
    bad[0, 2, 0] += 1  # layer 2 now counts one assignment more than a whole token's
    torch.save({"rank": 0, "logical_count": torch.from_numpy(bad)}, tmp_path / "bad.pt")
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        c.post("/v1/deployments", json=deployment("sg"), headers=H)
        r = c.post("/v1/deployments/sg/stats?batch_id=d1",
                   content=(tmp_path / "stat.pt").read_bytes(), headers=H)
        assert r.status_code == 200 and r.json()["tokens"] == 40, r.text
        want = np.stack([np.bincount(tr.experts[:, l, :].ravel(), minlength=N) for l in range(4)])
        assert np.array_equal(c.get("/v1/deployments/sg/stats", headers=H).json()["load"], want)
        r = c.post("/v1/deployments/sg/stats?batch_id=d2",
                   content=(tmp_path / "bad.pt").read_bytes(), headers=H)
        assert r.status_code == 422 and "multiple of top_k=2" in r.json()["error"]


def test_sglang_per_token_dump_upload(tmp_path):
    """A per_token dump: physical slots mapped back to logical experts, counted per token."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    HID, N, k = 5, 16, 2
    tr = random_trace(rng, 30, 4, N, k)
    p2l = np.tile(np.r_[np.arange(N), [0, 1, 2, 3]], (HID, 1))  # 16 experts + 4 redundant slots
    p2l[2] = np.r_[np.arange(N)[::-1], [5, 6, 7, 8]]
    slot = [{int(e): s for s, e in list(enumerate(row))[::-1]} for row in p2l]
    ids = np.full((HID, 30, 8), -1, np.int32)
    for h in range(1, HID):
        for j in range(30):
            ids[h, j, :k] = [slot[h][int(e)] for e in tr.experts[j, h - 1]]
    dump = {"records": [{"forward_pass_id": 0, "rank": 0,
                         "topk_ids_of_layer": torch.from_numpy(ids), "positions": torch.arange(30),
                         "forward_mode": "DECODE", "extend_seq_lens": None}],
            "last_physical_to_logical_map": torch.from_numpy(p2l)}
    torch.save(dump, tmp_path / "tok.pt")
    want = np.stack([np.bincount(tr.experts[:, l, :].ravel(), minlength=N) for l in range(4)])
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        c.post("/v1/deployments", json=deployment("pt"), headers=H)
        r = c.post("/v1/deployments/pt/stats?batch_id=t",
                   content=(tmp_path / "tok.pt").read_bytes(), headers=H)
        assert r.status_code == 200 and r.json()["tokens"] == 30, r.text
        assert np.array_equal(c.get("/v1/deployments/pt/stats", headers=H).json()["load"], want)


def test_start_refuses_a_lost_acknowledged_upload(tmp_path):
    from moeplace.errors import InputError
    from moeplace.service.store import Store

    bodies, _, _ = stats_batches(tmp_path, 1, seed=17)
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        c.post("/v1/deployments", json=deployment("lost"), headers=H)
        assert c.post("/v1/deployments/lost/stats?batch_id=a", content=bodies[0],
                      headers=H).status_code == 200
    (f,) = (tmp_path / "d" / "stats" / "lost").rglob("*.npz")
    f.write_bytes(b"garbage")
    with pytest.raises(InputError, match="acknowledged upload of deployment 'lost'"):
        Store(tmp_path / "d")


def test_serve_fails_as_one_line(tmp_path, monkeypatch):
    import builtins

    from click.testing import CliRunner

    from moeplace.cli import main

    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["serve", "--data", str(tmp_path / "afile"), "--port", "1"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "error" in r.output, r.output
    real = builtins.__import__

    def no_uvicorn(name, *a, **kw):
        if name == "uvicorn":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    r = CliRunner().invoke(main, ["serve", "--data", str(tmp_path / "d")])
    assert r.exit_code == 2 and "pip install 'moeplace[service]'" in r.output, r.output
    assert r.output.count("\n") == 1


def test_scheduled_resolves_only_after_new_uploads(tmp_path):
    bodies, _, toks = stats_batches(tmp_path, 2, seed=18)
    app = create_app(tmp_path / "d", TOKEN, resolve_every=0.3, resolve_time_limit=5)

    def jobs() -> list[dict]:
        return app.state.store.query("SELECT id, state, params FROM jobs ORDER BY created")

    def settle(n: int) -> None:
        end = time.monotonic() + 60
        while len(jobs()) < n or any(j["state"] in ("queued", "running") for j in jobs()):
            assert time.monotonic() < end, [dict(j) for j in jobs()]
            time.sleep(0.1)

    with TestClient(app) as c:
        c.post("/v1/deployments", json=deployment("sch"), headers=H)
        c.post("/v1/deployments", json=deployment("idle"), headers=H)  # no uploads: never solved
        c.post("/v1/deployments/sch/stats?batch_id=a", content=bodies[0], headers=H)
        settle(1)
        time.sleep(1.0)  # several scheduler ticks without new uploads: no new job
        assert len(jobs()) == 1 and jobs()[0]["state"] == "done"
        assert '"scheduled": true' in jobs()[0]["params"]
        c.post("/v1/deployments/sch/stats?batch_id=b", content=bodies[1], headers=H)
        settle(2)
        time.sleep(1.0)
        assert [j["state"] for j in jobs()] == ["done", "done"]
        p = c.get("/v1/deployments/sch/placements", headers=H).json()["placements"]
        assert [x["version"] for x in p] == [1, 2] and p[1]["report"]["tokens"] == sum(toks)


def test_simulated_speedup_from_trace_shards(tmp_path):
    from moeplace.placement import Placement
    from moeplace.solvers import eplb
    from moeplace.solvers.simulator import Hardware, ModelShape, speedup

    rng = np.random.default_rng(19)
    tr = random_trace(rng, 400, 4, 16, 2, requests=8)
    write_trace(tr, tmp_path / "shard.parquet")
    bodies, _, _ = stats_batches(tmp_path, 1, seed=19)
    ids = {"moe_layer_ids": [0, 1, 2, 3], "num_hidden_layers": 4}
    with TestClient(create_app(tmp_path / "d", TOKEN)) as c:
        for bad in ({"model_shape": "gpt-9"}, {"hardware": "../../etc/passwd"},
                    {"hardware": "h200-imaginary"}):
            r = c.post("/v1/deployments", json={**deployment("x"), **bad}, headers=H)
            assert r.status_code == 422, r.text
        c.post("/v1/deployments", json={**deployment("sim"), **ids,
                                        "model_shape": "deepseek-v2-lite"}, headers=H)
        c.post("/v1/deployments", json=deployment("nosim"), headers=H)
        c.post("/v1/deployments/sim/stats?batch_id=s", content=(tmp_path / "shard.parquet")
               .read_bytes(), headers=H)
        c.post("/v1/deployments/nosim/stats?batch_id=s", content=bodies[0], headers=H)
        reports = {}
        for dep in ("sim", "nosim"):
            job = c.post(f"/v1/deployments/{dep}/solve", json={"time_limit": 5},
                         headers=H).json()["job"]
            j = _wait(c, job, ("done", "failed"))
            assert j["state"] == "done", j
            reports[dep] = j["report"]
        plc = Placement.from_dict(c.get("/v1/deployments/sim/placements/1", headers=H).json())
    sim = reports["sim"]["simulation"]
    assert sim["over"] == "eplb" and sim["tokens"] == 400 and sim["model_shape"] == "deepseek-v2-lite"
    base = eplb(np.stack([np.bincount(tr.experts[:, l].ravel(), minlength=16) for l in range(4)]),
                4)
    want = speedup(tr, plc, base, Hardware.load("h100-nvlink"), ModelShape.named("deepseek-v2-lite"))
    assert sim["speedup"] == pytest.approx(want, rel=1e-9)
    assert reports["nosim"]["simulation"]["speedup"] is None
    assert "trace shard" in reports["nosim"]["simulation"]["reason"]

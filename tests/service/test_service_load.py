"""Bounded load on loopback: 32 concurrent uploaders of DeepSeek-V3-shape statistics (with
retries) against a real server for a few seconds; every count must add up exactly. The 60 s run
with throughput and latency figures is ``benchmarks/bench_service.py``."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the service extra: the tests talk to the server with it

from tests.service.server_util import (
    Server,
    load_only_bodies,
    percentile,
    run_load,
    v3_deployment_with_solve,
    wait_job,
)


def test_concurrent_uploads_add_up_exactly(tmp_path):
    paths, toks = load_only_bodies(tmp_path, 16, seed=21)
    srv = Server(tmp_path / "data").start()
    try:
        with srv.client() as c:
            # A placement to probe while the uploads run.
            job = v3_deployment_with_solve(c, paths[0], time_limit=20)
        res = run_load(srv, "v3", paths, toks, seconds=4, clients=32)
        with srv.client() as c:
            wait_job(c, job, 60)
            probe = run_load(srv, "v3", paths[:1], toks[:1], seconds=0.5, clients=1,
                             probe_path="/v1/deployments/v3/placements/latest?format=sglang",
                             prefix="probe-")
            s = c.get("/v1/deployments/v3/stats").json()
            metrics = c.get("/metrics").text
        acked = {**res["acked"], **probe["acked"]}
        assert res["n_errors"] == 0 and probe["n_errors"] == 0, (res["errors"], probe["errors"])
        print(f"{len(res['acked']) / res['wall_s']:.0f} uploads/s, probe p99 "
              f"{1000 * percentile(probe['probe_latency_s'], 0.99):.1f} ms")
        assert len(acked) > 32
        # Every retry of an acknowledged batch was recognised as a duplicate.
        assert res["duplicates"] == res["retried"]
        want_tokens = sum(acked.values()) + toks[0]  # + the warm-up batch
        assert s["tokens"] == want_tokens
        assert sum(w["batches"] for w in s["windows"]) == len(acked) + 1
        assert f'moeplace_uploads_total{{deployment="v3"}} {len(acked) + 1}' in metrics
        assert percentile(probe["probe_latency_s"], 0.5) < 5.0
    finally:
        srv.stop()

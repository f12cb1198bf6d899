"""Load test of ``moeplace serve`` on loopback: uploads/s and GET placements/latest latency.

Usage: python benchmarks/bench_service.py [--seconds 60] [--clients 32] [--solve-seconds 30]

Starts a real server (fresh data directory, token, 2 solve workers) with a DeepSeek-V3-shape
deployment (58 MoE layers x 256 experts, top-8, 64 GPUs in 8 nodes), then
  A. ``--clients`` concurrent uploaders (a child process) send load-only statistics for
     ``--seconds`` (every 8th upload retried with its batch id) while this process GETs
     ``placements/latest?format=sglang`` every 20 ms; every count is checked exactly;
  B. two solve jobs (search, ``--solve-seconds`` each) run while the same probe runs.
Only 127.0.0.1 is contacted; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service.server_util import (
    Server,
    load_only_bodies,
    percentile,
    run_load,
    v3_deployment_with_solve,
    wait_job,
)

PROBE = "/v1/deployments/v3/placements/latest?format=sglang"


def _ms(v: list[float], q: float) -> float:
    return round(1000 * percentile(v, q), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--solve-seconds", type=float, default=30.0)
    ap.add_argument("--bodies", type=int, default=64)
    args = ap.parse_args()
    out: dict[str, object] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="moeplace-bench-service-") as tmp:
        t = Path(tmp)
        paths, toks = load_only_bodies(t, args.bodies, seed=1)
        out["body_bytes_mean"] = sum(p.stat().st_size for p in paths) / len(paths)
        srv = Server(t / "data", extra=("--solve-workers", "2")).start()
        try:
            with srv.client() as c:
                job = v3_deployment_with_solve(c, paths[0], time_limit=30)
                wait_job(c, job, 120)

            # A: uploads + probe
            res = run_load(srv, "v3", paths, toks, args.seconds, args.clients, PROBE)
            with srv.client() as c:
                s = c.get("/v1/deployments/v3/stats").json()
            acked = res["acked"]
            exact = (s["tokens"] == sum(acked.values()) + toks[0]
                     and sum(w["batches"] for w in s["windows"]) == len(acked) + 1
                     and res["duplicates"] == res["retried"] and res["n_errors"] == 0)
            out["A_uploads"] = {
                "seconds": round(res["wall_s"], 1), "clients": args.clients,
                "uploads_counted": len(acked), "retries_recognised": res["duplicates"],
                "retries_sent": res["retried"], "errors": res["n_errors"],
                "uploads_per_s": round(len(acked) / res["wall_s"], 1),
                "requests_per_s": round((len(acked) + res["retried"]) / res["wall_s"], 1),
                "upload_p50_ms": _ms(res["upload_latency_s"], 0.5),
                "upload_p99_ms": _ms(res["upload_latency_s"], 0.99),
                "latest_probes": len(res["probe_latency_s"]),
                "latest_p50_ms": _ms(res["probe_latency_s"], 0.5),
                "latest_p99_ms": _ms(res["probe_latency_s"], 0.99),
                "counts_exact": exact}
            out["load_after_A"] = os.getloadavg()

            # B: two solves running, probe only
            with srv.client() as c:
                jobs = [c.post("/v1/deployments/v3/solve",
                               json={"time_limit": args.solve_seconds, "method": "search",
                                     "seed": i}).json()["job"] for i in range(2)]
                end = time.monotonic() + 60
                while any(c.get(f"/v1/jobs/{j}").json()["state"] != "running" for j in jobs):
                    assert time.monotonic() < end, "solves did not start"
                    time.sleep(0.1)
                lat = []
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.solve_seconds * 0.8:
                    a = time.perf_counter()
                    assert c.get(PROBE).status_code == 200
                    lat.append(time.perf_counter() - a)
                    time.sleep(0.02)
                lat.sort()
                states = []
                end = time.monotonic() + args.solve_seconds + 120
                for j in jobs:
                    while (st := c.get(f"/v1/jobs/{j}").json())["state"] in ("queued", "running"):
                        assert time.monotonic() < end
                        time.sleep(0.5)
                    states.append(st["state"])
            out["B_two_solves"] = {"probes": len(lat), "latest_p50_ms": _ms(lat, 0.5),
                                   "latest_p99_ms": _ms(lat, 0.99), "solve_states": states}
        finally:
            srv.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The service decides with the engines' online policy: ``drift`` reports the policy's decision
and its minimal move set from the placement marked current (``method=online`` makes it the
recommendation), and scheduled re-solves of a deployment that runs a placement store the
policy's map only when it rebalances."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from fastapi.testclient import TestClient

from moeplace.placement import Placement, contiguous
from moeplace.service.app import create_app
from moeplace.solvers.online import OnlinePolicy
from moeplace.traces import Trace, TraceMeta, compute_stats
from tests.service.server_util import deployment

TOKEN = "online"
H = {"Authorization": f"Bearer {TOKEN}"}
L, N, K, G = 4, 16, 2, 4


def _skewed_stats(tmp_path, seed: int, T: int = 3000) -> tuple[bytes, np.ndarray]:
    """A statistics file whose experts follow a skewed popularity (top-k without replacement,
    Gumbel trick), and its load counted independently."""
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.3, 1.0, size=(L, N)) + 1e-3
    g = np.log(p)[None] + rng.gumbel(size=(T, L, N))
    e = np.argsort(-g, axis=2)[:, :, :K]
    meta = TraceMeta(num_experts=N, top_k=K, moe_layer_ids=tuple(range(1, L + 1)),
                     num_hidden_layers=L + 1, model="skewed")
    tr = Trace(e, dataclasses.replace(meta))
    f = tmp_path / f"s{seed}.npz"
    compute_stats(tr, coactivation=False).save(f)
    load = np.stack([np.bincount(e[:, l].ravel(), minlength=N) for l in range(L)])
    return f.read_bytes(), load


def _current(app, dep: str) -> Placement:
    plc = contiguous(L, N, G)
    d = plc.to_dict()
    d["moe_layer_ids"] = list(range(1, L + 1))
    return app.state.store.add_placement(dep, d, {"method": "contiguous"}, None), plc


def _recount_moved(old: np.ndarray, new: np.ndarray) -> int:
    S = old.shape[1] // G
    return sum(len(set(new[l, g * S:(g + 1) * S]) - set(old[l, g * S:(g + 1) * S]))
               for l in range(L) for g in range(G))


def test_drift_answers_with_the_online_policy_and_its_move_set(tmp_path):
    body, load = _skewed_stats(tmp_path, 1)
    app = create_app(tmp_path / "d", TOKEN)
    with TestClient(app) as c:
        assert c.post("/v1/deployments", json=deployment("on", L, N, K, G), headers=H).status_code == 201
        assert c.post("/v1/deployments/on/stats?batch_id=a", content=body, headers=H).status_code == 200
        v, cur = _current(app, "on")
        c.post(f"/v1/deployments/on/placements/{v}/current", headers=H)
        old = c.get("/v1/deployments/on/drift", headers=H).json()
        d = c.get("/v1/deployments/on/drift", params={"method": "online"}, headers=H).json()
    # backward compatible: the threshold answer keeps its fields, the online one is added
    for k in ("current", "fresh", "expected_gain", "migration", "threshold", "recommendation", "rule"):
        assert k in old and k in d
    assert old["fresh"]["method"] != "online"
    assert {**old["online"], "cpu_s": 0} == {**d["online"], "cpu_s": 0}
    on = d["online"]
    # the same policy the engines run, on the same window, from the same map
    want = OnlinePolicy(G, 1, hardware="h100-nvlink").step(load.astype(float), cur.phy2log)
    assert on["rebalance"] is True and want.rebalance
    assert d["recommendation"] == "rebalance" and d["fresh"]["method"] == "online"
    new = cur.phy2log.copy()
    for m in on["moves"]:
        assert new[m["layer"], m["slot"]] == m["from_expert"] and m["gpu"] == m["slot"] // (N // G)
        new[m["layer"], m["slot"]] = m["to_expert"]
    assert (new == want.phy2log).all()
    assert on["moved_copies"] == want.moved_copies == _recount_moved(cur.phy2log, new) > 0
    # only slots that change are listed (the minimal move set of that map)
    assert all(m["from_expert"] != m["to_expert"] for m in on["moves"])
    # and it pays: the policy's map balances the load better than the current one
    def mx(phy):
        return max(np.bincount(np.arange(N) // (N // G), load[l][phy[l]], G).max() for l in range(L))
    assert mx(new) < mx(cur.phy2log)


def test_scheduled_resolve_runs_the_online_policy_from_the_current_placement(tmp_path):
    body, _ = _skewed_stats(tmp_path, 2)
    body2, _ = _skewed_stats(tmp_path, 3)
    app = create_app(tmp_path / "d", TOKEN, resolve_every=0.2, resolve_time_limit=5)
    with TestClient(app) as c:
        c.post("/v1/deployments", json=deployment("sch", L, N, K, G), headers=H)
        v, cur = _current(app, "sch")
        c.post(f"/v1/deployments/sch/placements/{v}/current", headers=H)
        c.post("/v1/deployments/sch/stats?batch_id=a", content=body, headers=H)
        end = time.monotonic() + 60
        while len(c.get("/v1/deployments/sch/placements", headers=H).json()["placements"]) < 2:
            assert time.monotonic() < end
            time.sleep(0.1)
        time.sleep(1.0)  # more scheduler ticks without new uploads: nothing new
        pl = c.get("/v1/deployments/sch/placements", headers=H).json()["placements"]
        assert [x["version"] for x in pl] == [1, 2]
        rep = pl[1]["report"]
        assert rep["method"] == "online" and rep["scheduled"] and rep["from_version"] == 1
        assert rep["online"]["rebalance"] and rep["online"]["moved_copies"] > 0
        assert app.state.store.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 0  # no solve job
        got = Placement.from_dict(c.get("/v1/deployments/sch/placements/2", headers=H).json())
        assert _recount_moved(cur.phy2log, got.phy2log) == rep["online"]["moved_copies"]
        c.post("/v1/deployments/sch/stats?batch_id=b", content=body2, headers=H)
        time.sleep(1.0)  # a new upload is looked at again, from the placement still marked current
        pl = c.get("/v1/deployments/sch/placements", headers=H).json()["placements"]
        assert len(pl) in (2, 3) and all(x["report"].get("method") != "auto" for x in pl)

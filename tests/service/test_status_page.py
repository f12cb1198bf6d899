"""The status page: HTTP Basic for browsers, escaping, one bar per window; and a real headless
browser (Chromium, skipped when absent) rendering the page of a real server."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the service extra: the tests talk to the server with it
from fastapi.testclient import TestClient

from moeplace.service.app import create_app
from moeplace.service.store import Policy
from tests.service.server_util import Server, deployment, stats_batches

TOKEN = "page-token"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_status_page_windows_versions_auth_and_escaping(tmp_path):
    clock = Clock()
    bodies, _, toks = stats_batches(tmp_path, 3, seed=31)
    app = create_app(tmp_path / "d", TOKEN, clock=clock, policy=Policy(10, 10, 10))
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as c:
        spec = {**deployment("pg"), "model": "<script>alert(1)</script>"}
        assert c.post("/v1/deployments", json=spec, headers=bearer).status_code == 201
        r = c.get("/status/pg")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        bad = {"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()}
        assert c.get("/status/pg", headers=bad).status_code == 401
        assert "No statistics" in c.get("/status/pg", headers=basic).text
        for i in range(3):  # windows 100, 101, 102
            clock.t = 1000.0 + 10 * i
            c.post(f"/v1/deployments/pg/stats?batch_id={i}", content=bodies[i], headers=bearer)
        job = c.post("/v1/deployments/pg/solve", json={"time_limit": 5}, headers=bearer).json()
        end = time.monotonic() + 60
        while c.get(f"/v1/jobs/{job['job']}", headers=bearer).json()["state"] != "done":
            assert time.monotonic() < end
            time.sleep(0.1)
        c.post("/v1/deployments/pg/placements/1/current", headers=bearer)
        html = c.get("/status/pg", headers=basic).text
    assert "<script>" not in html and "&lt;script&gt;" in html
    tags = _tags(html)
    bars = [a for t, a in tags if t == "rect" and a.get("class") == "bar"]
    assert len(bars) == 3
    series = [a["data-name"] for t, a in tags if t == "polyline"]
    assert series == ["current (v1)", "contiguous (no placement)"]
    assert f"{sum(toks):,} tokens retained" in html
    assert "/v1/deployments/pg/placements/1?format=sglang" in html and "1 (current)" in html


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium for the headless browser check")
def test_status_page_in_a_headless_browser(tmp_path):
    """Chromium loads the page from a real server (no token: the browser cannot be handed one
    on its command line) and its DOM holds the plots and the versions table."""
    bodies, _, _ = stats_batches(tmp_path, 2, seed=32)
    srv = Server(tmp_path / "data", token=None, extra=("--window-seconds", "1")).start()
    try:
        with srv.client() as c:
            c.post("/v1/deployments", json=deployment("br"))
            for i, b in enumerate(bodies):
                c.post(f"/v1/deployments/br/stats?batch_id={i}", content=b)
                time.sleep(1.05)  # the next upload lands in the next 1 s window
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", f"{srv.url}/status/br"],
            capture_output=True, text=True, timeout=120)
        shot = tmp_path / "status.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=800,900",
                        f"--screenshot={shot}", f"{srv.url}/status/br"],
                       capture_output=True, timeout=120)
    finally:
        srv.stop()
    dom = out.stdout
    assert "Deployment br" in dom, out.stderr[-2000:]
    tags = _tags(dom)
    assert sum(1 for t, a in tags if t == "rect" and a.get("class") == "bar") == 2
    assert [a["data-name"] for t, a in tags if t == "polyline"] == ["contiguous (no placement)"]
    assert shot.exists() and shot.stat().st_size > 5000  # the browser painted the page

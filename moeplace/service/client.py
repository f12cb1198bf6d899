"""``Client``: what a serving stack calls to push statistics to and pull placements from
``moeplace serve`` (httpx, synchronous).

Every call raises ``ServiceError`` (a ``MoeplaceError``) with the service's one-line message on
a 4xx/5xx answer or when the service cannot be reached, so callers handle one exception type.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from moeplace.errors import MissingDependencyError, MoeplaceError


class ServiceError(MoeplaceError):
    """The service refused a request (``status`` is the HTTP code) or could not be reached (0)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"service answered {status}: {message}" if status else message)


class Client:
    """A connection to one placement service.

    ``token`` defaults to ``$MOEPLACE_TOKEN``. ``timeout`` bounds every request (seconds).
    """

    def __init__(self, url: str = "http://127.0.0.1:8750", token: str | None = None,
                 timeout: float = 30.0) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingDependencyError("httpx", "the service client", "service") from None
        token = token if token is not None else os.environ.get("MOEPLACE_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServiceError(0, f"cannot reach the service at {self.url} ({type(exc).__name__}: "
                               f"{exc})") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise ServiceError(r.status_code, " ".join(str(msg).split())[:500])
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # ---- API --------------------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def create_deployment(self, name: str, *, num_layers: int, num_experts: int, top_k: int,
                          num_gpus: int, num_nodes: int = 1, replicas: int = 0,
                          moe_layer_ids: list[int] | None = None,
                          num_hidden_layers: int | None = None, engine: str = "sglang",
                          model: str = "", expert_bytes: int | None = None) -> dict[str, Any]:
        body = {"name": name, "num_layers": num_layers, "num_experts": num_experts,
                "top_k": top_k, "moe_layer_ids": moe_layer_ids,
                "num_hidden_layers": num_hidden_layers, "engine": engine, "model": model,
                "expert_bytes": expert_bytes,
                "cluster": {"num_gpus": num_gpus, "num_nodes": num_nodes, "replicas": replicas}}
        return self._json("POST", "/v1/deployments", json=body)

    def deployments(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/deployments")["deployments"]

    def deployment(self, dep: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/deployments/{dep}")

    def push_stats(self, dep: str, data: bytes | str | os.PathLike[str],
                   batch_id: str | None = None, retries: int = 3) -> dict[str, Any]:
        """Upload a statistics file (bytes or a path). ``batch_id`` defaults to the content's
        SHA-256, so pushing the same file twice counts it once. Retries on connection errors
        and 5xx answers reuse the batch id: the service counts the batch once."""
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        bid = batch_id or hashlib.sha256(body).hexdigest()
        for attempt in range(retries + 1):
            try:
                return self._json("POST", f"/v1/deployments/{dep}/stats",
                                  params={"batch_id": bid}, content=body,
                                  headers={"Content-Type": "application/octet-stream"})
            except ServiceError as exc:
                if (exc.status and exc.status < 500) or attempt == retries:
                    raise
                time.sleep(min(2.0, 0.2 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def stats(self, dep: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/deployments/{dep}/stats")

    def solve(self, dep: str, time_limit: float = 60.0, method: str = "auto",
              replicas: int | None = None, current: bool = False,
              weights: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"time_limit": float(time_limit), "method": method,
                                "current": current}
        if replicas is not None:
            body["replicas"] = replicas
        if weights:
            body["weights"] = weights
        return self._json("POST", f"/v1/deployments/{dep}/solve", json=body)

    def job(self, job: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job}")

    def cancel(self, job: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/jobs/{job}")

    def wait(self, job: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job leaves queued/running; ``ServiceError`` after ``timeout`` s."""
        end = time.monotonic() + timeout
        while True:
            j = self.job(job)
            if j["state"] not in ("queued", "running"):
                return j
            if time.monotonic() > end:
                raise ServiceError(0, f"job {job} still {j['state']} after {timeout:g} s")
            time.sleep(poll)

    def placement(self, dep: str, version: int | str = "latest", format: str = "moeplace"
                  ) -> tuple[int, bytes]:
        """``(version, file bytes)`` of a placement in a serving stack's format."""
        r = self._request("GET", f"/v1/deployments/{dep}/placements/{version}",
                          params={"format": format})
        return int(r.headers["X-Moeplace-Version"]), r.content

    def placements(self, dep: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/deployments/{dep}/placements")

    def set_current(self, dep: str, version: int | str) -> dict[str, Any]:
        return self._json("POST", f"/v1/deployments/{dep}/placements/{version}/current")

    def drift(self, dep: str, threshold: float | None = None, method: str | None = None
              ) -> dict[str, Any]:
        params = {k: v for k, v in (("threshold", threshold), ("method", method)) if v is not None}
        return self._json("GET", f"/v1/deployments/{dep}/drift", params=params)

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

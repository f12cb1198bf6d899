"""The placement service's HTTP API (FastAPI): deployments, statistics, solves, placements, drift.

``create_app(data_dir, token=None)`` builds the app; ``moeplace serve`` runs it on uvicorn.
Everything under ``/v1`` answers errors as ``{"error": "<one line>"}``: 400 malformed JSON,
401 no or wrong token, 404 unknown ids or routes, 409 conflicts with stored state, 413 bodies over
the cap, 422 well-formed requests that fail validation (wrong shapes, foreign files). A 5xx
means a bug in the service, never bad input.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeplace._validate import MAX_EXPERTS, MAX_GPUS, MAX_LAYERS, MAX_TOP_K
from moeplace.errors import InputError, MoeplaceError
from moeplace.placement.exports import FORMATS
from moeplace.service.jobs import GRACE_S, MAX_TIME_LIMIT, JobManager
from moeplace.service.store import Conflict, NotFound, Policy, Store
from moeplace.solvers.objective import ENGINES as _ENGINES
from moeplace.solvers.solve import METHODS

log = logging.getLogger("moeplace.service")

DEFAULT_MAX_UPLOAD = 256 << 20  # DeepSeek-V3 statistics with transitions: tens of MB
DEFAULT_MAX_JSON = 1 << 20
EXPORT_FORMATS = ("moeplace", *FORMATS)
SOLVE_METHODS = METHODS
ENGINES = _ENGINES
DRIFT_METHODS = ("eplb", "eplb-distinct", "search", "online")
DRIFT_THRESHOLD = 0.05


# ---- request models ----------------------------------------------------------------------------
class ClusterIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    num_gpus: int = Field(ge=1, le=MAX_GPUS)
    num_nodes: int = Field(1, ge=1, le=MAX_GPUS)
    replicas: int = Field(0, ge=0, le=MAX_EXPERTS)


class DeploymentIn(BaseModel):
    """A serving deployment: the model's MoE shape and the cluster it runs on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, description="becomes the id")
    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="MoE layers")
    num_experts: int = Field(ge=1, le=MAX_EXPERTS, description="routed experts per layer")
    top_k: int = Field(ge=1, le=MAX_TOP_K)
    moe_layer_ids: list[Annotated[int, Field(ge=0, le=MAX_LAYERS)]] | None = Field(
        None, max_length=MAX_LAYERS, description="hidden-layer id of each MoE layer "
        "(default 0..num_layers-1)")
    num_hidden_layers: int | None = Field(None, ge=1, le=MAX_LAYERS + 1)
    cluster: ClusterIn
    engine: str = Field("sglang", max_length=32)
    model: str = Field("", max_length=200)
    expert_bytes: int | None = Field(None, ge=0, le=1 << 40,
                                     description="bytes of one expert's weights (migration cost)")
    model_shape: str | None = Field(None, max_length=40, description="bundled model shape for "
                                    "simulated speedups (default: guessed from `model`)")
    hardware: str = Field("h100-nvlink", max_length=40, description="bundled hardware profile")


class SolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    time_limit: float = Field(60.0, gt=0, le=MAX_TIME_LIMIT, allow_inf_nan=False)
    method: Literal[SOLVE_METHODS] = "auto"  # type: ignore[valid-type]
    engine: Literal[ENGINES] = Field("sglang", description="engine the placement is for: its "  # type: ignore[valid-type]
                                     "traffic objective (exflow: cross-layer pairs)")
    replicas: int | None = Field(None, ge=0, le=MAX_EXPERTS)
    current: bool = Field(False, description="start from / charge migration against the "
                          "placement marked current")
    weights: str | None = Field(None, max_length=200, description="e.g. load=1,traffic=1")
    seed: int = Field(0, ge=0, le=2**32 - 1)


# ---- middleware: auth and body cap, before any body is read ----------------------------------
class _Gate:
    """Pure ASGI: 401 for protected paths without the token, 413 for bodies over the cap."""

    def __init__(self, app: Any, token: str | None, max_upload: int, max_json: int,
                 metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None
        self.max_upload = max_upload
        self.max_json = max_json

    def _authorized(self, auth: bytes) -> bool:
        """``Bearer <token>``, or (for browsers on the status page) HTTP Basic with the token as
        the password; compared in constant time."""
        assert self.token is not None
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(given.strip(), self.token)
        if scheme.lower() == b"basic":
            try:
                _, _, password = base64.b64decode(given.strip(), validate=True).partition(b":")
            except (ValueError, binascii.Error):
                return False
            return hmac.compare_digest(password, self.token)
        return False

    @staticmethod
    async def _reply(send: Any, status: int, msg: str, headers: list[Any] | None = None) -> None:
        body = json.dumps({"error": msg}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope.get("headers") or [])
        if self.token is not None and (path.startswith(("/v1", "/status")) or path == "/metrics"):
            if not self._authorized(headers.get(b"authorization", b"")):
                challenge = b'Basic realm="moeplace"' if path.startswith("/status") else b"Bearer"
                await self._reply(send, 401, "missing or wrong bearer token (Authorization: "
                                  "Bearer <token>)", [(b"www-authenticate", challenge)])
                return
        cap = (self.max_upload if scope["method"] == "POST" and path.endswith("/stats")
               else self.max_json)
        cl = headers.get(b"content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > cap):
            await self._reply(send, 413 if cl.isdigit() else 400,
                              f"request body over the {cap} byte cap" if cl.isdigit()
                              else "malformed Content-Length")
            return
        # Buffer the body (within the cap) so chunked bodies are capped too, then replay it.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > cap:
                await self._reply(send, 413, f"request body over the {cap} byte cap")
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        del chunks  # the joined copy is all the request needs; do not hold the body twice
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if self.metrics is None:
            await self.app(scope, replay, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(msg: Any) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, replay, send_status)
        finally:
            route = scope.get("route")
            self.metrics.request(scope["method"], getattr(route, "path", "unmatched"), status,
                                 time.perf_counter() - t0)


def _one_line(text: object, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return 400, "malformed JSON body"
    e = errs[0] if errs else {}
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return 422, _one_line(f"{loc}: {e.get('msg', 'invalid')}{more}")


BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Process-lifetime counters (durable totals come from the store)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.duplicates = 0
        self.rejected = 0
        self.solve_seconds: dict[str, list[float]] = {}  # state -> [sum, count]
        # (method, route template, status class) -> [bucket counts..., +Inf, sum]
        self.requests: dict[tuple[str, str, str], list[float]] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, f"{status // 100}xx")
        with self.lock:
            h = self.requests.setdefault(key, [0.0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[len(BUCKETS)] += 1
            h[len(BUCKETS) + 1] += seconds

    def request_lines(self) -> list[str]:
        lines = ["# HELP moeplace_request_seconds HTTP request latency by route (since start).",
                 "# TYPE moeplace_request_seconds histogram"]
        with self.lock:
            items = sorted((k, list(v)) for k, v in self.requests.items())
        for (method, route, code), h in items:
            lab = f'method="{method}",route="{route}",status="{code}"'
            for i, b in enumerate(BUCKETS):
                lines.append(f'moeplace_request_seconds_bucket{{{lab},le="{b:g}"}} {int(h[i])}')
            lines.append(f'moeplace_request_seconds_bucket{{{lab},le="+Inf"}} '
                         f'{int(h[len(BUCKETS)])}')
            lines.append(f"moeplace_request_seconds_sum{{{lab}}} {h[len(BUCKETS) + 1]:.6f}")
            lines.append(f"moeplace_request_seconds_count{{{lab}}} {int(h[len(BUCKETS)])}")
        return lines

    def solved(self, job: str, state: str, seconds: float) -> None:
        with self.lock:
            s = self.solve_seconds.setdefault(state, [0.0, 0])
            s[0] += seconds
            s[1] += 1


# ---- the app --------------------------------------------------------------------------------------
def create_app(data_dir: str | Path, token: str | None = None, *, policy: Policy | None = None,
               max_upload: int = DEFAULT_MAX_UPLOAD, max_json: int = DEFAULT_MAX_JSON,
               max_workers: int = 1, job_grace_s: float = GRACE_S, upload_concurrency: int = 2,
               clock: Any = time.time, opened_store: Store | None = None,
               resolve_every: float | None = None, resolve_time_limit: float = 60.0) -> FastAPI:
    """The service over ``data_dir`` (created if missing). ``token`` set: every ``/v1`` call and
    ``/metrics`` need ``Authorization: Bearer <token>``; ``/healthz`` stays open.
    ``max_workers`` solve jobs run at once (0: jobs queue but none starts); a job's worker is
    killed ``job_grace_s`` after its time limit. ``opened_store``: an already opened ``Store`` of
    ``data_dir`` (``moeplace serve`` opens it first, so a bad data directory is one line).
    ``resolve_every``: seconds between scheduled re-solves of deployments with new uploads
    (each with ``resolve_time_limit``); None: only on request."""
    state: dict[str, Any] = {}
    metrics = Metrics()
    opened = [opened_store] if opened_store is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        st = opened.pop() if opened else Store(data_dir, policy or Policy(), clock)
        state["store"] = st
        state["jobs"] = JobManager(st, max_workers=max_workers, grace_s=job_grace_s,
                                   on_finish=metrics.solved, resolve_every=resolve_every,
                                   resolve_time_limit=resolve_time_limit)
        app.state.store, app.state.jobs = st, state["jobs"]  # for embedding and tests
        try:
            yield
        finally:
            state["jobs"].stop()
            st.close()

    app = FastAPI(title="moeplace placement service", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(_Gate, token=token, max_upload=max_upload, max_json=max_json,
                       metrics=metrics)
    exports: OrderedDict[tuple[str, int, str], tuple[bytes, str, str]] = OrderedDict()
    placements: OrderedDict[tuple[str, int], Any] = OrderedDict()  # parsed, LRU
    cache_lock = threading.Lock()

    def store() -> Store:
        return state["store"]

    def jobs() -> JobManager:
        return state["jobs"]

    # ---- errors ------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, msg = _validation_message(exc)
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": _one_line(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(MoeplaceError)
    async def _moeplace(request: Request, exc: MoeplaceError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 422
        if status == 422:
            metrics_reject(request)
        return JSONResponse({"error": _one_line(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the service "
                             "log"}, status_code=500)

    def metrics_reject(request: Request) -> None:
        if request.url.path.endswith("/stats"):
            with metrics.lock:
                metrics.rejected += 1

    # ---- open ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: answers without a token."""
        return {"status": "ok"}

    # ---- deployments ------------------------------------------------------------------------------
    @app.post("/v1/deployments", status_code=201)
    def create_deployment(body: DeploymentIn) -> dict[str, Any]:
        spec = body.model_dump()
        if spec["moe_layer_ids"] is None:
            spec["moe_layer_ids"] = list(range(spec["num_layers"]))
        return store().create_deployment(spec)

    @app.get("/v1/deployments")
    def list_deployments() -> dict[str, Any]:
        return {"deployments": store().deployments()}

    @app.get("/v1/deployments/{dep}")
    def get_deployment(dep: str) -> dict[str, Any]:
        return store().deployment(dep)

    # ---- statistics -------------------------------------------------------------------------------
    @app.post("/v1/deployments/{dep}/stats")
    async def upload_stats(dep: str, request: Request,
                           batch_id: Annotated[str, Query(min_length=1, max_length=200)]
                           ) -> dict[str, Any]:
        """Body: a ``moeplace stats`` .npz or a Parquet trace shard. Stored durably before the
        answer; counted once per ``batch_id`` (a retry answers ``duplicate: true``)."""
        body = await request.body()
        if not body:
            raise InputError("upload", "body", "is empty", "send the statistics file as the body")
        # Few uploads validate at once: with many, reads (GET placements) queue behind them for
        # the interpreter lock; the others wait here, on the event loop, at no cost.
        if "upload_gate" not in state:
            state["upload_gate"] = asyncio.Semaphore(upload_concurrency)
        async with state["upload_gate"]:
            res = await run_in_threadpool(store().add_batch, dep, batch_id, body)
        if res["duplicate"]:
            with metrics.lock:
                metrics.duplicates += 1
        return res

    @app.get("/v1/deployments/{dep}/stats")
    def get_stats(dep: str) -> dict[str, Any]:
        return store().stats_summary(dep)

    # ---- solves -------------------------------------------------------------------------------------
    @app.post("/v1/deployments/{dep}/solve", status_code=202)
    def solve(dep: str, body: SolveIn) -> dict[str, Any]:
        return jobs().submit(dep, body.model_dump())

    @app.get("/v1/jobs/{job}")
    def get_job(job: str) -> dict[str, Any]:
        return jobs().get(job)

    @app.delete("/v1/jobs/{job}")
    def cancel_job(job: str) -> dict[str, Any]:
        return jobs().cancel(job)

    # ---- placements ---------------------------------------------------------------------------------
    def load_placement(dep: str, version: int) -> Any:
        from moeplace.placement import Placement

        key = (dep, version)
        with cache_lock:
            hit = placements.get(key)
            if hit is not None:
                placements.move_to_end(key)
        if hit is None:
            hit = Placement.load(store().placement_path(dep, version))
            with cache_lock:
                placements[key] = hit
                while len(placements) > 64:
                    placements.popitem(last=False)
        return hit

    def render(dep: str, version: int, fmt: str) -> tuple[bytes, str, str]:
        key = (dep, version, fmt)
        with cache_lock:
            if key in exports:
                exports.move_to_end(key)
                return exports[key]
        spec = store().spec(dep)
        if fmt == "moeplace":
            out = (store().placement_path(dep, version).read_bytes(), "application/json", "json")
        else:
            from moeplace.placement import export_placement

            plc = load_placement(dep, version)
            load = None
            if fmt == "sglang-logical-count":
                recent = store().recent_load(dep)
                if recent is None:
                    raise Conflict(f"deployment {dep!r} has no recent statistics to count")
                load = recent.load
            ext = {"trtllm": "yaml", "eplb": "npz"}.get(fmt, "json")
            with tempfile.TemporaryDirectory(prefix="moeplace-export-") as d:
                path = Path(d) / f"placement.{ext}"
                export_placement(plc, fmt, path, num_hidden_layers=spec.get("num_hidden_layers"),
                                 moe_layer_ids=spec["moe_layer_ids"], load=load)
                data = path.read_bytes()
            media = {"yaml": "application/yaml", "npz": "application/octet-stream"}.get(
                ext, "application/json")
            out = (data, media, ext)
        if fmt != "sglang-logical-count":  # the others never change for a version
            with cache_lock:
                exports[key] = out
                while len(exports) > 256:
                    exports.popitem(last=False)
        return out

    @app.get("/v1/deployments/{dep}/placements")
    def list_placements(dep: str) -> dict[str, Any]:
        return {"deployment": dep, "current_version": store().current_version(dep),
                "placements": store().placements(dep)}

    @app.get("/v1/deployments/{dep}/placements/{version}")
    def get_placement(dep: str, version: str,
                      format: Literal[EXPORT_FORMATS] = "moeplace") -> Response:  # type: ignore[valid-type]
        """``version``: a number, ``latest`` or ``current``; ``format``: ``moeplace`` (the
        placement JSON with its report in ``info.report``) or a serving stack's file."""
        v = store().resolve_version(dep, version)
        data, media, ext = render(dep, v, format)
        return Response(data, media_type=media, headers={
            "X-Moeplace-Version": str(v),
            "Content-Disposition": f'attachment; filename="{dep}-v{v}-{format}.{ext}"'})

    @app.post("/v1/deployments/{dep}/placements/{version}/current")
    def set_current(dep: str, version: str) -> dict[str, Any]:
        """Mark what the deployment now runs (drift and migration are measured from it)."""
        v = store().resolve_version(dep, version)
        store().set_current(dep, v)
        return {"deployment": dep, "current_version": v}

    # ---- drift ---------------------------------------------------------------------------------------
    @app.get("/v1/deployments/{dep}/drift")
    def drift(dep: str, threshold: Annotated[float, Query(ge=0, le=1)] = DRIFT_THRESHOLD,
              method: Literal[DRIFT_METHODS] = "eplb",  # type: ignore[valid-type]
              time_limit: Annotated[float, Query(gt=0, le=30)] = 5.0) -> dict[str, Any]:
        """The current placement on the recent windows against a fresh solve of them."""
        from moeplace.solvers import Cluster, evaluate_stats, migration, solve_with_report

        spec = store().spec(dep)
        cur_v = store().current_version(dep)
        if cur_v is None:
            raise Conflict(f"deployment {dep!r} has no current placement (POST "
                           ".../placements/{version}/current first)")
        stats = store().recent_load(dep)
        if stats is None:
            raise Conflict(f"deployment {dep!r} has no statistics in its recent windows")
        cur = load_placement(dep, cur_v)
        from moeplace.service.online import online_decision
        wins = [w[3] for w in store().window_loads(dep)][-store().policy.recent_windows:]
        online, online_map = online_decision(wins, cur, spec)
        if method == "online":  # the engines' policy decides, from the map served now
            fresh = online_map
            rep = SimpleNamespace(method="online", status="ok", seconds=online["cpu_s"])
        else:
            cluster = Cluster(cur.num_gpus, cur.num_nodes, cur.num_replicas)
            fresh, rep = solve_with_report(stats, cluster, method=method, time_limit=time_limit)
        now = evaluate_stats(stats, cur)["load_imbalance_mean"]
        new = evaluate_stats(stats, fresh)["load_imbalance_mean"]
        gain = (now - new) / now if now > 0 else 0.0
        mig = migration(fresh, cur, spec.get("expert_bytes") or 0)
        summary = store().stats_summary(dep)
        return {
            "deployment": dep, "current_version": cur_v,
            "windows": summary["recent_windows"], "tokens": stats.num_tokens,
            "current": {"load_imbalance_mean": now},
            "fresh": {"load_imbalance_mean": new, "method": rep.method, "status": rep.status,
                      "seconds": rep.seconds},
            "expected_gain": gain,
            "migration": {**mig, "bytes_known": bool(spec.get("expert_bytes"))},
            "threshold": threshold,
            "recommendation": (online["recommendation"] if method == "online"
                               else "rebalance" if gain >= threshold else "keep"),
            "rule": ("the online policy's decision (moves that pay back their copies with "
                     "confidence; threshold unused)" if method == "online" else
                     "rebalance when the fresh placement lowers load_imbalance_mean on the recent "
                     "windows by at least `threshold` (relative); otherwise keep"),
            "online": online,
        }

    # ---- status page ----------------------------------------------------------------------------------
    @app.get("/status/{dep}", response_class=HTMLResponse)
    def status_page(dep: str) -> str:
        """Server-rendered HTML: traffic and load imbalance over the retained windows, and the
        placement versions. Browsers authenticate with HTTP Basic (any user, the token)."""
        from moeplace.placement import contiguous
        from moeplace.service.status import render_status
        from moeplace.solvers import evaluate_stats
        from moeplace.traces import RoutingStats

        s = store()
        d = s.deployment(dep)
        c = d["cluster"]
        wins = s.window_loads(dep)
        meta = s.meta(dep)
        base = contiguous(d["num_layers"], d["num_experts"], c["num_gpus"], c["num_nodes"],
                          replicas=c["replicas"])
        cur = (load_placement(dep, d["current_version"]) if d["current_version"] is not None
               else None)

        def imb(plc: Any, tokens: int, load: Any) -> float:
            return evaluate_stats(RoutingStats(meta, tokens, load), plc)["load_imbalance_mean"]

        windows = [{"window": w, "start": w * s.policy.window_seconds, "tokens": t, "batches": b}
                   for w, t, b, _ in wins]
        return render_status(d, windows, s.placements(dep),
                             None if cur is None else [imb(cur, t, ld) for _, t, _, ld in wins],
                             [imb(base, t, ld) for _, t, _, ld in wins])

    # ---- metrics --------------------------------------------------------------------------------------
    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        from moeplace.solvers import evaluate_stats

        s = store()
        lines = ["# HELP moeplace_uploads_total Statistics uploads accepted (counted once per "
                 "batch id).", "# TYPE moeplace_uploads_total counter"]
        totals = s.totals()
        for dep in sorted(totals):
            lines.append(f'moeplace_uploads_total{{deployment="{dep}"}} {totals[dep]["uploads"]}')
        lines += ["# HELP moeplace_tokens_total Tokens in accepted uploads.",
                  "# TYPE moeplace_tokens_total counter"]
        for dep in sorted(totals):
            lines.append(f'moeplace_tokens_total{{deployment="{dep}"}} {totals[dep]["tokens"]}')
        with metrics.lock:
            dup, rej = metrics.duplicates, metrics.rejected
            solve_s = {k: list(v) for k, v in metrics.solve_seconds.items()}
        lines += ["# HELP moeplace_upload_duplicates_total Retried uploads not counted again "
                  "(since start).", "# TYPE moeplace_upload_duplicates_total counter",
                  f"moeplace_upload_duplicates_total {dup}",
                  "# HELP moeplace_upload_rejected_total Uploads refused as invalid (since start).",
                  "# TYPE moeplace_upload_rejected_total counter",
                  f"moeplace_upload_rejected_total {rej}",
                  "# HELP moeplace_jobs Solve jobs by state.", "# TYPE moeplace_jobs gauge"]
        for st, n in jobs().counts().items():
            lines.append(f'moeplace_jobs{{state="{st}"}} {n}')
        lines += ["# HELP moeplace_solve_seconds Wall time of finished solve jobs (since start).",
                  "# TYPE moeplace_solve_seconds summary"]
        for st in sorted(solve_s):
            lines.append(f'moeplace_solve_seconds_sum{{state="{st}"}} {solve_s[st][0]:.6f}')
            lines.append(f'moeplace_solve_seconds_count{{state="{st}"}} {int(solve_s[st][1])}')
        lines += ["# HELP moeplace_load_imbalance Current placement's load_imbalance_mean on the "
                  "recent windows.", "# TYPE moeplace_load_imbalance gauge"]
        for d in s.deployments():
            v = d["current_version"]
            recent = s.recent_load(d["id"]) if v is not None else None
            if recent is not None:
                imb = evaluate_stats(recent, load_placement(d["id"], v))["load_imbalance_mean"]
                lines.append(f'moeplace_load_imbalance{{deployment="{d["id"]}"}} {imb:.6f}')
        return "\n".join(lines + metrics.request_lines()) + "\n"

    return app

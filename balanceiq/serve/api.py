"""The HTTP API and dashboard (FastAPI), a thin layer over :class:`ControlPlane`. Reads are open (the
dashboard polls them); changes need ``Authorization: Bearer <token>``. A refusal from the plane (a
BalanceIQError) leaves as JSON naming what was wrong, and nothing has changed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from balanceiq.exceptions import BalanceIQError, ControlError, PolicyError, UnknownClusterError
from balanceiq.serve.health import status as health_status
from balanceiq.serve.plane import ApiMetrics, ControlPlane
from balanceiq.serve.timeline import timeline

STATIC = Path(__file__).resolve().parent / "static"
ADDRESS_MAX = 300
# A 422 names what is wrong, never echoes the input (it may be huge or not encodable as
# JSON, like NaN), and stays small: the first few problems, each location clipped.
MAX_PROBLEMS = 10
LOC_PART_MAX = 40
MSG_MAX = 200

_CLUSTER_DOC = "The cluster to read or change; the first configured one if omitted."
ClusterQuery = Annotated[str | None, Query(min_length=1, max_length=200, description=_CLUSTER_DOC)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class WeightChange(_Body):
    """Pin, drain, set or clear one endpoint's override."""

    address: str = Field(max_length=ADDRESS_MAX, description="Endpoint host:port as in the config.")
    action: Literal["pin", "drain", "set", "clear"] = Field(
        description="pin: freeze its current share; drain: no new traffic; set: fixed weight; clear: remove."
    )
    weight: int | None = Field(default=None, ge=1, le=10000, description="For set: weight out of 10,000.")
    ttl_s: float | None = Field(
        default=None, gt=0, le=30 * 86400, description="Expiry in seconds; none: until cleared."
    )
    reason: str = Field(default="", max_length=200, description="Shown in the status and the decision log.")


class RewardWeightsBody(_Body):
    latency: float | None = Field(default=None, ge=0, le=1000)
    tail: float | None = Field(default=None, ge=0, le=1000)
    errors: float | None = Field(default=None, ge=0, le=1000)
    cost: float | None = Field(default=None, ge=0, le=1000)
    ref_cost: float | None = Field(default=None, gt=0, le=1e6)


class GuardrailsBody(_Body):
    min_share: float | None = Field(default=None, ge=0, lt=0.5)
    max_shift: float | None = Field(default=None, gt=0, le=1)
    rollback_after: int | None = Field(default=None, ge=1, le=1000)
    rollback_margin: float | None = Field(default=None, ge=0, le=10)
    probation_after: int | None = Field(default=None, ge=1, le=10000)
    baseline: Literal["equal", "static", "cost_aware", "inverse_latency", "least_request"] | None = None


class PolicyChange(_Body):
    """Any subset; all of it applies, or none of it if one value is refused."""

    k: int | None = Field(default=None, ge=1, le=10000, description="Critical endpoints per decision.")
    interval_s: float | None = Field(default=None, ge=0.2, le=3600, description="Seconds between decisions.")
    slo_ms: float | None = Field(default=None, ge=1, le=600000, description="Latency SLO of the reward (ms).")
    reward_weights: RewardWeightsBody | None = None
    cost_weight: float | None = Field(default=None, ge=0, le=100, description="LP cost term weight.")
    util_target: float | None = Field(default=None, ge=0, le=1, description="Utilisation the LP treats as free.")
    latency_weight: float | None = Field(default=None, ge=0, le=100, description="Weight of the LP's latency term.")
    selection: Literal["sample", "greedy"] | None = Field(default=None, description="How critical endpoints are drawn.")
    control_mode: Literal["active", "shadow"] | None = Field(
        default=None, description="active: steer Envoy; shadow: decide and record, push nothing."
    )
    costs: dict[Annotated[str, Field(max_length=ADDRESS_MAX)], Annotated[float, Field(ge=0, le=1e9)]] | None = Field(
        default=None, description="$ per million requests by endpoint (e.g. a cloud got dearer)."
    )
    guardrails: GuardrailsBody | None = None
    checkpoint: str | None = Field(default=None, max_length=4096, description="Hot-swap the policy checkpoint.")


class EndpointIn(_Body):
    """One endpoint's observation, as ``/api/weights`` reports it; unknown fields are null."""

    address: str = Field(max_length=ADDRESS_MAX)
    p50_ms: float | None = Field(default=None, ge=0, le=1e7)
    p95_ms: float | None = Field(default=None, ge=0, le=1e7)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    saturation: float | None = Field(default=None, ge=0, le=1e6)
    inflight: float | None = Field(default=None, ge=0, le=1e9)
    rps: float | None = Field(default=None, ge=0, le=1e9)
    cost_per_million: float | None = Field(default=None, ge=0, le=1e9)
    weight: float | None = Field(default=None, ge=0, le=2**32)
    healthy: bool | None = None
    capacity_rps: float | None = Field(default=None, gt=0, le=1e9)


class ScoreRequest(_Body):
    """Ask the serving policy which endpoints it would re-optimise (nothing is applied)."""

    endpoints: list[EndpointIn] = Field(min_length=1, max_length=1000)
    k: int | None = Field(default=None, ge=1, le=1000, description="Critical endpoints wanted (default ~20% of N).")


class LiveEvalRequest(_Body):
    """A live testbed evaluation beside the simulated one (a private testbed on this host;
    never the fleet's traffic). Unset fields take the defaults of
    ``balanceiq.testbed.evaluate_live.DEFAULT_LIVE_EVAL``."""

    scenario: str | None = Field(
        default=None,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="A shipped live scenario by name (default degrade_and_dearer).",
    )
    decision_interval_s: float | None = Field(default=None, ge=0.5, le=60)
    episode_steps: int | None = Field(default=None, ge=2, le=500)
    scenario_speed: float | None = Field(default=None, gt=0, le=1000)
    load_rps: float | None = Field(default=None, gt=0, le=1000)
    episodes: int = Field(default=2, ge=1, le=20, description="Paired episodes per checkpoint.")


class TrainRequest(_Body):
    iterations: int = Field(default=20, ge=1, le=10000)
    scenarios: list[Annotated[str, Field(max_length=200)]] | None = Field(default=None, max_length=50)
    num_env_runners: int = Field(default=1, ge=0, le=64)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    evaluate: bool = Field(default=True, description="Compare with the serving checkpoint on every shipped scenario.")
    promote: bool = Field(default=True, description="Hot-swap the Policy deployment if the new one is better.")
    eval_seeds: int = Field(default=1, ge=1, le=20, description="Seeds per simulated scenario.")
    live_eval: LiveEvalRequest | None = Field(default=None, description="Also evaluate both checkpoints live.")


_bearer = HTTPBearer(auto_error=False, description="The API token (config api.token or state_dir/api-token).")
# Checked in order: an unknown cluster is a ControlError too. Bad input is the caller's
# (400/404/409); anything else means a dependency is down (503).
_ERROR_CODES = ((UnknownClusterError, 404), (PolicyError, 400), (ControlError, 409))
_MUTATES: dict[str, Any] = {"responses": {401: {"description": "no or wrong token"}}}


class _TooLarge(Exception):
    pass


class _Edge:
    """ASGI middleware (pure: no extra task per request). Counts every response by method, route
    template and status (a handler that raises counts as its 500), and answers 413 to a body over
    ``limit`` bytes before it is read whole, whether it declares its length or streams it."""

    def __init__(self, app: Any, metrics: ApiMetrics, limit: int) -> None:
        self.app = app
        self.metrics = metrics
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        declared = dict(scope.get("headers") or ()).get(b"content-length")
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                raise _TooLarge
            await self.app(scope, counted, record)
        except _TooLarge:
            if status is None:
                detail = f"request body larger than {self.limit} bytes (api.max_body_bytes)"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.responses.labels(scope.get("method", ""), route, str(status or 500)).inc()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = [
            {
                "loc": [p if isinstance(p, int) else str(p)[:LOC_PART_MAX] for p in err.get("loc", ())][:8],
                "msg": str(err.get("msg", ""))[:MSG_MAX],
                "type": str(err.get("type", ""))[:60],
            }
            for err in errors[:MAX_PROBLEMS]
        ]
        body: dict[str, Any] = {"detail": problems}
        if len(errors) > MAX_PROBLEMS:
            body["more"] = f"{len(errors) - MAX_PROBLEMS} more problem(s) not shown"
        return JSONResponse(body, status_code=422)

    @app.exception_handler(BalanceIQError)
    async def _refused(request: Request, exc: BalanceIQError) -> JSONResponse:
        code = next((c for kind, c in _ERROR_CODES if isinstance(exc, kind)), 503)
        return JSONResponse({"detail": str(exc)}, status_code=code)


def _add_control_routes(app: FastAPI, plane: ControlPlane, mutates: dict[str, Any]) -> None:
    @app.get("/api/clusters")
    def clusters() -> dict[str, Any]:
        """Every cluster this deployment steers; the first is the default of ``?cluster=``."""
        return {"clusters": plane.clusters(), "default": plane.controller.cluster.name}

    @app.get("/api/status")
    def status(cluster: ClusterQuery = None) -> dict[str, Any]:
        return health_status(plane, cluster)

    @app.get("/api/weights")
    def get_weights(cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.weights(cluster)

    @app.put("/api/weights", **mutates)
    def put_weights(change: WeightChange, cluster: ClusterQuery = None) -> dict[str, Any]:
        result = plane.set_override(change.address, change.action, change.weight, change.ttl_s, change.reason, cluster)
        return {"override": result, "overrides": plane.pick(result["cluster"]).overrides.to_json()}

    @app.get("/api/decisions")
    def decisions(limit: Annotated[int, Query(ge=1, le=1000)] = 20, cluster: ClusterQuery = None) -> dict[str, Any]:
        c = plane.pick(cluster)
        return {"cluster": c.cluster.name, "decisions": [d.to_json() for d in c.log.recent(limit)]}

    @app.get("/api/timeline")
    def get_timeline(limit: Annotated[int, Query(ge=2, le=1000)] = 120, cluster: ClusterQuery = None) -> dict[str, Any]:
        """Latency and cost over recent decisions, events marked, saving against equal weights."""
        return timeline(plane, limit, cluster)

    @app.get("/api/policy")
    def get_policy(cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.policy_settings(cluster)

    @app.put("/api/policy", **mutates)
    def put_policy(change: PolicyChange, cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.update_policy(change.model_dump(exclude_none=True), cluster)

    @app.post("/api/policy/score")
    def post_score(req: ScoreRequest, cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.score([e.model_dump() for e in req.endpoints], req.k, cluster)


def create_api(plane: ControlPlane) -> FastAPI:
    app = FastAPI(
        title="BalanceIQ",
        version="0.1.0",
        description="Learned, cost-aware weights for Envoy: status, weights, decisions, policy and training.",
    )
    app.add_middleware(_Edge, metrics=plane.metrics, limit=int(plane.settings.api.max_body_bytes))

    def require_token(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if not plane.authorized(cred.credentials if cred is not None else None):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    mutates = {**_MUTATES, "dependencies": [Depends(require_token)]}
    _add_error_handlers(app)

    # The original service's routes and fields.
    @app.get("/api/health", tags=["compatible"])
    def health() -> dict[str, Any]:
        return {"status": "healthy", "service": "balanceiq", "timestamp": time.time()}

    @app.get("/api/metrics/training", tags=["compatible"])
    def metrics_training() -> dict[str, Any]:
        return plane.training_metrics()

    @app.get("/api/metrics/weights", tags=["compatible"])
    def metrics_weights(cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.weight_metrics(cluster)

    @app.get("/api/metrics/all", tags=["compatible"])
    def metrics_all(cluster: ClusterQuery = None) -> dict[str, Any]:
        return plane.all_metrics(cluster)

    _add_control_routes(app, plane, mutates)

    @app.post("/api/train", status_code=202, **mutates)
    def post_train(req: TrainRequest) -> dict[str, Any]:
        if plane.training is None:
            raise ControlError("training is not available in this deployment")
        live = req.live_eval.model_dump(exclude_none=True) if req.live_eval is not None else None
        episodes = live.pop("episodes") if live is not None else 2
        args = req.model_dump(exclude={"live_eval"})
        return plane.training.start(**args, live_eval=live, live_episodes=episodes)

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(plane.metrics_exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

"""Everything the API reads or changes, behind one object the routes close over.

The HTTP layer (:mod:`balanceiq.serve.api`) stays a thin translation: it validates
bodies, checks the token and calls :class:`ControlPlane`, which owns the controller,
its loop, training runs, the policy client and the health probes. Tests build a plane
from real parts in-process (an :class:`~balanceiq.xds.server.XdsServer`, a real
Envoy and Prometheus) without Serve; the Serve deployment builds the same object.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from balanceiq.config import GuardrailConfig, Settings, critical_count, is_loopback
from balanceiq.control.controller import Controller, ControlLoop, Observer, Scorer, XdsClient
from balanceiq.control.metrics import ControllerMetrics
from balanceiq.exceptions import BalanceIQError, ControlError, GuardrailError, UnknownClusterError
from balanceiq.policy.baselines import PolicyContext, make_policy
from balanceiq.policy.decide import decide, observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.reward import RewardWeights
from balanceiq.serve.metrics import ApiMetrics
from balanceiq.serve.training import TrainingManager
from balanceiq.telemetry.observation import EndpointObservation, Observation

_OBS_FIELDS = ("p50_ms", "p95_ms", "error_rate", "saturation", "inflight", "rps", "cost_per_million", "weight")

log = logging.getLogger(__name__)

UP, DEGRADED, DOWN = "up", "degraded", "down"


def load_or_create_token(settings: Settings) -> tuple[str, Path | None, bool]:
    """``(token, file, created)``: the configured token, else the one in ``state_dir``,
    else a new one written there with mode 0600. The token itself is never logged."""
    if settings.api.token:
        return settings.api.token, None, False
    path = Path(settings.state_dir) / "api-token"
    try:
        text = path.read_text().strip()
        if len(text) >= 16:
            return text, path, False
    except OSError:
        pass
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path, True


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class PolicyClient:
    """What the plane needs from the Policy deployment (or a local model in tests), and
    the controller's own copy of the model (``local``) when the loop scores in-process:
    a reload swaps both, so the loop and the API always score with one checkpoint."""

    def __init__(
        self, info: Callable[[], dict[str, Any]], reload: Callable[[str], dict[str, Any]], local: Any | None = None
    ) -> None:
        self._info = info
        self._reload = reload
        self.local = local

    def info(self) -> dict[str, Any]:
        out = dict(self._info())
        if self.local is not None:
            mine = str(self.local.checkpoint)
            out["controller_checkpoint"] = mine
            out["in_sync"] = mine == str(out.get("checkpoint"))
        return out

    def reload(self, checkpoint: str) -> dict[str, Any]:
        """The deployment first (it refuses a bad checkpoint, changing nothing), then the
        controller's copy; if that fails, the deployment goes back to what it served."""
        before = str(self.local.checkpoint) if self.local is not None else None
        out = self._reload(checkpoint)
        if self.local is not None:
            try:
                self.local.reload(checkpoint)
            except Exception:
                self._reload(str(before))
                raise
        return out


def cluster_controllers(
    settings: Settings,
    xds: XdsClient,
    scorer: Scorer | None,
    observer: Callable[[str], Observer],
    *,
    recording: str | os.PathLike[str] | None = None,
) -> list[Controller]:
    """One controller per configured cluster, in config order, sharing the xDS client,
    the policy and one metrics registry; ``observer(name)`` gives each its telemetry. A
    recording path gets the cluster's name before its suffix from the second cluster on."""
    metrics = ControllerMetrics()
    out = []
    for i, c in enumerate(settings.clusters):
        rec = recording
        if recording is not None and i > 0:
            path = Path(recording)
            rec = path.with_name(f"{path.stem}.{c.name}{path.suffix}")
        out.append(Controller(settings, observer(c.name), xds, scorer, cluster=c.name, recording=rec, metrics=metrics))
    return out


class ControlPlane:
    """The API's view of every cluster's controller and loop; ``cluster=None`` means the
    first configured cluster, so a one-cluster deployment never has to name it."""

    def __init__(
        self,
        settings: Settings,
        controllers: Controller | Sequence[Controller],
        *,
        policy: PolicyClient | None = None,
        training: TrainingManager | None = None,
        token: str | None = None,
    ) -> None:
        self.settings = settings
        cs = [controllers] if isinstance(controllers, Controller) else list(controllers)
        if not cs:
            raise ControlError("a control plane needs at least one cluster's controller")
        self.controllers: dict[str, Controller] = {c.cluster.name: c for c in cs}
        if len(self.controllers) != len(cs):
            raise ControlError("two controllers for the same cluster")
        self.loops: dict[str, ControlLoop] = {name: ControlLoop(c) for name, c in self.controllers.items()}
        self.controller = cs[0]
        self.loop = self.loops[self.controller.cluster.name]
        self.policy = policy
        self.training = training
        # The Controller replica's own API server, when it runs one (its state, for /api/status).
        self.api_server: Callable[[], str] | None = None
        # What POST /api/policy/score asks: the Policy deployment (batched, beside the
        # loop) when set, else the controller's own scorer.
        self.api_scorer: Scorer | None = None
        self.token = token or load_or_create_token(settings)[0]
        if not is_loopback(settings.api.host):
            # Allowed (the host is set on purpose), but said once: changes need the token,
            # yet reads are open and the token itself travels in plaintext HTTP.
            log.warning(
                "API binds %s, beyond loopback: reads are unauthenticated and HTTP is not encrypted; "
                "put a TLS-terminating proxy in front (see SECURITY.md)",
                settings.api.host,
            )
        self.started_at = time.time()
        self._http = httpx.Client(timeout=1.0, trust_env=False)
        self._http_lock = threading.Lock()
        self._probe_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.metrics = ApiMetrics(self._xds_status, self._telemetry_failures)

    # -- clusters ------------------------------------------------------------------------

    def pick(self, cluster: str | None = None) -> Controller:
        """The named cluster's controller; the first configured one for ``None``."""
        if cluster is None:
            return self.controller
        c = self.controllers.get(cluster)
        if c is None:
            raise UnknownClusterError(f"unknown cluster {cluster[:80]!r}; known: {', '.join(self.controllers)}")
        return c

    def _for_address(self, address: str, cluster: str | None) -> Controller:
        """The controller of ``cluster``, else of the one cluster that has ``address``."""
        if cluster is not None or len(self.controllers) == 1:
            return self.pick(cluster)
        owners = [c for c in self.controllers.values() if address in c.endpoints]
        if len(owners) > 1:
            raise UnknownClusterError(
                f"{address!r} is in clusters {', '.join(c.cluster.name for c in owners)}: name one with ?cluster="
            )
        return owners[0] if owners else self.controller

    def _loop_states(self) -> dict[str, dict[str, Any]]:
        return {name: self._controller(c, self.loops[name]) for name, c in self.controllers.items()}

    def clusters(self, states: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every steered cluster: name, endpoints, mode and whether its loop holds the lease."""
        states = states or self._loop_states()
        out = []
        for name, c in self.controllers.items():
            comp = states[name]
            out.append(
                {
                    "cluster": name,
                    "endpoints": len(c.addresses),
                    "state": comp["state"],
                    "reason": comp["reason"],
                    "mode": c.rollback.mode,
                    "control_mode": c.policy.control_mode,
                    "holds_lease": c.holds_lease,
                    "decisions": self.loops[name].steps,
                }
            )
        return out

    def _telemetry_failures(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self.controllers.values():
            for k, v in (getattr(c.observer, "failures", None) or {}).items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def metrics_exposition(self) -> bytes:
        """Every controller's metrics (one registry when built by :func:`cluster_controllers`)
        then the API's."""
        parents = {id(c.metrics.parent): c.metrics.parent for c in self.controllers.values()}
        return b"".join(p.exposition() for p in parents.values()) + self.metrics.exposition()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        for loop in self.loops.values():
            loop.start()

    def stop(self) -> None:
        for loop in self.loops.values():
            loop.stop()
        if self.training is not None:
            self.training.shutdown()
        self._http.close()

    # -- auth ----------------------------------------------------------------------------

    def authorized(self, presented: str | None) -> bool:
        """Constant-time comparison, so response timing does not leak the token.

        Failures are counted by kind; neither token ever reaches a log or a message.
        """
        if not presented:
            self.metrics.auth_failures.labels("missing").inc()
            return False
        if hmac.compare_digest(presented.encode(), self.token.encode()):
            return True
        self.metrics.auth_failures.labels("invalid").inc()
        return False

    # -- probes --------------------------------------------------------------------------

    def _get(self, url: str) -> httpx.Response | None:
        with self._http_lock:
            try:
                return self._http.get(url)
            except httpx.HTTPError:
                return None

    def _cached(self, key: str, ttl: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        now = time.monotonic()
        hit = self._probe_cache.get(key)
        if hit and now - hit[0] < ttl:
            return hit[1]
        value = fn()
        self._probe_cache[key] = (now, value)
        return value

    def _envoy(self) -> dict[str, Any]:
        url = self.settings.envoy.admin_url.rstrip("/") + "/ready"
        r = self._get(url)
        if r is None:
            return {"state": DOWN, "reason": f"admin {url} unreachable"}
        if r.status_code == 200:
            return {"state": UP, "reason": "admin /ready: LIVE"}
        return {"state": DEGRADED, "reason": f"admin /ready answered {r.status_code}: {r.text.strip()[:60]}"}

    def _prometheus(self) -> dict[str, Any]:
        url = self.settings.prometheus.url.rstrip("/") + "/-/ready"
        r = self._get(url)
        fallback = any(
            c.last_observation is not None and c.last_observation.source == "envoy-admin"
            for c in self.controllers.values()
        )
        if r is None or r.status_code != 200:
            why = "unreachable" if r is None else f"answered {r.status_code}"
            note = "; telemetry uses Envoy's admin" if fallback else ""
            return {"state": DOWN, "reason": f"{url} {why}{note}"}
        if fallback:
            return {"state": DEGRADED, "reason": "ready, but the last observation came from the Envoy fallback"}
        return {"state": UP, "reason": "ready; observations from Prometheus"}

    def _xds_status(self) -> dict[str, Any]:
        """The xDS server's status, at most once a second (``/metrics`` and the status
        page both read it; the server may be a remote actor)."""

        def fetch() -> dict[str, Any]:
            try:
                return dict(self.controller.xds.status())
            except BalanceIQError:
                return {}

        return self._cached("xds_status", 1.0, fetch)

    def _xds(self) -> dict[str, Any]:
        try:
            status = self.controller.xds.status()
        except BalanceIQError as exc:
            return {"state": DOWN, "reason": str(exc)}
        nodes = status.get("nodes", [])
        connected = [n for n in nodes if n.get("connected")]
        if not connected:
            return {"state": DEGRADED, "reason": "serving, but no Envoy is connected", "version": status.get("version")}
        nacked = [
            n
            for n in connected
            if n.get("last_nacked_version") and n.get("last_nacked_version") == status.get("version")
        ]
        if nacked:
            return {
                "state": DEGRADED,
                "reason": f"Envoy rejected version {status.get('version')}: {nacked[0].get('last_error')}",
            }
        return {
            "state": UP,
            "reason": f"{len(connected)} Envoy node(s) connected, version {status.get('version')}",
            "version": status.get("version"),
        }

    def _policy(self) -> dict[str, Any]:
        states = [c.policy_state for c in self.controllers.values()]
        st = next((x for x in states if x.get("ok") is False), states[0])
        info: dict[str, Any] = {}
        if self.policy is not None:
            try:
                info = self.policy.info()
            except Exception as exc:  # a remote deployment: anything may come back
                return {"state": DOWN, "reason": f"policy deployment unavailable: {type(exc).__name__}"}
        elif self.controller.scorer is None:
            return {"state": DOWN, "reason": "no policy configured: the baseline decides"}
        if st.get("ok") is False:
            return {"state": DEGRADED, "reason": f"last call failed: {st.get('error')}", **info}
        if info.get("in_sync") is False:
            return {
                "state": DEGRADED,
                "reason": f"the loop scores with {info.get('controller_checkpoint')}, the "
                f"deployment serves {info.get('checkpoint')}",
                **info,
            }
        lat = st.get("latency_ms")
        where = " in the controller" if "controller_checkpoint" in info else ""
        why = f"checkpoint {info.get('checkpoint', '?')}" + (
            f", last scoring{where} {lat:.1f} ms" if lat is not None else ""
        )
        return {"state": UP, "reason": why, **info}

    def _controller(self, c: Controller, loop: ControlLoop) -> dict[str, Any]:
        interval = c.policy.interval_s
        if not loop.running:
            return {"state": DOWN, "reason": "control loop not running"}
        if loop.last_tick is None:
            return {"state": DEGRADED, "reason": "starting: no decision yet"}
        age = time.time() - loop.last_tick
        if age > 3 * interval + 5:
            return {"state": DOWN, "reason": f"last decision {age:.0f}s ago (interval {interval}s)"}
        last = c.log.last()
        if c.policy.control_mode == "shadow":
            return {"state": UP, "reason": f"shadow: {loop.steps} decisions recorded, none pushed"}
        if not c.holds_lease:
            return {"state": DEGRADED, "reason": f"standby: lease held by {c.lease.get('holder') or 'nobody yet'}"}
        if last is not None and last.error:
            return {"state": DEGRADED, "reason": last.error}
        if last is not None and last.mode == "hold":
            return {"state": DEGRADED, "reason": last.notes[0] if last.notes else "holding weights"}
        return {"state": UP, "reason": f"active, {loop.steps} decisions, mode {c.rollback.mode}"}

    @staticmethod
    def _controllers(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The worst cluster's loop (each named when there are several)."""
        rank = {UP: 0, DEGRADED: 1, DOWN: 2}
        if len(per) == 1:
            return next(iter(per.values()))
        name, worst = max(per.items(), key=lambda kv: rank[kv[1]["state"]])
        if worst["state"] == UP:
            return {
                "state": UP,
                "reason": f"{len(per)} clusters steered: " + "; ".join(f"{n}: {v['reason']}" for n, v in per.items()),
            }
        return {**worst, "reason": f"cluster {name}: {worst['reason']}"}

    def status(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        loops = self._loop_states()
        comps = {
            "controller": self._controllers(loops),
            "policy": self._cached("policy", 1.0, self._policy),
            "xds": self._cached("xds", 1.0, self._xds),
            "envoy": self._cached("envoy", 1.0, self._envoy),
            "prometheus": self._cached("prometheus", 1.0, self._prometheus),
        }
        states = [v["state"] for v in comps.values()]
        critical = [comps[k]["state"] for k in ("controller", "xds", "envoy")]
        overall = DOWN if DOWN in critical else (UP if all(s == UP for s in states) else DEGRADED)
        rb = c.rollback.state()
        return {
            "overall": overall,
            "cluster": c.cluster.name,
            "clusters": self.clusters(loops),
            "components": comps,
            "mode": rb["mode"],
            "mode_reason": rb["reason"],
            "control_mode": c.policy.control_mode,
            "rollback": rb,
            "guardrails": {
                **c.guardrails.state(),
                "overrides": c.overrides.to_json(),
                "last_notes": list(c.last_guard.notes) if c.last_guard else [],
            },
            "lease": c.lease,
            "api_server": self.api_server() if self.api_server is not None else "off",
            "timestamp": time.time(),
        }

    # -- timeline ------------------------------------------------------------------------

    def timeline(self, limit: int = 120, cluster: str | None = None) -> dict[str, Any]:
        """Latency and cost over the last ``limit`` decisions, from what each one observed:
        p95 per cloud (request-weighted), blended $ per million requests, what equal
        weights would cost on the same endpoints, the saving against that, and events
        (traffic moved, mode changes, price changes, operator overrides). The fleet's p99
        as Envoy sees it comes from Prometheus (the ALS histogram) when it answers."""
        c = self.pick(cluster)
        clouds = {a: ep.cloud for a, ep in c.endpoints.items()}
        points: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        prev_mode: str | None = None
        prev_costs: dict[str, float] = {}
        for rec in reversed(c.log.recent(limit)):
            obs = rec.observation or {}
            eps = [e for e in obs.get("endpoints", []) if isinstance(e, dict)]
            rps: dict[str, Any] = {e["address"]: e.get("rps") for e in eps}
            price: dict[str, Any] = {e["address"]: e.get("cost_per_million") for e in eps}
            carried = [(rps[a], price[a]) for a in rps if _num(rps[a]) and _num(price[a]) is not None]
            total = sum(r for r, _ in carried)
            blended = sum(r * p for r, p in carried) / total if total > 0 else None
            # Equal weights: an equal share of the same traffic on every endpoint that was up.
            up = [
                _num(price[e["address"]])
                for e in eps
                if e.get("healthy") is not False and _num(price[e["address"]]) is not None
            ]
            equal = sum(up) / len(up) if up else None  # type: ignore[arg-type]
            by_cloud: dict[str, list[tuple[float, float]]] = {}
            for e in eps:
                r, p95 = _num(e.get("rps")), _num(e.get("p95_ms"))
                if r and p95 is not None:
                    by_cloud.setdefault(clouds.get(e["address"], "?"), []).append((r, p95))
            p95_by_cloud = {
                k: round(sum(r * x for r, x in v) / sum(r for r, _ in v), 3) for k, v in sorted(by_cloud.items())
            }
            points.append(
                {
                    "t": rec.timestamp,
                    "seq": rec.seq,
                    "mode": rec.mode,
                    "cost_per_million": None if blended is None else round(blended, 6),
                    "equal_cost_per_million": None if equal is None else round(equal, 6),
                    "saving": None if blended is None or not equal else round(1.0 - blended / equal, 4),
                    "p95_ms_by_cloud": p95_by_cloud,
                    "rps": round(total, 3),
                }
            )
            if rec.moved and rec.moved >= 0.05 and rec.pushed:
                events.append({"t": rec.timestamp, "kind": "moved", "text": f"moved {rec.moved:.0%} of traffic"})
            if prev_mode is not None and rec.mode != prev_mode:
                events.append({"t": rec.timestamp, "kind": "mode", "text": f"mode {prev_mode} -> {rec.mode}"})
            changed = [
                a
                for a, p in price.items()
                if _num(p) is not None and a in prev_costs and abs(prev_costs[a] - float(p)) > 1e-12
            ]
            if changed:
                events.append({"t": rec.timestamp, "kind": "price", "text": f"price changed: {', '.join(changed)}"})
            for note in rec.notes:
                if note.startswith(("drained", "override", "fixed", "pinned")):
                    events.append({"t": rec.timestamp, "kind": "override", "text": note[:200]})
            prev_mode = rec.mode
            prev_costs.update({a: float(p) for a, p in price.items() if _num(p) is not None})
        costs = [p for p in points if p["cost_per_million"] is not None and p["equal_cost_per_million"]]
        saving = None
        if costs:
            spent = sum(p["cost_per_million"] * p["rps"] for p in costs)
            equal_spent = sum(p["equal_cost_per_million"] * p["rps"] for p in costs)
            saving = round(1.0 - spent / equal_spent, 4) if equal_spent > 0 else None
        p99, p99_reason = self._fleet_p99(points, c.cluster.name)
        return {
            "cluster": c.cluster.name,
            "points": points,
            "events": events,
            "saving_vs_equal": saving,
            "fleet_p99_ms": p99,
            "fleet_p99_reason": p99_reason,
        }

    def _fleet_p99(self, points: list[dict[str, Any]], name: str) -> tuple[list[dict[str, float]], str | None]:
        """The cluster's p99 over every request Envoy sent, from the ALS histogram."""
        if len(points) < 2:
            return [], "too few decisions yet"
        start, end = points[0]["t"], points[-1]["t"]
        step = max(1.0, (end - start) / 200)
        window = max(2.0, float(self.settings.telemetry.window_s))
        q = (
            f'histogram_quantile(0.99, sum by (le) (rate(balanceiq_upstream_rq_time_seconds_bucket{{cluster="{name}"}}'
            f"[{window:g}s]))) * 1000"
        )
        url = self.settings.prometheus.url.rstrip("/") + "/api/v1/query_range"
        with self._http_lock:
            try:
                r = self._http.get(url, params={"query": q, "start": start, "end": end, "step": step})
            except httpx.HTTPError as exc:
                return [], f"Prometheus unreachable ({type(exc).__name__})"
        try:
            result = r.json()["data"]["result"] if r.status_code == 200 else []
        except (ValueError, KeyError, TypeError):
            result = []
        out = [
            {"t": float(t), "ms": round(float(v), 3)}
            for series in result[:1]
            for t, v in series.get("values", [])
            if _num(v) is not None
        ]
        return out, None if out else f"no ALS latency in Prometheus (answered {r.status_code})"

    # -- weights -------------------------------------------------------------------------

    def total_requests(self, cluster: str | None = None) -> int | None:
        """Envoy's own count of requests sent to the cluster (``upstream_rq_total``)."""
        name = self.pick(cluster).cluster.name

        def probe() -> dict[str, Any]:
            url = (
                self.settings.envoy.admin_url.rstrip("/")
                + f"/stats?filter=^cluster\\.{name}\\.upstream_rq_total$&format=json"
            )
            r = self._get(url)
            try:
                stats = r.json().get("stats", []) if r is not None and r.status_code == 200 else []
            except ValueError:
                stats = []
            value = next((s.get("value") for s in stats if s.get("name") == f"cluster.{name}.upstream_rq_total"), None)
            return {"value": int(value) if isinstance(value, (int, float)) else None}

        return self._cached(f"total_requests:{name}", 1.0, probe)["value"]

    def efficiency(self, cluster: str | None = None) -> float | None:
        """Jain's fairness index of utilisation (rps / capacity) over endpoints with both
        known: 1.0 when every endpoint is equally loaded relative to its capacity."""
        c = self.pick(cluster)
        obs = c.last_observation
        hint = c.capacity_hint
        if obs is None:
            return None
        u = np.array(
            [e.rps / c for e, c in zip(obs.endpoints, hint) if math.isfinite(e.rps) and math.isfinite(c) and c > 0]
        )
        if u.size == 0 or float((u**2).sum()) == 0:
            return None
        return round(float(u.sum() ** 2 / (u.size * (u**2).sum())), 4)

    def weights(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        obs = c.last_observation.by_address() if c.last_observation else {}
        overrides = {o["address"]: self._with_state(o, c) for o in c.overrides.to_json()}
        shares = c.shares
        eps = []
        for a, s in zip(c.addresses, shares):
            ep = c.endpoints[a]
            e = obs.get(a)
            eps.append(
                {
                    "address": a,
                    "cloud": ep.cloud,
                    "region": ep.region,
                    "weight": c.weights[a],
                    "share": round(float(s), 6),
                    "health": c.health[a],
                    "override": overrides.get(a),
                    "p95_ms": _num(e.p95_ms) if e else None,
                    "error_rate": _num(e.error_rate) if e else None,
                    "rps": _num(e.rps) if e else None,
                    "cost_per_million": _num(c.costs.get(a)),
                    "healthy": e.healthy if e else None,
                }
            )
        last = c.log.last()
        return {
            "cluster": c.cluster.name,
            "version": next((d.version for d in c.log.recent(50) if d.version), None),
            "mode": c.rollback.mode,
            "endpoints": eps,
            "history": list(c.weight_history[-120:]),
            "total_requests": self.total_requests(c.cluster.name),
            "timestamp": last.timestamp if last else None,
        }

    def _with_state(self, override: dict[str, Any], c: Controller) -> dict[str, Any]:
        """The override as JSON, with ``state``: ``applied`` once a push (or a step that
        found nothing to change) has included it, else ``pending``."""
        done = c.overrides_applied_at
        created = override.get("created_at")
        applied = done is not None and created is not None and float(created) <= done
        return {**override, "state": "applied" if applied else "pending"}

    def set_override(
        self,
        address: str,
        action: str,
        weight: int | None,
        ttl_s: float | None,
        reason: str,
        cluster: str | None = None,
    ) -> dict[str, Any]:
        """Apply an override; ``cluster`` defaults to the one cluster with ``address``."""
        c = self._for_address(address, cluster)
        if address not in c.endpoints:
            raise GuardrailError(
                f"unknown endpoint {address!r} in cluster {c.cluster.name}; known: {', '.join(c.addresses)}"
            )
        if action == "clear":
            cleared = c.overrides.clear(address)
            result: dict[str, Any] = {"address": address, "action": "clear", "cleared": cleared}
        elif action == "drain":
            result = c.overrides.drain(address, ttl_s, reason).to_json()
        elif action == "pin":
            share = float(c.shares[c.addresses.index(address)])
            result = c.overrides.pin(address, share, ttl_s, reason).to_json()
        elif action == "set":
            if weight is None:
                raise GuardrailError("action 'set' needs a weight (1..10000, out of 10000)")
            result = c.overrides.set_weight(address, weight, ttl_s, reason).to_json()
        else:
            raise GuardrailError(f"unknown action {action!r}; use pin, drain, set or clear")
        self.loops[c.cluster.name].wake()  # operators expect a drain now, not after the interval
        out = self._with_state(result, c) if "created_at" in result else result
        return {**out, "cluster": c.cluster.name}

    # -- policy settings -----------------------------------------------------------------

    def policy_settings(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        return {
            "cluster": c.cluster.name,
            **c.policy.to_json(),
            "costs": dict(c.costs),
            "guardrails": c.guardrails.config.model_dump(),
            "checkpoint": (self.policy.info().get("checkpoint") if self.policy else None),
        }

    def update_policy(self, changes: dict[str, Any], cluster: str | None = None) -> dict[str, Any]:
        """Apply validated changes to one cluster's controller atomically: all of them, or
        none if one is invalid. A checkpoint is the one policy every cluster shares."""
        c = self.pick(cluster)
        n = len(c.addresses)
        if "k" in changes and changes["k"] is not None and not 1 <= changes["k"] <= n:
            raise ControlError(f"k must be in 1..{n} (the cluster has {n} endpoints), got {changes['k']}")
        costs = changes.get("costs") or {}
        unknown = sorted(set(costs) - set(c.addresses))
        if unknown:
            raise ControlError(f"costs name unknown endpoint(s): {', '.join(unknown)}")
        guard = None
        if changes.get("guardrails"):
            merged = {**c.guardrails.config.model_dump(), **changes["guardrails"]}
            try:
                guard = GuardrailConfig.model_validate(merged)
            except ValueError as exc:
                raise ControlError(f"guardrails: {exc}") from exc
        reward = None
        if changes.get("reward_weights") is not None or changes.get("slo_ms") is not None:
            r = c.policy.reward
            rw = {
                "slo_ms": r.slo_ms,
                "latency": r.latency,
                "tail": r.tail,
                "errors": r.errors,
                "cost": r.cost,
                "ref_cost": r.ref_cost,
            }
            rw.update(changes.get("reward_weights") or {})
            if changes.get("slo_ms") is not None:
                rw["slo_ms"] = changes["slo_ms"]
            reward = RewardWeights(**rw)
        if changes.get("checkpoint"):
            if self.policy is None:
                raise ControlError("no policy deployment to load a checkpoint into")
            self.policy.reload(str(changes["checkpoint"]))
        with c._lock:
            if changes.get("k") is not None:
                c.policy.k = int(changes["k"])
            if changes.get("interval_s") is not None:
                c.policy.interval_s = float(changes["interval_s"])
            if changes.get("cost_weight") is not None:
                c.policy.cost_weight = float(changes["cost_weight"])
            if changes.get("util_target") is not None:
                c.policy.util_target = float(changes["util_target"])
            if changes.get("latency_weight") is not None:
                c.policy.latency_weight = float(changes["latency_weight"])
            if changes.get("selection") is not None:
                c.policy.mode = str(changes["selection"])
            if changes.get("control_mode") is not None and changes["control_mode"] != c.policy.control_mode:
                c.policy.control_mode = str(changes["control_mode"])
                log.warning("control mode now %s (PUT /api/policy)", c.policy.control_mode)
            if reward is not None:
                c.policy.reward = reward
            c.costs.update({a: float(v) for a, v in costs.items()})
            if guard is not None:
                c.guardrails.config = guard
                c.rollback.reconfigure(guard.rollback_after, guard.rollback_margin, guard.probation_after)
                if guard.baseline != c.baseline.name:
                    c.baseline = make_policy(guard.baseline)
        self.loops[c.cluster.name].wake()
        return self.policy_settings(c.cluster.name)

    def score(self, endpoints: list[dict[str, Any]], k: int | None, cluster: str | None = None) -> dict[str, Any]:
        """The policy's scores and greedy critical set for an observation sent over HTTP,
        decided with ``cluster``'s knobs."""
        c = self.pick(cluster)
        scorer = self.api_scorer or c.scorer
        if scorer is None:
            raise ControlError("no policy configured")
        addresses = [e["address"] for e in endpoints]
        if len(set(addresses)) != len(addresses):
            raise ControlError("duplicate endpoint addresses in the request")
        nan = float("nan")
        eps = tuple(
            EndpointObservation(
                address=e["address"],
                **cast("dict[str, Any]", {f: (nan if e.get(f) is None else float(e[f])) for f in _OBS_FIELDS}),
                healthy=e.get("healthy"),
            )
            for e in endpoints
        )
        obs = Observation(cluster=c.cluster.name, endpoints=eps, source="api")
        hint = np.array([nan if e.get("capacity_rps") is None else float(e["capacity_rps"]) for e in endpoints])
        n = len(eps)
        kk = min(n, k or critical_count(n))
        w = np.array([ep.weight for ep in eps], dtype=np.float64)
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
        shares = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
        rps = np.array([ep.rps for ep in eps], dtype=np.float64)
        ctx = PolicyContext(shares, hint, np.ones(n), float(np.nansum(np.where(np.isfinite(rps), rps, 0.0))), kk)
        # The controller's own decision core, with no memory: what it would do with this
        # observation as its first.
        knobs = replace(c.knobs(), k=max(1, kk))
        est, _ = observe_only(obs, ctx, knobs)
        rows = encode(obs, est.capacity, n, c.policy.reward.slo_ms)
        t0 = time.perf_counter()
        try:
            scores = np.asarray(scorer(rows), dtype=np.float64).reshape(-1)
        except Exception as exc:  # a remote deployment: anything may come back
            raise ControlError(f"policy unavailable: {type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - t0) * 1000
        if scores.shape[0] != n or not np.all(np.isfinite(scores)):
            raise ControlError(f"policy returned {scores.shape[0]} scores for {n} endpoints, or non-finite ones")
        core = decide(obs, ctx, scores, knobs)
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:kk]]
        return {
            "scores": {a: round(float(x), 6) for a, x in zip(addresses, scores)},
            "critical": [addresses[i] for i in order],
            "k": kk,
            "inference_ms": round(ms, 3),
            "decision": {
                "critical": [addresses[i] for i in core.critical],
                "forced": [addresses[i] for i in core.forced],
                "shares": {a: round(float(x), 6) for a, x in zip(addresses, core.shares)},
                "weights": {a: int(x) for a, x in zip(addresses, core.weights)},
                "capacity_estimate": {a: round(float(x), 3) for a, x in zip(addresses, core.capacity)},
                "lp_status": core.lp_status,
            },
        }

    # -- compatibility views (the original service's fields) -----------------------------

    def training_metrics(self) -> dict[str, Any]:
        if self.training is None:
            return {
                "training_iterations": 0,
                "buffer_size": 0,
                "current_reward": None,
                "model_accuracy": None,
                "recent_rewards": [],
                "recent_losses": [],
                "last_update": None,
                "runs": [],
            }
        self.training.refresh()
        return self.training.metrics()

    def weight_metrics(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        last = c.log.last()
        return {
            "endpoint_weights": dict(c.weights),
            "total_requests": self.total_requests(c.cluster.name),
            "load_balance_efficiency": self.efficiency(c.cluster.name),
            "last_update": _iso(last.timestamp if last else None),
        }

    def all_metrics(self, cluster: str | None = None) -> dict[str, Any]:
        t = self.training_metrics()
        w = self.weight_metrics(cluster)
        return {
            "training": {
                "iterations": t["training_iterations"],
                "buffer_size": t["buffer_size"],
                "current_reward": t["current_reward"],
                "model_accuracy": t["model_accuracy"],
                "recent_rewards": t["recent_rewards"],
                "recent_losses": t["recent_losses"],
            },
            "load_balancing": {
                "endpoint_weights": w["endpoint_weights"],
                "total_requests": w["total_requests"],
                "efficiency": w["load_balance_efficiency"],
            },
            "status": {"last_update": w["last_update"], "uptime": round(time.time() - self.started_at, 1)},
        }

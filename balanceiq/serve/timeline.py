"""Latency and cost over recent decisions, from what each one observed, with events marked."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from balanceiq.serve.plane import ControlPlane


def finite(x: Any) -> float | None:
    """``x`` as a float, or ``None`` when it is not a finite number."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _point(rec: Any, clouds: dict[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
    """One decision's point, and the (finite) prices it observed."""
    eps = [e for e in (rec.observation or {}).get("endpoints", []) if isinstance(e, dict)]
    price = {e["address"]: p for e in eps if (p := finite(e.get("cost_per_million"))) is not None}
    carried = [(r, price[e["address"]]) for e in eps if (r := finite(e.get("rps"))) and e["address"] in price]
    total = sum(r for r, _ in carried)
    blended = sum(r * p for r, p in carried) / total if total > 0 else None
    # Equal weights: an equal share of the same traffic on every endpoint that was up.
    up = [price[e["address"]] for e in eps if e.get("healthy") is not False and e["address"] in price]
    equal = sum(up) / len(up) if up else None
    by_cloud: dict[str, list[tuple[float, float]]] = {}
    for e in eps:
        r, p95 = finite(e.get("rps")), finite(e.get("p95_ms"))
        if r and p95 is not None:
            by_cloud.setdefault(clouds.get(e["address"], "?"), []).append((r, p95))
    point = {
        "t": rec.timestamp,
        "seq": rec.seq,
        "mode": rec.mode,
        "cost_per_million": None if blended is None else round(blended, 6),
        "equal_cost_per_million": None if equal is None else round(equal, 6),
        "saving": None if blended is None or not equal else round(1.0 - blended / equal, 4),
        "p95_ms_by_cloud": {
            k: round(sum(r * x for r, x in v) / sum(r for r, _ in v), 3) for k, v in sorted(by_cloud.items())
        },
        "rps": round(total, 3),
    }
    return point, price


def timeline(plane: ControlPlane, limit: int = 120, cluster: str | None = None) -> dict[str, Any]:
    """Over the last ``limit`` decisions: request-weighted p95 per cloud, blended and equal-weights
    $ per million requests and the saving, events, and the fleet's p99 from Prometheus."""
    c = plane.pick(cluster)
    clouds = {a: ep.cloud for a, ep in c.endpoints.items()}
    points: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    prev_mode: str | None = None
    prev_costs: dict[str, float] = {}
    for rec in reversed(c.log.recent(limit)):
        point, price = _point(rec, clouds)
        points.append(point)
        t = rec.timestamp
        if rec.moved and rec.moved >= 0.05 and rec.pushed:
            events.append({"t": t, "kind": "moved", "text": f"moved {rec.moved:.0%} of traffic"})
        if prev_mode is not None and rec.mode != prev_mode:
            events.append({"t": t, "kind": "mode", "text": f"mode {prev_mode} -> {rec.mode}"})
        if changed := [a for a, p in price.items() if a in prev_costs and abs(prev_costs[a] - p) > 1e-12]:
            events.append({"t": t, "kind": "price", "text": f"price changed: {', '.join(changed)}"})
        for note in rec.notes:
            if note.startswith(("drained", "override", "fixed", "pinned")):
                events.append({"t": t, "kind": "override", "text": note[:200]})
        prev_mode = rec.mode
        prev_costs.update(price)
    costs = [p for p in points if p["cost_per_million"] is not None and p["equal_cost_per_million"]]
    spent = sum(p["cost_per_million"] * p["rps"] for p in costs)
    equal_spent = sum(p["equal_cost_per_million"] * p["rps"] for p in costs)
    saving = round(1.0 - spent / equal_spent, 4) if equal_spent > 0 else None
    p99, p99_reason = fleet_p99(plane, points, c.cluster.name)
    return {
        "cluster": c.cluster.name,
        "points": points,
        "events": events,
        "saving_vs_equal": saving,
        "fleet_p99_ms": p99,
        "fleet_p99_reason": p99_reason,
    }


def fleet_p99(
    plane: ControlPlane, points: list[dict[str, Any]], name: str
) -> tuple[list[dict[str, float]], str | None]:
    """The cluster's p99 over every request Envoy sent, from the ALS histogram."""
    if len(points) < 2:
        return [], "too few decisions yet"
    start, end = points[0]["t"], points[-1]["t"]
    step = max(1.0, (end - start) / 200)
    window = max(2.0, float(plane.settings.telemetry.window_s))
    q = (
        f'histogram_quantile(0.99, sum by (le) (rate(balanceiq_upstream_rq_time_seconds_bucket{{cluster="{name}"}}'
        f"[{window:g}s]))) * 1000"
    )
    url = plane.settings.prometheus.url.rstrip("/") + "/api/v1/query_range"
    with plane._http_lock:
        try:
            r = plane._http.get(url, params={"query": q, "start": start, "end": end, "step": step})
        except httpx.HTTPError as exc:
            return [], f"Prometheus unreachable ({type(exc).__name__})"
    try:
        result = r.json()["data"]["result"] if r.status_code == 200 else []
    except (ValueError, KeyError, TypeError):
        result = []
    values = result[0].get("values", []) if result else []
    out = [{"t": float(t), "ms": round(float(v), 3)} for t, v in values if finite(v) is not None]
    return out, None if out else f"no ALS latency in Prometheus (answered {r.status_code})"

"""The state of every part behind the API: control loops, policy, xDS, Envoy, Prometheus."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from balanceiq.exceptions import BalanceIQError

if TYPE_CHECKING:
    from balanceiq.control.controller import Controller, ControlLoop
    from balanceiq.serve.plane import ControlPlane

UP, DEGRADED, DOWN = "up", "degraded", "down"


def envoy(plane: ControlPlane) -> dict[str, Any]:
    url = plane.settings.envoy.admin_url.rstrip("/") + "/ready"
    r = plane._get(url)
    if r is None:
        return {"state": DOWN, "reason": f"admin {url} unreachable"}
    if r.status_code == 200:
        return {"state": UP, "reason": "admin /ready: LIVE"}
    return {"state": DEGRADED, "reason": f"admin /ready answered {r.status_code}: {r.text.strip()[:60]}"}


def prometheus(plane: ControlPlane) -> dict[str, Any]:
    url = plane.settings.prometheus.url.rstrip("/") + "/-/ready"
    r = plane._get(url)
    observed = [c.last_observation for c in plane.controllers.values()]
    fallback = any(o is not None and o.source == "envoy-admin" for o in observed)
    if r is None or r.status_code != 200:
        why = "unreachable" if r is None else f"answered {r.status_code}"
        note = "; telemetry uses Envoy's admin" if fallback else ""
        return {"state": DOWN, "reason": f"{url} {why}{note}"}
    if fallback:
        return {"state": DEGRADED, "reason": "ready, but the last observation came from the Envoy fallback"}
    return {"state": UP, "reason": "ready; observations from Prometheus"}


def xds(plane: ControlPlane) -> dict[str, Any]:
    try:
        status = plane.controller.xds.status()
    except BalanceIQError as exc:
        return {"state": DOWN, "reason": str(exc)}
    version = status.get("version")
    connected = [n for n in status.get("nodes", []) if n.get("connected")]
    if not connected:
        return {"state": DEGRADED, "reason": "serving, but no Envoy is connected", "version": version}
    if nacked := [n for n in connected if n.get("last_nacked_version") and n.get("last_nacked_version") == version]:
        return {"state": DEGRADED, "reason": f"Envoy rejected version {version}: {nacked[0].get('last_error')}"}
    return {"state": UP, "reason": f"{len(connected)} Envoy node(s) connected, version {version}", "version": version}


def policy(plane: ControlPlane) -> dict[str, Any]:
    states = [c.policy_state for c in plane.controllers.values()]
    st = next((x for x in states if x.get("ok") is False), states[0])
    info: dict[str, Any] = {}
    if plane.policy is not None:
        try:
            info = plane.policy.info()
        except Exception as exc:  # a remote deployment: anything may come back
            return {"state": DOWN, "reason": f"policy deployment unavailable: {type(exc).__name__}"}
    elif plane.controller.scorer is None:
        return {"state": DOWN, "reason": "no policy configured: the baseline decides"}
    if st.get("ok") is False:
        return {"state": DEGRADED, "reason": f"last call failed: {st.get('error')}", **info}
    ours, served = info.get("controller_checkpoint"), info.get("checkpoint")
    if info.get("in_sync") is False:
        return {"state": DEGRADED, "reason": f"the loop scores with {ours}, the deployment serves {served}", **info}
    why = f"checkpoint {info.get('checkpoint', '?')}"
    if (lat := st.get("latency_ms")) is not None:
        why += f", last scoring{' in the controller' if 'controller_checkpoint' in info else ''} {lat:.1f} ms"
    return {"state": UP, "reason": why, **info}


def loop_state(c: Controller, loop: ControlLoop) -> dict[str, Any]:
    """One cluster's control loop."""
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


def worst_loop(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst cluster's loop (each named when there are several)."""
    rank = {UP: 0, DEGRADED: 1, DOWN: 2}
    if len(per) == 1:
        return next(iter(per.values()))
    name, worst = max(per.items(), key=lambda kv: rank[kv[1]["state"]])
    if worst["state"] == UP:
        reasons = "; ".join(f"{n}: {v['reason']}" for n, v in per.items())
        return {"state": UP, "reason": f"{len(per)} clusters steered: {reasons}"}
    return {**worst, "reason": f"cluster {name}: {worst['reason']}"}


def status(plane: ControlPlane, cluster: str | None = None) -> dict[str, Any]:
    """``GET /api/status``: every component's state and the overall verdict."""
    c = plane.pick(cluster)
    loops = plane._loop_states()
    comps = {"controller": worst_loop(loops)}
    for name, probe in (("policy", policy), ("xds", xds), ("envoy", envoy), ("prometheus", prometheus)):
        comps[name] = plane._cached(name, functools.partial(probe, plane))
    states = [v["state"] for v in comps.values()]
    critical = [comps[k]["state"] for k in ("controller", "xds", "envoy")]
    overall = DOWN if DOWN in critical else (UP if all(s == UP for s in states) else DEGRADED)
    rb = c.rollback.state()
    return {
        "overall": overall,
        "cluster": c.cluster.name,
        "clusters": plane.clusters(loops),
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
        "api_server": plane.api_server() if plane.api_server is not None else "off",
        "timestamp": time.time(),
    }

"""``POST /api/policy/score``: what the policy and decision core would do with an observation (nothing applied)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from balanceiq.config import critical_count
from balanceiq.exceptions import ControlError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import decide, observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.lp import weights_to_shares
from balanceiq.telemetry.observation import EndpointObservation, Observation

if TYPE_CHECKING:
    from balanceiq.serve.plane import ControlPlane

_OBS_FIELDS = ("p50_ms", "p95_ms", "error_rate", "saturation", "inflight", "rps", "cost_per_million", "weight")


def score(plane: ControlPlane, endpoints: list[dict[str, Any]], k: int | None, cluster: str | None) -> dict[str, Any]:
    """The policy's scores and greedy critical set, and the decision ``cluster``'s knobs make."""
    c = plane.pick(cluster)
    scorer = plane.api_scorer or c.scorer
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
    shares = weights_to_shares([ep.weight for ep in eps])
    rps = np.array([ep.rps for ep in eps], dtype=np.float64)
    ctx = PolicyContext(shares, hint, np.ones(n), float(np.nansum(np.where(np.isfinite(rps), rps, 0.0))), kk)
    # The controller's own decision core, with no memory: this observation as its first.
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

"""`balanceiq bench faults`: break one part of a running control plane, measure what follows.

Each scenario is one function that starts what it needs on real parts (sample backends,
Envoy, Prometheus, the xDS server in-process or as the Ray actor, the controller, the
Serve app), drives an open-loop load through Envoy (loopback only, bounded in rate and
duration), breaks one thing and returns a small result. The fault tests
(``tests/integration/test_faults.py``) call the same functions and assert the targets,
so the benchmark and the tests measure the same thing.

Every scenario also audits what Envoy was sent. :class:`XdsTap` is a second xDS client
on the same server, subscribed like Envoy; it decodes every EDS response it receives and
checks it (every endpoint present with an integer weight >= 1, sums within uint32, at
least one endpoint routable, versions never going back or reused for other content).
``invalid_weights_sent`` is what it found plus whatever Envoy itself rejected (its
``update_rejected`` counter): measured from both ends, never assumed.

Scenarios, and what each measures (times from the server's or Envoy's own clocks where
one exists, so a slow poll on a loaded machine does not count as recovery time):

``actor_killed``         the xDS Ray actor is killed under load (Ray restarts it): failed
                         requests, restart, and resync = Envoy's first ACK on the new
                         server minus the moment it listened (``listening_since`` and the
                         node's ``last_acked_at``), versions seen across the restart.
``envoy_restarted``      Envoy is stopped and started again: it ACKs the version the
                         server serves and its ``/clusters`` shows those weights.
``prometheus_killed``    Prometheus is SIGKILLed: decisions continue from the Envoy-admin
                         fallback; no decision moves more traffic than ``max_shift``.
``backend_killed``       one backend process is SIGKILLed: when the controller's weight
                         for it (1, i.e. no traffic) is in force at Envoy, and the error
                         rate over time since the kill.
``serve_replica_killed`` the Controller deployment's replica is SIGKILLed: Serve replaces
                         it; the xDS actor's audit shows one lease holder at a time and
                         every accepted push from the holder of the newest lease term.
``ray_head_restart``     the whole local Ray cluster goes down (``ray.shutdown()``: GCS,
                         raylet, every actor) and a fresh one starts: Envoy keeps serving
                         its last weights meanwhile; the new xDS actor restores them from
                         ``state_dir`` under a new epoch and Envoy resyncs.

The three Ray scenarios need a Ray cluster in this process (``ray.init``); the CLI starts
a local one, the tests use theirs. ``ray_head_restart`` replaces it with a new one.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import psutil
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from rich.console import Console

from balanceiq.config import Settings
from balanceiq.control.controller import Controller
from balanceiq.exceptions import BalanceIQError
from balanceiq.policy.lp import traffic_moved, weights_to_shares
from balanceiq.sim.calibrate.recording import DecisionRecord
from balanceiq.telemetry.observe import Telemetry
from balanceiq.xds.client import ActorXdsClient
from balanceiq.xds.snapshot import EDS_TYPE
from balanceiq_lab.bench.settings import bench_settings
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import OpenLoopResult, arrival_schedule, run_open_loop_sync
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.envoy import endpoint_health, endpoint_weights

FAULTS = (
    "envoy_restarted",
    "prometheus_killed",
    "backend_killed",
    "actor_killed",
    "serve_replica_killed",
    "ray_head_restart",
    "head_crash_gcs_ft",
    "head_crash_no_ft",
)
"""In the order the CLI runs them: without Ray first, the head restart (which replaces
the Ray cluster) after the other Ray ones; the head crashes start Ray heads of their own."""
RAY_FAULTS = frozenset({"actor_killed", "serve_replica_killed", "ray_head_restart"})

ENDPOINTS = 4
INTERVAL_S = 1.0  # control interval: the tests' (and the issue's) "2 control intervals" are 2 s
RATE_RPS = 100.0  # load through Envoy: enough per endpoint for 1% to mean something
REQUEST_TIMEOUT_S = 5.0
ENVOY_NODE = "balanceiq-envoy-0"  # the Testbed's Envoy
TAP_NODE = "balanceiq-fault-audit"
APP_NAME = "balanceiq-faults"
API_TOKEN = "faults-bench-token-0123456789abcdef"
UINT32_MAX = 2**32 - 1
SLOW_MS = 250.0  # extra latency that puts a backend well over the 150 ms SLO
MOVE_TOL = 1e-3  # integer weights out of 10,000 round each share by < 1e-4
LOCAL_RAY: dict[str, Any] = {
    # address="local": a new cluster, never one `ray start` left running on this machine.
    "address": "local",
    "num_cpus": 2,
    "include_dashboard": False,
    "log_to_driver": False,
    "namespace": "balanceiq-faults",
}

Progressor = Callable[[str], None]
T = TypeVar("T")


def _quiet(_: str) -> None:
    pass


# -- settings ------------------------------------------------------------------------------


def fault_settings(
    n_endpoints: int = ENDPOINTS, interval_s: float = INTERVAL_S, base: Settings | None = None
) -> Settings:
    """Every port free, and short windows so a change shows within a control interval or
    two (Prometheus scrapes every 0.5 s, rates over 2 s) instead of the production 10 s."""
    s = bench_settings(
        n_endpoints, base, scrape_interval_s=0.5, window_s=2.0, stale_after_s=4.0, control_interval_s=interval_s
    )
    # Clouds priced apart, as in the sample config, so the LP's cost term has something
    # to weigh (the scenarios that need the split to move also slow a backend).
    costs = [0.40, 0.35, 0.55, 0.12]
    eps = [
        ep.model_copy(update={"cost_per_million_requests": costs[i % len(costs)]})
        for i, ep in enumerate(s.clusters[0].endpoints)
    ]
    return s.model_copy(update={"clusters": [s.clusters[0].model_copy(update={"endpoints": eps})]})


# -- results -------------------------------------------------------------------------------


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


@dataclass(kw_only=True)
class FaultResult:
    """What every scenario reports; subclasses add the scenario's own fields."""

    fault: str
    requests: int  # sent through Envoy during the scenario
    failed_requests: int  # not answered 2xx (see each scenario for which window counts)
    recovery_s: float | None  # the scenario's own recovery time (see its docstring)
    invalid_weights_sent: int  # tap-detected invalid assignments + updates Envoy rejected
    assignments_checked: int  # distinct versions the tap received and checked
    envoy_rejected_updates: int
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        """``name -> (measured, target, met)``: the issue's targets for this fault, and the
        evidence a run needs for them to mean something. The fault tests assert exactly
        these, so the benchmark and the tests cannot disagree."""
        return {
            "invalid_weights_sent": (self.invalid_weights_sent, "== 0", self.invalid_weights_sent == 0),
            "envoy_rejected_updates": (self.envoy_rejected_updates, "== 0", self.envoy_rejected_updates == 0),
            # Enough versions seen for "0 invalid" to mean something.
            "assignments_checked": (self.assignments_checked, ">= 2", self.assignments_checked >= 2),
        }

    def _requests(self, at_least: int) -> dict[str, tuple[Any, str, bool]]:
        return {"requests": (self.requests, f">= {at_least}", self.requests >= at_least)}

    @property
    def ok(self) -> bool:
        return all(met for _, _, met in self.checks().values())

    def to_json(self) -> dict[str, Any]:
        out = _round(asdict(self))
        out["targets"] = {k: {"measured": _round(v), "target": t, "met": m} for k, (v, t, m) in self.checks().items()}
        out["ok"] = self.ok
        return out


@dataclass(kw_only=True)
class ActorKilledResult(FaultResult):
    """``recovery_s``: kill to Envoy's first ACK on the restarted server."""

    restart_s: float  # kill -> the new actor process constructed (its ``started_at``)
    bind_s: float  # started_at -> listening_since
    resync_s: float  # listening_since -> Envoy's first ACK there (server clocks)
    resync_exact: bool  # False: Envoy had ACKed twice before we looked; resync_s is an upper bound
    restored_from_state: bool
    weights_restored: bool  # the restarted server serves the weights in force before the kill
    epoch_before: int
    epoch_after: int
    versions_seen: int  # distinct versions the tap received across the restart
    versions_repeated: int  # a version going back, reused for other content, or pushed twice

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        return {
            **super().checks(),
            **self._requests(500),
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            "resync_s": (self.resync_s, "<= 2.0", self.resync_s <= 2.0),
            "versions_repeated": (self.versions_repeated, "== 0", self.versions_repeated == 0),
            "new_epoch": (self.epoch_after, f"> {self.epoch_before}", self.epoch_after > self.epoch_before),
            "weights_restored": (self.weights_restored, "true", self.weights_restored and self.restored_from_state),
        }


@dataclass(kw_only=True)
class EnvoyRestartedResult(FaultResult):
    """``recovery_s``: the new Envoy process started -> its first ACK (server clock).
    ``failed_requests`` counts failures outside the outage; ``refused_while_down`` those
    inside it (the proxy itself was gone)."""

    down_s: float  # stop called -> the new Envoy ready (admin /ready: LIVE)
    refused_while_down: int
    ack_exact: bool  # False: Envoy ACKed twice before we looked; recovery_s is an upper bound
    latest_version: str | None  # what the server served when Envoy was checked
    envoy_acked_version: str | None  # the version_info of Envoy's own ACK
    envoy_weights: dict[str, int]  # admin /clusters after the restart
    weights_match: bool  # == the weights the server serves at the version Envoy ACKed
    pushes_before_restart: int

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        latest = self.envoy_acked_version is not None and self.envoy_acked_version == self.latest_version
        return {
            **super().checks(),
            **self._requests(500),
            "latest_version_after_restart": (self.envoy_acked_version, f"== {self.latest_version}", latest),
            "weights_match": (self.weights_match, "true", self.weights_match),
            "recovery_s": (self.recovery_s, "< 5", self.recovery_s is not None and self.recovery_s < 5.0),
            # Only the outage itself may fail requests: none before the stop or after it is back.
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            # Something beyond the config's weights to fetch.
            "pushes_before_restart": (self.pushes_before_restart, ">= 1", self.pushes_before_restart >= 1),
        }


@dataclass(kw_only=True)
class PrometheusKilledResult(FaultResult):
    """``recovery_s``: kill -> the end of the first full decision made from the fallback."""

    decisions_after: int  # decisions taken after the kill
    by_source: dict[str, int]
    by_mode: dict[str, int]
    max_moved: float  # largest traffic_moved of one decision, from the split it decided
    max_limited_move: float  # the same less the moves the guardrails exempt (and say so)
    exempt_moves: int  # decisions that moved traffic at once off a down or breaching endpoint
    max_shift: float
    swings_beyond_max_shift: int
    slowed: str  # the backend slowed down (+SLOW_MS) right after the first fallback decision
    slowed_share_before: float
    slowed_share_after: float  # the fallback's decisions moved traffic off it

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        fell_back = self.by_source.get("envoy-admin", 0) > 0
        return {
            **super().checks(),
            **self._requests(500),
            "fallback_decisions": (self.by_source.get("envoy-admin", 0), "> 0", fell_back),
            "swings_beyond_max_shift": (self.swings_beyond_max_shift, "== 0", self.swings_beyond_max_shift == 0),
            "max_limited_move": (
                self.max_limited_move,
                f"<= {self.max_shift:g}",
                self.max_limited_move <= self.max_shift + 1e-3,
            ),
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            # retry_s (5 s) + an interval
            "recovery_s": (self.recovery_s, "< 10", self.recovery_s is not None and self.recovery_s < 10.0),
            "decisions_after": (self.decisions_after, ">= 8", self.decisions_after >= 8),
            # A backend slowed during the outage: the fallback's decisions move traffic off it.
            "slowed_share": (
                (self.slowed_share_before, self.slowed_share_after),
                "falls",
                self.slowed_share_after < self.slowed_share_before,
            ),
        }


@dataclass(kw_only=True)
class BackendKilledResult(FaultResult):
    """``recovery_s`` = ``traffic_off_s``: kill -> Envoy holds the controller's weight 1
    (of 10,000) for the dead endpoint, polled from Envoy's admin every 0.1 s."""

    victim: str
    interval_s: float
    traffic_off_s: float | None
    traffic_off_intervals: float | None
    ejected_s: float | None  # kill -> Envoy's own outlier detection ejects it
    first_decision: dict[str, Any] | None  # the decision that took it off
    error_rate_first_10s: float | None  # requests due in the 10 s after the kill
    error_rate_after_10s: float | None  # requests due from 10 s after the kill to the end
    errors_settled_s: float | None  # after this (since the kill) every 1 s had < 1% errors
    errors_by_second: list[int]
    requests_after_10s: int

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        off = self.traffic_off_intervals
        after = self.error_rate_after_10s
        settled = self.errors_settled_s
        return {
            **super().checks(),
            "traffic_off_intervals": (off, "<= 2", off is not None and off <= 2.0),
            "errors_settled_s": (settled, "<= 10", settled is not None and settled <= 10.0),
            "error_rate_after_10s": (after, "< 0.01", after is not None and after < 0.01),
            "requests_after_10s": (self.requests_after_10s, ">= 300", self.requests_after_10s >= 300),
        }


@dataclass(kw_only=True)
class ServeReplicaKilledResult(FaultResult):
    """``recovery_s``: kill -> a new controller holds the lease (the actor's audit clock)."""

    replaced_s: float | None  # kill -> the new replica's process exists (Serve started it)
    first_push_s: float | None  # kill -> the new holder's first accepted push
    owners: list[str]  # lease holders in order (shortened)
    lease_terms: list[int]
    pushes_accepted: int
    pushes_refused: int  # lease-checked pushes the actor turned away
    double_pushes: int  # accepted pushes not from the newest term's holder, or out of order
    owners_after_takeover: int  # distinct owners of accepted pushes after the takeover
    running_replicas: int  # Controller replicas Serve reports RUNNING at the end
    versions_repeated: int

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        resumed = self.recovery_s is not None and 0 < self.recovery_s < 60.0 and len(self.owners) == 2
        return {
            **super().checks(),
            "resumed": (self.recovery_s, "a new lease holder within 60 s", resumed),
            # The old holder's lease must expire (ttl 5 s) before anyone else may push.
            "lease_terms": (self.lease_terms, "[1, 2]", self.lease_terms == [1, 2]),
            "pushes_accepted": (self.pushes_accepted, ">= 1", self.pushes_accepted >= 1),
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            "double_pushes": (self.double_pushes, "== 0", self.double_pushes == 0),
            "one_active_loop": (
                (self.owners_after_takeover, self.running_replicas),
                "(<= 1, 1)",
                self.owners_after_takeover <= 1 and self.running_replicas == 1,
            ),
            "versions_repeated": (self.versions_repeated, "== 0", self.versions_repeated == 0),
        }


@dataclass(kw_only=True)
class RayHeadRestartResult(FaultResult):
    """``recovery_s``: ``ray.init`` called again -> Envoy's first ACK on the new actor."""

    shutdown_s: float  # ray.shutdown() took this long (every Ray process gone)
    outage_s: float  # Ray down -> ray.init called again (Envoy on its own)
    ray_start_s: float  # ray.init -> the new xDS actor answered
    resync_s: float  # the new actor listening -> Envoy's first ACK (server clocks)
    envoy_weights_held: bool  # every poll of Envoy's weights during the outage == the last push
    polls_during_outage: int
    restored_from_state: bool
    weights_restored: bool
    controller_adopted: bool  # a controller started afterwards began from the restored weights
    controller_lease_term: int  # the lease it got (1: nothing of the old lease survived)
    controller_first_move: float  # traffic its first decision moved (less guardrail exemptions)
    controller_mode: str
    epoch_before: int
    epoch_after: int
    versions_repeated: int

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        return {
            **super().checks(),
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            "controller_adopted": (self.controller_adopted, "true", self.controller_adopted),
            "envoy_weights_held": (self.envoy_weights_held, "true", self.envoy_weights_held),
            # As for a killed actor: Envoy's back-off (at most 1 s) must not leave it waiting.
            "resync_s": (self.resync_s, "<= 2.0", self.resync_s <= 2.0),
            "weights_restored": (self.weights_restored, "true", self.weights_restored and self.restored_from_state),
            "new_epoch": (self.epoch_after, f"> {self.epoch_before}", self.epoch_after > self.epoch_before),
            **self._requests(500),
            "polls_during_outage": (self.polls_during_outage, ">= 5", self.polls_during_outage >= 5),
            "versions_repeated": (self.versions_repeated, "== 0", self.versions_repeated == 0),
            # A controller started afterwards: nothing of the old lease left, and it starts
            # from the restored split, moving at most max_shift (0.25) from it.
            "controller_lease_term": (self.controller_lease_term, "== 1", self.controller_lease_term == 1),
            "controller_active": (self.controller_mode, "!= standby", self.controller_mode != "standby"),
            "controller_first_move": (self.controller_first_move, "<= 0.25", self.controller_first_move <= 0.25 + 1e-3),
        }


# -- what Envoy receives: the tap ----------------------------------------------------------


def parse_version(version: str) -> tuple[int, int] | None:
    """``"<epoch>.<seq>"`` as a comparable pair; None when it is not one."""
    epoch, sep, seq = version.partition(".")
    if not sep or not epoch.isdigit() or not seq.isdigit():
        return None
    return int(epoch), int(seq)


_ROUTABLE = {health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED}


def check_assignment(cla: endpoint_pb2.ClusterLoadAssignment, cluster: str, addresses: Sequence[str]) -> list[str]:
    """What is wrong with an EDS resource for Envoy (empty list: valid)."""
    problems: list[str] = []
    if cla.cluster_name != cluster:
        problems.append(f"cluster_name {cla.cluster_name!r}, expected {cluster!r}")
    seen: list[str] = []
    total = 0
    routable = 0
    for loc in cla.endpoints:
        loc_sum = 0
        for lb in loc.lb_endpoints:
            sock = lb.endpoint.address.socket_address
            addr = f"{sock.address}:{sock.port_value}"
            seen.append(addr)
            if not lb.HasField("load_balancing_weight"):
                problems.append(f"{addr}: no load_balancing_weight")
                continue
            w = lb.load_balancing_weight.value
            if not 1 <= w <= UINT32_MAX:
                problems.append(f"{addr}: weight {w} outside 1..{UINT32_MAX}")
            loc_sum += w
            routable += lb.health_status in _ROUTABLE
        if loc_sum > UINT32_MAX:
            problems.append(f"locality {loc.locality.region}/{loc.locality.zone}: weights sum to {loc_sum} > uint32")
        total += loc_sum
    if total > UINT32_MAX:
        problems.append(f"weights sum to {total} > uint32")
    dup = [a for a, c in Counter(seen).items() if c > 1]
    if dup:
        problems.append(f"duplicate endpoints {dup}")
    if set(seen) != set(addresses):
        problems.append(f"endpoints {sorted(set(seen) ^ set(addresses))} missing or unknown")
    if seen and not routable:
        problems.append("no endpoint routable (all draining or unhealthy)")
    return problems


@dataclass(frozen=True)
class Received:
    version: str
    at: float
    weights: dict[str, int]
    health: dict[str, int]
    problems: tuple[str, ...]


class XdsTap:
    """A second ADS client on the xDS server, subscribed to the cluster like Envoy.

    It ACKs every response, decodes each ``ClusterLoadAssignment`` and checks it with
    :func:`check_assignment`, and reconnects (every 0.1 s) whenever the server goes away,
    so one tap spans actor restarts and Ray head restarts.
    """

    def __init__(self, target: str, cluster: str, addresses: Sequence[str], node_id: str = TAP_NODE) -> None:
        self.target, self.cluster, self.addresses, self.node_id = target, cluster, list(addresses), node_id
        self.received: list[Received] = []
        self.streams = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name="xds-tap", daemon=True)

    def start(self) -> XdsTap:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        ch = self._channel
        if ch is not None:
            ch.close()  # cancels the open stream, which ends the thread's read
        if self._thread.ident is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.target)
            self._channel = channel
            try:
                self._stream(channel)
            except (grpc.RpcError, ValueError):  # server gone, or our own close()
                pass
            finally:
                channel.close()
            self._stop.wait(0.1)

    def _stream(self, channel: grpc.Channel) -> None:
        requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        first = discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE, resource_names=[self.cluster])
        first.node.id = self.node_id
        requests.put(first)

        def outgoing() -> Iterator[discovery_pb2.DiscoveryRequest]:
            while (req := requests.get()) is not None:
                yield req

        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(outgoing())
        self.streams += 1
        try:
            for resp in call:
                self._record(resp)
                requests.put(
                    discovery_pb2.DiscoveryRequest(
                        type_url=EDS_TYPE,
                        resource_names=[self.cluster],
                        version_info=resp.version_info,
                        response_nonce=resp.nonce,
                    )
                )
        finally:
            requests.put(None)

    def _record(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        problems: list[str] = []
        weights: dict[str, int] = {}
        health: dict[str, int] = {}
        if parse_version(resp.version_info) is None:
            problems.append(f"version {resp.version_info!r} is not <epoch>.<seq>")
        clas = []
        for res in resp.resources:
            cla = endpoint_pb2.ClusterLoadAssignment()
            if not res.Unpack(cla):
                problems.append(f"resource of type {res.type_url}, expected {EDS_TYPE}")
                continue
            clas.append(cla)
        mine = [c for c in clas if c.cluster_name == self.cluster]
        if len(mine) != 1:
            problems.append(f"{len(mine)} assignments for {self.cluster!r} in one response")
        for cla in mine:
            problems += check_assignment(cla, self.cluster, self.addresses)
            for loc in cla.endpoints:
                for lb in loc.lb_endpoints:
                    sock = lb.endpoint.address.socket_address
                    addr = f"{sock.address}:{sock.port_value}"
                    weights[addr] = lb.load_balancing_weight.value
                    health[addr] = lb.health_status
        with self._lock:
            self.received.append(Received(resp.version_info, time.time(), weights, health, tuple(problems)))

    def weights_of(self, version: str) -> dict[str, int] | None:
        with self._lock:
            return next((r.weights for r in reversed(self.received) if r.version == version), None)

    def last_of_epoch(self, epoch: int) -> dict[str, int] | None:
        """The weights of the highest version received from server epoch ``epoch``."""
        with self._lock:
            mine = [(v, r) for r in self.received if (v := parse_version(r.version)) is not None and v[0] == epoch]
        return max(mine, key=lambda vr: vr[0])[1].weights if mine else None

    def summary(self) -> dict[str, Any]:
        """Distinct versions checked, how many were invalid, and version-order problems:
        a version lower than one already seen, or one version with two contents. (The
        same version again with the same content is a resend after a reconnect.)"""
        with self._lock:
            received = list(self.received)
        by_version: dict[str, Received] = {}
        invalid = regressions = conflicts = 0
        best: tuple[int, int] | None = None
        problems: list[str] = []
        for r in received:
            old = by_version.get(r.version)
            if old is not None:
                if (old.weights, old.health) != (r.weights, r.health):
                    conflicts += 1
                continue
            by_version[r.version] = r
            if r.problems:
                invalid += 1
                problems += [f"{r.version}: {p}" for p in r.problems]
            v = parse_version(r.version)
            if v is not None:
                if best is not None and v < best:
                    regressions += 1
                best = v if best is None else max(best, v)
        epochs = sorted({v[0] for v in map(parse_version, by_version) if v is not None})
        return {
            "checked": len(by_version),
            "invalid": invalid,
            "regressions": regressions,
            "conflicts": conflicts,
            "epochs": epochs,
            "problems": problems[:10],
            "streams": self.streams,
        }


# -- load ----------------------------------------------------------------------------------


class Load:
    """Open-loop GETs through Envoy at a constant rate in a background thread, until
    :meth:`finish` (or ``max_s``). Each request keeps its intended send time and status,
    so failures can be placed relative to the fault."""

    def __init__(self, url: str, rate_rps: float = RATE_RPS, max_s: float = 120.0) -> None:
        self.url = url
        self.schedule = arrival_schedule(rate_rps, max_s, arrivals="constant")
        self.start_wall = time.time()
        self._stop = threading.Event()
        self._result: OpenLoopResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)

    def start(self) -> Load:
        self.start_wall = time.time() + 0.05
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result = run_open_loop_sync(
                self.url,
                self.schedule,
                max_inflight=500,
                timeout_s=REQUEST_TIMEOUT_S,
                start_wall=self.start_wall,
                stop=self._stop,
            )
        except BaseException as exc:  # reported by finish()
            self._error = exc

    def finish(self) -> OpenLoopResult:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S + 15)
        if self._thread.is_alive():
            raise BenchError("the load generator did not stop")
        if self._error is not None:
            raise BenchError(f"the load generator failed: {type(self._error).__name__}: {self._error}")
        assert self._result is not None
        return self._result


def _times(res: OpenLoopResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intended send, completion) as epoch seconds, and which requests failed."""
    intended = res.start_wall + res.intended_s
    return intended, intended + res.latency_ms / 1000.0, ~res.ok


# -- the stack -----------------------------------------------------------------------------


class FaultStack(Stack):
    """The live :class:`~balanceiq_lab.stack.Stack` a fault acts on, with the xDS tap, the
    load and the xDS status read from the in-process server or the Ray actor (``actor``)."""

    def __init__(
        self, settings: Settings, workdir: Path, *, actor: Any = None, xds: bool = True, isolate: Sequence[str] = ()
    ) -> None:
        super().__init__(settings, workdir, xds=actor is None and xds, isolate=isolate)
        self.actor = actor
        self.tap = XdsTap(f"127.0.0.1:{settings.xds.port}", self.cluster, self.addresses)
        self.load: Load

    def status(self) -> dict[str, Any]:
        if self.xds is not None:
            return self.xds.status()
        import ray

        return ray.get(self.actor.status.remote(), timeout=10)

    def envoy_node(self, status: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        nodes = (status or self.status()).get("nodes", [])
        return next((n for n in nodes if n["node_id"] == ENVOY_NODE), None)

    def served_weights(self, status: Mapping[str, Any] | None = None) -> dict[str, int]:
        eps = (status or self.status())["clusters"][self.cluster]["endpoints"]
        return {e["address"]: int(e["weight"]) for e in eps}

    def envoy_rejected(self) -> int:
        """Envoy's own count of EDS updates it rejected (reset when Envoy restarts)."""
        name = f"cluster.{self.cluster}.update_rejected"
        r = httpx.get(
            f"{self.testbed.envoy.admin_url}/stats",
            params={"filter": f"^{name}$", "format": "json"},
            timeout=2.0,
            trust_env=False,
        )
        stats = r.json().get("stats", [])
        return int(next((s.get("value", 0) for s in stats if s.get("name") == name), 0))

    def decisions(self) -> list[DecisionRecord]:
        assert self.controller is not None
        return self.controller.log.recent(10_000)[::-1]

    def audit(self, rejected_before: int = 0) -> dict[str, Any]:
        """The weights audit: the tap's findings plus Envoy's rejections."""
        tap = self.tap.summary()
        rejected = rejected_before + self.envoy_rejected()
        return {
            "assignments_checked": tap["checked"],
            "invalid_weights_sent": tap["invalid"] + rejected,
            "envoy_rejected_updates": rejected,
            "tap": tap,
        }


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="balanceiq-faults-") as d:
        yield Path(d)


@contextlib.contextmanager
def _stack(
    settings: Settings,
    workdir: Path,
    *,
    actor: Any = None,
    controller: bool = True,
    isolate: Sequence[str] = (),
    rate_rps: float = RATE_RPS,
    max_load_s: float = 180.0,
    xds: bool = True,
) -> Iterator[FaultStack]:
    """Backends, ALS, Envoy, Prometheus, the tap and the load; the xDS server in-process
    unless ``actor`` is given (or ``xds=False``: someone else serves it); and, with
    ``controller``, a control loop in this process (the production Controller with the
    shipped policy). Everything stops on exit."""
    with FaultStack(settings, workdir, actor=actor, xds=xds, isolate=isolate) as st:
        st.tap.start()
        st.defer(st.tap.stop)
        # The load counts every failure against the fault: it starts once Envoy routes to
        # every endpoint (an Envoy still waiting for its first EDS answers 503).
        st.wait_routable(60.0)
        st.load = Load(st.listen_url, rate_rps, max_load_s).start()
        st.defer(_finish_quietly, st.load)
        if controller:
            from balanceiq.serve.policy import PolicyModel

            model = PolicyModel()
            client = ActorXdsClient(actor) if st.xds is None else None
            st.control_plane(lambda rows: model.score_many([rows])[0], token=API_TOKEN, xds_client=client).start()
        yield st


def _finish_quietly(load: Load) -> None:
    with contextlib.suppress(BenchError):
        load.finish()


def _until(fn: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except httpx.HTTPError:  # an admin read timing out on a loaded machine: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not seen within {timeout:g} s")
        time.sleep(every)


FULL = ("policy", "baseline")  # decision modes that decide (not hold or standby)


def _controller_settled(st: FaultStack, timeout: float = 60.0) -> None:
    """The controller decides from Prometheus telemetry, has pushed at least once, and
    Envoy has ACKed the version the server serves."""

    def settled() -> bool:
        recs = st.decisions()
        full = [r for r in recs if r.mode in FULL]
        if not full or full[-1].source != "prometheus" or not any(r.pushed for r in recs):
            return False
        status = st.status()
        node = st.envoy_node(status)
        return bool(node and node["last_acked_version"] == status["version"])

    _until(settled, timeout, "decisions from Prometheus telemetry, pushed and ACKed by Envoy", every=0.2)


def _common(st: FaultStack, fault: str, res: OpenLoopResult, t0: float, rejected_before: int = 0) -> dict[str, Any]:
    audit = st.audit(rejected_before)
    notes = [f"tap: {p}" for p in audit["tap"]["problems"]]
    failed = ~res.ok
    if failed.any():
        kinds = Counter(
            res.error_kinds[e] if e >= 0 else f"HTTP {c}" for e, c in zip(res.error[failed], res.status[failed])
        )
        when = res.start_wall + res.intended_s[failed]
        notes.append(
            f"failed requests: {dict(kinds)}, sent between {_clock(float(when.min()))} and {_clock(float(when.max()))}"
        )
    return {
        "fault": fault,
        "requests": len(res),
        "invalid_weights_sent": audit["invalid_weights_sent"],
        "assignments_checked": audit["assignments_checked"],
        "envoy_rejected_updates": audit["envoy_rejected_updates"],
        "wall_s": time.monotonic() - t0,
        "notes": notes,
    }


def _clock(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch_s)) + f".{int(epoch_s % 1 * 1000):03d}"


def _require_ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise BenchError("this fault needs Ray: call ray.init() first (the CLI starts a local cluster)")
    return ray


def _versions_repeated(tap: dict[str, Any], pushed: Sequence[str | None] = ()) -> int:
    dup = sum(c - 1 for v, c in Counter(v for v in pushed if v).items() if c > 1)
    return int(tap["regressions"] + tap["conflicts"] + dup)


# -- scenarios -----------------------------------------------------------------------------


def envoy_restarted(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    progress: Progressor = _quiet,
) -> EnvoyRestartedResult:
    """Stop Envoy while the controller runs, start it again: it must come back with the
    version the server serves and exactly those weights."""
    s = settings or fault_settings()
    t0 = time.monotonic()
    with _workdir(workdir) as wd, _stack(s, wd, rate_rps=rate_rps) as st:
        progress("envoy_restarted: waiting for the controller to move traffic off a slow backend")
        # A slow backend makes the controller's weights uneven, so "Envoy came back with
        # the latest weights" cannot be passed by an equal split it might get anyway.
        st.control(st.addresses[2], extra_latency_ms=SLOW_MS)
        _controller_settled(st)
        _until(lambda: len(set(st.served_weights().values())) > 1, 30, "uneven weights pushed", every=0.2)
        pushes_before = sum(1 for r in st.decisions() if r.pushed)
        rejected_before = st.envoy_rejected()  # Envoy's stats start again at 0
        node = st.envoy_node()
        acks0 = node["acks"] if node else 0
        progress("envoy_restarted: restarting Envoy")
        t_stop = time.time()
        st.testbed.envoy.stop()
        t_start = time.time()
        st.testbed.envoy.start()  # returns once admin /ready says LIVE: EDS arrived
        t_ready = time.time()

        def first_ack() -> dict[str, Any] | None:
            n = st.envoy_node()
            return n if n and n["last_acked_at"] and n["last_acked_at"] > t_start else None

        node = _until(first_ack, 10, "Envoy's first ACK after its restart")

        def consistent() -> tuple[str, dict[str, int], dict[str, int]] | None:
            # The controller may push between two reads; only a view in which the
            # server's version did not move while Envoy was read counts. (Envoy's
            # config_dump has no version for EDS of a static cluster; its ACK does.)
            status = st.status()
            latest = status["version"]
            n = st.envoy_node(status)
            if n is None or n["last_acked_version"] != latest:
                return None
            weights = st.envoy_weights()
            if st.status()["version"] != latest:
                return None
            return latest, weights, st.served_weights(status)

        latest, weights, served = _until(consistent, 15, "Envoy on the server's latest version after its restart")
        time.sleep(2.0)  # traffic through the restarted Envoy, counted below
        res = st.load.finish()
        _, done, failed = _times(res)
        outage = (done >= t_stop) & (done <= t_ready + 0.5)
        common = _common(st, "envoy_restarted", res, t0, rejected_before)
        return EnvoyRestartedResult(
            **common,
            failed_requests=int((failed & ~outage).sum()),
            refused_while_down=int((failed & outage).sum()),
            recovery_s=node["last_acked_at"] - t_start,
            down_s=t_ready - t_stop,
            ack_exact=node["acks"] == acks0 + 1,
            latest_version=latest,
            envoy_acked_version=latest,
            envoy_weights=weights,
            weights_match=weights == served,
            pushes_before_restart=pushes_before,
        )


def _share(weights: Mapping[str, int], address: str) -> float:
    return weights[address] / sum(weights.values())


_EXEMPT = re.compile(r"moved ([0-9.eE+-]+) of traffic off .* at once \(exempt from max_shift\)")


def _exempt(rec: DecisionRecord) -> float:
    """Traffic a decision moved at once under a guardrail exemption, from its notes."""
    return sum(float(m.group(1)) for n in rec.notes if (m := _EXEMPT.search(n)))


def _moves(recs: Sequence[DecisionRecord], addresses: Sequence[str]) -> list[float]:
    """Traffic each decision of a run (oldest first) moved: the split it decided against the
    split in force before it. Not from the weights pushed: under LEAST_REQUEST they are
    scaled by the requests each endpoint holds, so they change while the split stands
    still. The split in force is the last one decided while Envoy holds its weights, else
    what the weights say (a controller that adopted weights it did not decide)."""
    out: list[float] = []
    split: np.ndarray | None = None
    held: dict[str, int] | None = None
    for rec in recs:
        if split is not None and held == rec.previous:
            old = split
        else:
            old = weights_to_shares([rec.previous[a] for a in addresses])
        if rec.shares is not None:
            new = np.array([rec.shares[a] for a in addresses], dtype=np.float64)
        elif rec.weights == rec.previous:
            new = old
        else:
            new = weights_to_shares([rec.weights[a] for a in addresses])
        out.append(traffic_moved(old, new))
        split, held = new, rec.weights
    return out


def prometheus_killed(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    after_decisions: int = 8,
    progress: Progressor = _quiet,
) -> PrometheusKilledResult:
    """SIGKILL Prometheus under a running controller: decisions must go on from Envoy's
    admin, and none may move more traffic than the guardrails' ``max_shift``."""
    s = settings or fault_settings()
    t0 = time.monotonic()
    with _workdir(workdir) as wd, _stack(s, wd, rate_rps=rate_rps) as st:
        progress("prometheus_killed: waiting for decisions from Prometheus")
        _controller_settled(st)
        _until(
            lambda: sum(r.source == "prometheus" and r.mode in FULL for r in st.decisions()) >= 3,
            30,
            "three decisions from Prometheus",
            every=0.2,
        )
        prom = st.testbed.prometheus
        assert prom is not None and prom.proc is not None
        progress("prometheus_killed: SIGKILL Prometheus")
        t_kill = time.time()
        prom.proc.kill()
        prom.proc.wait(10)

        def first_fallback() -> DecisionRecord | None:
            return next(
                (r for r in st.decisions() if r.timestamp >= t_kill and r.source == "envoy-admin" and r.mode in FULL),
                None,
            )

        first = _until(first_fallback, 30, "a decision from the Envoy-admin fallback", every=0.1)
        # The world keeps changing while Prometheus is gone: a backend slows down, so the
        # fallback's decisions want to move traffic and the guardrails have work to do.
        # The busiest backend slows: one already at its floor (say the dearest, shed by
        # then) would leave the fallback nothing to move.
        served = st.served_weights()
        slowed = max(st.addresses, key=lambda a: _share(served, a))
        share_before = _share(served, slowed)
        st.control(slowed, extra_latency_ms=SLOW_MS)
        progress(f"prometheus_killed: {after_decisions} decisions on the fallback, {slowed} slowed")
        _until(
            lambda: sum(r.timestamp >= t_kill for r in st.decisions()) >= after_decisions,
            60,
            f"{after_decisions} decisions after the kill",
            every=0.2,
        )
        share_after = _share(st.served_weights(), slowed)
        res = st.load.finish()
        assert st.controller is not None
        max_shift = float(st.controller.guardrails.config.max_shift)
        # From a little before the kill, so a swing on the switch itself is caught too.
        every = st.decisions()
        moves = _moves(every, st.addresses)
        recs = [r for r in every if r.timestamp >= t_kill - 3 * INTERVAL_S]
        after = [r for r in recs if r.timestamp >= t_kill]
        moved = [m for r, m in zip(every, moves) if r.timestamp >= t_kill - 3 * INTERVAL_S]
        # What max_shift governs: the move minus what the guardrails moved at once by
        # their documented exemptions (off a down, drained or SLO-breaching endpoint).
        limited = [m - _exempt(r) for r, m in zip(recs, moved)]
        failed = int((~res.ok).sum())
        common = _common(st, "prometheus_killed", res, t0)
        swings = [(r.seq, round(m, 4), r.notes) for r, m in zip(recs, limited) if m > max_shift + MOVE_TOL]
        if swings:
            common["notes"].append(f"decisions beyond max_shift: {swings}")
        return PrometheusKilledResult(
            **common,
            failed_requests=failed,
            recovery_s=first.timestamp + (first.step_ms or 0.0) / 1000 - t_kill,
            decisions_after=len(after),
            by_source=dict(Counter(r.source for r in after)),
            by_mode=dict(Counter(r.mode for r in after)),
            max_moved=max(moved, default=0.0),
            max_limited_move=max(limited, default=0.0),
            exempt_moves=sum(_exempt(r) > 0 for r in recs),
            max_shift=max_shift,
            swings_beyond_max_shift=len(swings),
            slowed=slowed,
            slowed_share_before=share_before,
            slowed_share_after=share_after,
        )


def backend_killed(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    observe_s: float = 15.0,
    progress: Progressor = _quiet,
) -> BackendKilledResult:
    """SIGKILL one backend's process: the controller must give it weight 1 (no traffic)
    within two control intervals, and errors must fall below 1% within 10 s."""
    s = settings or fault_settings()
    # The cheapest backend: the LP loads it first, so it carries real traffic to lose.
    victim = s.clusters[0].endpoints[3].address
    interval = float(s.control.interval_s)
    t0 = time.monotonic()
    with _workdir(workdir) as wd, _stack(s, wd, rate_rps=rate_rps, isolate=[victim]) as st:
        progress("backend_killed: waiting for the controller to route to every backend")
        _controller_settled(st)

        def carries_traffic() -> bool:
            w = st.envoy_weights()
            return w.get(victim, 0) > 0.1 * max(1, sum(w.values()))

        # A weight of 2 in 10,000 would get no request to fail, and nothing to take off.
        _until(carries_traffic, 30, f"a tenth of the traffic to {victim}", every=0.2)
        proc = st.testbed.isolated[victim].proc
        assert proc is not None
        progress(f"backend_killed: SIGKILL {victim}")
        t_kill = time.time()
        proc.kill()
        proc.wait(10)
        ejected_at = off_at = None
        while time.time() < t_kill + observe_s:
            # Envoy's admin, not the controller's log: what counts is what Envoy does.
            now = time.time()
            try:
                cj = st.envoy_clusters()
            except httpx.HTTPError:  # a slow admin read on a loaded machine: poll again
                continue
            if ejected_at is None and endpoint_health(cj, st.cluster).get(victim):
                ejected_at = now
            if off_at is None and endpoint_weights(cj, st.cluster).get(victim) == 1:
                off_at = now
            time.sleep(0.1)
        res = st.load.finish()
        recs = [r for r in st.decisions() if r.timestamp >= t_kill]
        took = next((r.to_json() for r in recs if r.pushed and r.weights.get(victim) == 1), None)
        intended, _, failed = _times(res)
        since = intended - t_kill
        after_kill = since >= 0
        buckets = np.floor(since[after_kill]).astype(int)
        width = int(buckets.max()) + 1 if buckets.size else 0
        per_s = np.bincount(buckets[failed[after_kill]], minlength=width)
        sent_s = np.bincount(buckets, minlength=width)
        bad = [i for i in range(len(sent_s)) if sent_s[i] and per_s[i] / sent_s[i] >= 0.01]
        first10 = after_kill & (since < 10)
        late = since >= 10
        common = _common(st, "backend_killed", res, t0)
        off_s = None if off_at is None else off_at - t_kill
        return BackendKilledResult(
            **common,
            failed_requests=int(failed.sum()),
            recovery_s=off_s,
            victim=victim,
            interval_s=interval,
            traffic_off_s=off_s,
            traffic_off_intervals=None if off_s is None else off_s / interval,
            ejected_s=None if ejected_at is None else ejected_at - t_kill,
            first_decision=None
            if took is None
            else {k: took[k] for k in ("seq", "timestamp", "mode", "source", "weights", "notes")},
            error_rate_first_10s=_rate(failed, first10),
            error_rate_after_10s=_rate(failed, late),
            errors_settled_s=float(bad[-1] + 1) if bad else 0.0,
            errors_by_second=[int(x) for x in per_s],
            requests_after_10s=int(late.sum()),
        )


def _rate(failed: np.ndarray, mask: np.ndarray) -> float | None:
    n = int(mask.sum())
    return float((failed & mask).sum() / n) if n else None


def actor_killed(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    progress: Progressor = _quiet,
) -> ActorKilledResult:
    """Kill the xDS Ray actor (Ray restarts it) while the controller pushes through it:
    no request may fail, Envoy must resync within 2 s, no version may repeat."""
    ray = _require_ray()
    from balanceiq.xds.actor import start_actor

    s = settings or fault_settings()
    t0 = time.monotonic()
    with _workdir(workdir) as wd:
        actor = start_actor(s, state_dir=wd / "state")
        try:
            with _stack(s, wd, actor=actor, rate_rps=rate_rps) as st:
                progress("actor_killed: waiting for the controller's first pushes")
                _controller_settled(st)
                before = st.status()
                old_pid = before["pid"]
                progress("actor_killed: killing the xDS actor")
                t_kill = time.time()
                ray.kill(actor, no_restart=False)  # a crash: Ray must bring it back

                def restarted() -> dict[str, Any] | None:
                    try:
                        status = ray.get(actor.status.remote(), timeout=2)
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        return None
                    return status if status["pid"] != old_pid else None

                after = _until(restarted, 30, "the restarted xDS actor", every=0.02)

                def envoy_back() -> tuple[dict[str, Any], dict[str, Any]] | None:
                    status = st.status()
                    node = st.envoy_node(status)
                    return (status, node) if node and node["acks"] >= 1 else None

                # Polled every 20 ms: the node's first ACK time is exact while acks == 1.
                _synced, node = _until(envoy_back, 10, "Envoy's ACK on the restarted actor", every=0.02)
                # In force at the kill: the last version of the old epoch Envoy's twin got.
                # Restored: the new epoch's first version (the controller may push after it).
                in_force = st.tap.last_of_epoch(int(before["epoch"]))
                first_new = f"{after['epoch']}.1"
                restored = st.tap.weights_of(first_new) or (
                    st.served_weights(after) if after["version"] == first_new else None
                )
                time.sleep(2.0)  # load and the controller carry on after the resync
                res = st.load.finish()
                listening = after["listening_since"]
                pushed = [r.version for r in st.decisions() if r.pushed]
                common = _common(st, "actor_killed", res, t0)
                tap = st.tap.summary()
                return ActorKilledResult(
                    **common,
                    failed_requests=int((~res.ok).sum()),
                    recovery_s=node["last_acked_at"] - t_kill,
                    restart_s=after["started_at"] - t_kill,
                    bind_s=listening - after["started_at"],
                    resync_s=node["last_acked_at"] - listening,
                    resync_exact=node["acks"] == 1,
                    restored_from_state=bool(after["restored_from_state"]),
                    weights_restored=restored is not None and restored == in_force,
                    epoch_before=int(before["epoch"]),
                    epoch_after=int(after["epoch"]),
                    versions_seen=tap["checked"],
                    versions_repeated=_versions_repeated(tap, pushed),
                )
        finally:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def _replica_pids(app: str, deployment: str = "Controller") -> list[int]:
    """Processes of ``deployment``'s replicas (Ray names the worker after the actor)."""
    marker = f"ServeReplica:{app}:{deployment}"
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def _running_replicas(app: str, deployment: str = "Controller") -> int:
    from ray import serve

    try:
        # Keyed by ReplicaState, a str enum (not public API): "RUNNING" finds its entry.
        states: Mapping[Any, int] = serve.status().applications[app].deployments[deployment].replica_states
    except (KeyError, AttributeError):
        return 0
    return int(states.get("RUNNING", 0))


def lease_audit(audit: Mapping[str, Any]) -> dict[str, Any]:
    """Check the xDS actor's push and lease audit: one holder per term, terms only
    growing, every accepted push from the holder of the newest term seen so far and
    with a version above the last. Returns counts, and ``violations`` (double pushes)."""
    holders = list(audit["holders"])
    term_holder = {h["term"]: h["holder"] for h in holders}
    violations: list[str] = []
    terms = [h["term"] for h in holders]
    if terms != sorted(set(terms)):
        violations.append(f"lease terms not strictly increasing: {terms}")
    newest = -1
    last_version: tuple[int, int] | None = None
    accepted = refused = 0
    for p in audit["pushes"]:
        if not p["accepted"]:
            refused += 1
            continue
        accepted += 1
        newest = max(newest, p["term"])
        if p["term"] < newest:
            violations.append(f"push {p['version']} by {p['owner']} under old term {p['term']} (newest {newest})")
        if term_holder.get(p["term"]) not in (None, p["owner"]):
            violations.append(
                f"push {p['version']} by {p['owner']}, but term {p['term']} is {term_holder[p['term']]}'s"
            )
        v = parse_version(p["version"] or "")
        if p.get("changed") and v is not None:
            if last_version is not None and v <= last_version:
                violations.append(f"version {p['version']} not above the previous push")
            last_version = v
    return {
        "accepted": accepted,
        "refused": refused,
        "violations": violations,
        "owners": [h["holder"] for h in holders],
        "terms": terms,
    }


def serve_replica_killed(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    progress: Progressor = _quiet,
) -> ServeReplicaKilledResult:
    """SIGKILL the Controller deployment's replica of the Serve app: Serve starts a new
    one, which must take the lease over and push, with never two loops pushing."""
    ray = _require_ray()
    from ray import serve

    from balanceiq.serve.app import build_app
    from balanceiq.xds.actor import start_actor
    from balanceiq_lab.xds_audit import AuditedXdsServerActor

    base = settings or fault_settings()
    t0 = time.monotonic()
    with _workdir(workdir) as wd:
        s = base.model_copy(update={"state_dir": wd / "state", "api": base.api.model_copy(update={"token": API_TOKEN})})
        actor = None
        try:
            # The app's Controller gets this actor (the named one): the audit sees its pushes.
            actor = start_actor(s, actor_cls=AuditedXdsServerActor)
            progress("serve_replica_killed: deploying the Serve app (Policy + Controller)")
            serve.start(http_options={"host": "127.0.0.1", "port": s.api.port})
            serve.run(build_app({"settings": s}), name=APP_NAME, route_prefix="/")
            with _stack(s, wd, actor=actor, controller=False, rate_rps=rate_rps) as st:
                progress("serve_replica_killed: waiting for the replica's pushes")

                def pushing() -> dict[str, Any] | None:
                    a = ray.get(actor.audit.remote(), timeout=10)
                    ok = [p for p in a["pushes"] if p["accepted"] and p.get("changed")]
                    node = st.envoy_node()
                    return a if ok and a["holders"] and node and node["acks"] else None

                before = _until(pushing, 90, "the Serve controller pushing weights", every=0.25)
                old_owner = before["holders"][-1]["holder"]
                pids = _replica_pids(APP_NAME)
                if len(pids) != 1:
                    raise BenchError(f"expected one Controller replica process, found {pids}")
                progress("serve_replica_killed: SIGKILL the Controller replica")
                t_kill = time.time()
                os.kill(pids[0], signal.SIGKILL)

                replaced_at: float | None = None

                def taken_over() -> dict[str, Any] | None:
                    nonlocal replaced_at
                    if replaced_at is None and [p for p in _replica_pids(APP_NAME) if p != pids[0]]:
                        replaced_at = time.time()  # Serve started the new replica's process
                    a = ray.get(actor.audit.remote(), timeout=10)
                    return a if any(h["holder"] != old_owner for h in a["holders"]) else None

                progress("serve_replica_killed: waiting for a new replica to take the lease")
                audit = _until(taken_over, 90, "a new controller holding the lease", every=0.1)
                takeover = next(h for h in audit["holders"] if h["holder"] != old_owner)
                new_owner = takeover["holder"]

                def new_push() -> dict[str, Any] | None:
                    a = ray.get(actor.audit.remote(), timeout=10)
                    return next((p for p in a["pushes"] if p["accepted"] and p["owner"] == new_owner), None)

                first_push: dict[str, Any] | None = None
                with contextlib.suppress(BenchError):
                    first_push = _until(new_push, 15, "a push by the new controller", every=0.1)
                # Three more intervals: the new loop alone, pushing or holding.
                time.sleep(3 * INTERVAL_S)
                audit = ray.get(actor.audit.remote(), timeout=10)
                running = _running_replicas(APP_NAME)
                res = st.load.finish()
                checked = lease_audit(audit)
                after = [p for p in audit["pushes"] if p["accepted"] and p["at"] >= takeover["at"]]
                common = _common(st, "serve_replica_killed", res, t0)
                common["notes"] += checked["violations"][:10]
                if first_push is None:
                    common["notes"].append(
                        "the new controller held the lease but pushed nothing in 15 s (weights unchanged)"
                    )
                tap = st.tap.summary()
                return ServeReplicaKilledResult(
                    **common,
                    failed_requests=int((~res.ok).sum()),
                    recovery_s=takeover["at"] - t_kill,
                    replaced_s=None if replaced_at is None else replaced_at - t_kill,
                    first_push_s=None if first_push is None else first_push["at"] - t_kill,
                    owners=[o.split(":")[-1] for o in checked["owners"]],
                    lease_terms=checked["terms"],
                    pushes_accepted=checked["accepted"],
                    pushes_refused=checked["refused"],
                    double_pushes=len(checked["violations"]),
                    owners_after_takeover=len({p["owner"] for p in after}),
                    running_replicas=running,
                    versions_repeated=_versions_repeated(tap),
                )
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)


def ray_head_restart(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    rate_rps: float = RATE_RPS,
    outage_s: float = 3.0,
    ray_init: Mapping[str, Any] | None = None,
    progress: Progressor = _quiet,
) -> RayHeadRestartResult:
    """Take the whole Ray cluster down (``ray.shutdown()`` of the local cluster this
    process started: GCS, raylet, the xDS actor) and start a new one with ``ray_init``
    (default :data:`LOCAL_RAY`). Envoy must keep serving its last weights with no failed
    request; the new actor must restore them from ``state_dir`` under a new epoch.

    Leaves the new Ray cluster running for the caller to shut down."""
    ray = _require_ray()
    from balanceiq.xds.actor import start_actor

    s = settings or fault_settings()
    init = dict(ray_init or LOCAL_RAY)
    t0 = time.monotonic()
    with _workdir(workdir) as wd:
        actor = start_actor(s, state_dir=wd / "state")
        try:
            with _stack(s, wd, actor=actor, controller=False, rate_rps=rate_rps) as st:
                # Distinct from the config's equal weights, so "restored" cannot be luck.
                pattern = [5, 3, 1, 1]
                weights = {a: 1000 * pattern[i % len(pattern)] for i, a in enumerate(st.addresses)}
                version = ray.get(actor.set_assignment.remote(st.cluster, weights), timeout=10)
                if not ray.get(actor.wait_for_ack.remote(version, ENVOY_NODE, 10.0), timeout=20):
                    raise BenchError(f"Envoy did not ACK {version}")
                _until(lambda: st.envoy_weights() == weights, 10, "Envoy on the pushed weights")
                before = st.status()
                progress("ray_head_restart: ray.shutdown() (the head and every actor go)")
                t_down = time.time()
                ray.shutdown()
                t_gone = time.time()
                polls = held = 0
                while time.time() < t_gone + outage_s:
                    with contextlib.suppress(httpx.HTTPError):  # a slow read is no evidence either way
                        held += st.envoy_weights() == weights
                        polls += 1
                    time.sleep(0.25)
                progress("ray_head_restart: a fresh Ray and xDS actor")
                t_init = time.time()
                ray.init(**init)
                actor = start_actor(s, state_dir=wd / "state")
                st.actor = actor
                after = st.status()
                t_actor = time.time()

                def envoy_back() -> dict[str, Any] | None:
                    node = st.envoy_node()
                    return node if node and node["acks"] >= 1 else None

                node = _until(envoy_back, 15, "Envoy's ACK on the new actor", every=0.02)
                envoy_after = _until(
                    lambda: st.envoy_weights() == weights and st.envoy_weights(), 10, "Envoy on the restored weights"
                )
                # A controller started after the restart (as the redeployed Serve app's
                # would be): a fresh lease, and it starts from the restored split.
                telemetry = Telemetry(s)
                ctl = Controller(s, telemetry, ActorXdsClient(actor), None)
                try:
                    first = ctl.step()
                finally:
                    ctl.release()
                    telemetry.close()
                time.sleep(1.0)
                res = st.load.finish()
                common = _common(st, "ray_head_restart", res, t0)
                if node["acks"] != 1:
                    common["notes"].append(
                        "Envoy ACKed more than once before it was polled: resync_s is an upper bound"
                    )
                tap = st.tap.summary()
                return RayHeadRestartResult(
                    **common,
                    failed_requests=int((~res.ok).sum()),
                    recovery_s=node["last_acked_at"] - t_init,
                    shutdown_s=t_gone - t_down,
                    outage_s=t_init - t_gone,
                    ray_start_s=t_actor - t_init,
                    resync_s=node["last_acked_at"] - after["listening_since"],
                    envoy_weights_held=polls > 0 and held == polls,
                    polls_during_outage=polls,
                    restored_from_state=bool(after["restored_from_state"]),
                    weights_restored=st.served_weights(after) == weights and envoy_after == weights,
                    controller_adopted=first.previous == weights,
                    controller_lease_term=int(ctl.lease.get("term", 0)),
                    controller_first_move=_moves([first], st.addresses)[0] - _exempt(first),
                    controller_mode=first.mode,
                    epoch_before=int(before["epoch"]),
                    epoch_after=int(after["epoch"]),
                    versions_repeated=_versions_repeated(tap),
                )
        finally:
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)


@dataclass(kw_only=True)
class HeadCrashResult(FaultResult):
    """The Ray head dies whole (every process of it SIGKILLed, as a machine that died)
    and is started again with the same ``ray start`` command, nothing else typed.
    ``recovery_s``: ``ray start`` returned -> the first controller decision pushed and
    ACKed by Envoy (``None``: none within ``wait_s``)."""

    gcs_ft: bool  # Redis as the GCS's external storage
    processes_killed: int
    head_down_s: float  # the kill -> ray start returned again
    ray_start_s: float  # the second ray start took this long
    wait_s: float  # how long recovery was waited for
    decision_version: str | None  # the first decision pushed after the restart
    operator_commands: int  # commands typed after the restart besides restarting the head: none
    envoy_weights_held: bool  # every poll of Envoy during the outage == its weights when the head died
    versions_repeated: int

    def checks(self) -> dict[str, tuple[Any, str, bool]]:
        out = {
            **super().checks(),
            "failed_requests": (self.failed_requests, "== 0", self.failed_requests == 0),
            "envoy_weights_held": (self.envoy_weights_held, "true", self.envoy_weights_held),
            "versions_repeated": (self.versions_repeated, "== 0", self.versions_repeated == 0),
        }
        if self.gcs_ft:  # the target; without FT the result only shows the contrast
            back = self.recovery_s is not None and self.recovery_s <= 30.0
            out["recovery_s"] = (self.recovery_s, "<= 30 (no command typed)", back and self.operator_commands == 0)
            # gcs_server, raylet and the actors' workers: the whole head went down.
            out["processes_killed"] = (self.processes_killed, ">= 5", self.processes_killed >= 5)
        return out


def _serve_yaml(workdir: Path, config: Path, proxy_port: int) -> Path:
    """serve_app.yaml as shipped, with this run's config and a proxy port of its own."""
    import yaml

    path = workdir / "serve_app.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": proxy_port},
                "applications": [
                    {
                        "name": "balanceiq",
                        "route_prefix": "/",
                        "import_path": "balanceiq.serve.app:build_app",
                        "args": {"config": str(config)},
                    }
                ],
            },
            sort_keys=False,
        )
    )
    return path


def head_crash(
    settings: Settings | None = None,
    workdir: Path | None = None,
    *,
    gcs_ft: bool = True,
    rate_rps: float = RATE_RPS,
    wait_s: float = 60.0,
    progress: Progressor = _quiet,
) -> HeadCrashResult:
    """A Ray head of its own (``ray start --head``; with ``gcs_ft`` backed by a Redis on
    loopback), the Serve app deployed on it as users do (``serve run --non-blocking`` of
    serve_app.yaml), the testbed and a load through Envoy; then every process of the head
    is SIGKILLed and the head started again with the same command. Measures whether the
    control plane comes back by itself: the first decision pushed and ACKed afterwards,
    read from the API on ``api.port`` (the Controller replica's own server)."""
    import yaml

    from balanceiq.testbed.ports import free_ports
    from balanceiq_lab.gcs import RayHead, RedisProcess

    s = settings or fault_settings()
    t0 = time.monotonic()
    name = "head_crash_gcs_ft" if gcs_ft else "head_crash_no_ft"
    with _workdir(workdir) as wd:
        s = s.model_copy(update={"state_dir": wd / "state"})
        config = wd / "balanceiq.yaml"
        config.write_text(yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False))
        redis = RedisProcess(wd / "redis") if gcs_ft else None
        head = RayHead(wd / "ray", redis=redis, namespace=f"biq-{os.getpid()}")
        api = f"http://127.0.0.1:{s.api.port}"
        http = httpx.Client(timeout=2.0, trust_env=False)

        def decisions() -> list[dict[str, Any]]:
            try:
                r = http.get(api + "/api/decisions", params={"limit": 50})
                return list(r.json()["decisions"]) if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError, KeyError):
                return []

        try:
            if redis is not None:
                redis.start()
            progress(f"{name}: ray start --head" + (" (GCS in Redis)" if gcs_ft else ""))
            head.start()
            exe = str(Path(head.ray_bin).with_name("serve"))
            res = subprocess.run(
                [
                    exe,
                    "run",
                    "--non-blocking",
                    "--address",
                    head.address,
                    str(_serve_yaml(wd, config, free_ports(1)[0])),
                ],
                env=head.env(),
                capture_output=True,
                text=True,
                timeout=180,
            )
            if res.returncode != 0:
                raise BenchError(f"serve run failed ({res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
            with _stack(s, wd, controller=False, xds=False, rate_rps=rate_rps, max_load_s=wait_s + 150) as st:
                progress(f"{name}: waiting for the app's first decisions, pushed and ACKed")
                _until(
                    lambda: any(d["pushed"] and d["acked"] for d in decisions()),
                    90,
                    "a decision pushed and ACKed",
                    every=0.5,
                )
                progress(f"{name}: the head dies (SIGKILL, every process)")
                t_kill = time.time()
                killed = head.kill()
                # Envoy on its own: the weights it had when the last xDS process died, and the
                # requests it keeps serving. (Read after the kill: the app keeps deciding and
                # pushing while the kill goes round the head's processes.)
                polls = held = 0
                last: dict[str, int] | None = None
                t_until = time.monotonic() + 2.0
                while time.monotonic() < t_until:
                    with contextlib.suppress(httpx.HTTPError):
                        now = st.envoy_weights()
                        last = now if last is None else last
                        held += bool(now) and now == last
                        polls += 1
                    time.sleep(0.25)
                progress(f"{name}: ray start --head again (nothing else)")
                start_s = head.start()
                t_back = time.time()
                progress(f"{name}: waiting up to {wait_s:g}s for a decision pushed and ACKed")
                first = None
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and first is None:
                    first = next(
                        (d for d in reversed(decisions()) if d["timestamp"] > t_back and d["pushed"] and d["acked"]),
                        None,
                    )
                    if first is None:
                        time.sleep(0.5)
                time.sleep(1.0)
                load = st.load.finish()
                common = _common(st, name, load, t0)
                if common["notes"]:
                    common["notes"].append(f"head killed at {_clock(t_kill)}, started again at {_clock(t_back)}")
                tap = st.tap.summary()
                return HeadCrashResult(
                    **common,
                    failed_requests=int((~load.ok).sum()),
                    recovery_s=None if first is None else float(first["timestamp"]) - t_back,
                    gcs_ft=gcs_ft,
                    processes_killed=killed,
                    head_down_s=t_back - t_kill,
                    ray_start_s=start_s,
                    wait_s=wait_s,
                    decision_version=None if first is None else first.get("version"),
                    operator_commands=0,
                    envoy_weights_held=polls > 0 and held == polls,
                    versions_repeated=_versions_repeated(tap),
                )
        finally:
            http.close()
            head.stop()
            if redis is not None:
                redis.stop()


SCENARIOS: dict[str, Callable[..., FaultResult]] = {
    "envoy_restarted": envoy_restarted,
    "prometheus_killed": prometheus_killed,
    "backend_killed": backend_killed,
    "actor_killed": actor_killed,
    "serve_replica_killed": serve_replica_killed,
    "ray_head_restart": ray_head_restart,
    "head_crash_gcs_ft": lambda **kw: head_crash(gcs_ft=True, **kw),
    "head_crash_no_ft": lambda **kw: head_crash(gcs_ft=False, **kw),
}


def parse_faults(spec: str | Sequence[str] | None) -> list[str]:
    """Selected faults in run order; BenchError naming any unknown one."""
    if spec is None:
        return list(FAULTS)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    if not names:
        raise BenchError(f"no fault selected; choose from {', '.join(FAULTS)}")
    return [f for f in FAULTS if f in names]


def run_faults(
    faults: str | Sequence[str] | None = None, *, rate_rps: float = RATE_RPS, console: Console | None = None
) -> dict[str, Any]:
    """Every selected scenario, one after the other; a JSON-ready dict keyed by fault
    name. Starts (and stops) a local Ray cluster when a Ray scenario is selected. A
    scenario that cannot complete reports ``{"error": ...}`` and the rest still run."""
    names = parse_faults(faults)
    if not (math.isfinite(rate_rps) and 10 <= rate_rps <= 1000):
        raise BenchError(f"--rate must be in 10..1000 requests/s (loopback, 2 cores), got {rate_rps}")
    console = console or Console(stderr=True)
    results: dict[str, Any] = {}
    started_ray = False
    # Ray's driver prints from its own threads to stdout; stdout is for the JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            with progress_bar(console) as bar:
                task = bar.add_task("faults", total=len(names))

                def say(msg: str) -> None:
                    bar.update(task, description=msg)

                for name in names:
                    if name in RAY_FAULTS:
                        import ray

                        if not ray.is_initialized():
                            say("starting a local Ray cluster")
                            ray.init(**LOCAL_RAY)
                            started_ray = True
                    say(name)
                    try:
                        results[name] = SCENARIOS[name](rate_rps=rate_rps, progress=say).to_json()
                    except BalanceIQError as exc:
                        results[name] = {"fault": name, "error": str(exc), "ok": False}
                    except Exception as exc:  # real processes and Ray: report it, run the rest
                        results[name] = {"fault": name, "error": f"{type(exc).__name__}: {exc}", "ok": False}
                    bar.advance(task)
                    if name in results and "error" not in results[name]:
                        console.log(f"{name}: {'ok' if results[name]['ok'] else 'target missed'}")
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return results


__all__ = [
    "FAULTS",
    "SCENARIOS",
    "FaultResult",
    "XdsTap",
    "actor_killed",
    "backend_killed",
    "check_assignment",
    "envoy_restarted",
    "fault_settings",
    "lease_audit",
    "parse_faults",
    "prometheus_killed",
    "ray_head_restart",
    "run_faults",
    "serve_replica_killed",
]

"""The controller's own metrics, in Prometheus exposition on ``GET /metrics``.

A private registry: the process may host other instrumented libraries (Ray Serve does),
and ``/metrics`` must say only what the controller knows. Names are what the Grafana
dashboard in ``prometheus/grafana-dashboard.json`` queries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

MODES = ("policy", "baseline", "hold", "standby")


class _XdsCounters(Collector):
    """ACK/NACK totals as the xDS server counts them (read from its status, not re-counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acks: dict[str, float] = {}
        self._nacks: dict[str, float] = {}

    def update(self, nodes: list[Mapping[str, object]]) -> None:
        with self._lock:
            for n in nodes:
                node = str(n.get("node_id", ""))
                # Counters must not go down; a restarted xDS server starts from 0 again.
                self._acks[node] = max(self._acks.get(node, 0.0), float(n.get("acks", 0) or 0))  # type: ignore[arg-type]
                self._nacks[node] = max(self._nacks.get(node, 0.0), float(n.get("nacks", 0) or 0))  # type: ignore[arg-type]

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            acks, nacks = dict(self._acks), dict(self._nacks)
        a = CounterMetricFamily("balanceiq_xds_acks", "xDS responses Envoy accepted", labels=["node"])
        n = CounterMetricFamily("balanceiq_xds_nacks", "xDS responses Envoy rejected", labels=["node"])
        for node, v in sorted(acks.items()):
            a.add_metric([node], v)
        for node, v in sorted(nacks.items()):
            n.add_metric([node], v)
        yield a
        yield n


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "balanceiq_decisions", "Control decisions by mode and outcome", ["mode", "outcome"], registry=r
        )
        self.reward = Gauge("balanceiq_decision_reward", "Realised reward of the last interval", registry=r)
        self.push_seconds = Histogram(
            "balanceiq_push_seconds", "set_assignment round trip to the xDS actor", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )  # fmt: skip
        self.ack_seconds = Histogram(
            "balanceiq_ack_seconds", "Push to Envoy's ACK", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )  # fmt: skip
        self.step_seconds = Histogram(
            "balanceiq_decision_seconds", "One decision, observe to push", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )  # fmt: skip
        self.weight = Gauge("balanceiq_endpoint_weight", "Envoy weight in force", ["cluster", "endpoint"], registry=r)
        self.share = Gauge("balanceiq_endpoint_share", "Traffic share asked for", ["cluster", "endpoint"], registry=r)
        self.mode = Gauge("balanceiq_controller_mode", "1 for the mode in force", ["mode"], registry=r)
        self.active = Gauge("balanceiq_controller_active", "1 while this controller holds the lease", registry=r)
        self.guardrail = Counter(
            "balanceiq_guardrail_actions", "Times a guardrail changed a decision", ["guardrail"], registry=r
        )
        self.errors = Counter("balanceiq_decision_errors", "Decisions that failed, by stage", ["stage"], registry=r)
        self.xds = _XdsCounters()
        r.register(self.xds)
        for m in MODES:
            self.mode.labels(m).set(0)

    def set_mode(self, mode: str) -> None:
        for m in MODES:
            self.mode.labels(m).set(1.0 if m == mode else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

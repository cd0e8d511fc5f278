"""The controller's own metrics on ``GET /metrics``, in a private registry (Ray Serve
instruments the same process). Names are what ``prometheus/grafana-dashboard.json`` queries."""

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
    """The metrics of every cluster's controller in one process, labelled by cluster."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "balanceiq_decisions", "Control decisions by mode and outcome", ["cluster", "mode", "outcome"], registry=r
        )
        self.reward = Gauge(
            "balanceiq_decision_reward", "Realised reward of the last interval", ["cluster"], registry=r
        )
        fast = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
        slow = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.push_seconds = Histogram(
            "balanceiq_push_seconds",
            "set_assignment round trip to the xDS actor",
            ["cluster"],
            registry=r,
            buckets=fast,
        )
        self.ack_seconds = Histogram(
            "balanceiq_ack_seconds", "Push to Envoy's ACK", ["cluster"], registry=r, buckets=slow
        )
        self.step_seconds = Histogram(
            "balanceiq_decision_seconds", "One decision, observe to push", ["cluster"], registry=r, buckets=slow
        )
        self.weight = Gauge("balanceiq_endpoint_weight", "Envoy weight in force", ["cluster", "endpoint"], registry=r)
        self.share = Gauge("balanceiq_endpoint_share", "Traffic share asked for", ["cluster", "endpoint"], registry=r)
        self.mode = Gauge("balanceiq_controller_mode", "1 for the mode in force", ["cluster", "mode"], registry=r)
        self.active = Gauge(
            "balanceiq_controller_active", "1 while this controller holds the cluster's lease", ["cluster"], registry=r
        )
        self.guardrail = Counter(
            "balanceiq_guardrail_actions", "Times a guardrail changed a decision", ["cluster", "guardrail"], registry=r
        )
        self.errors = Counter(
            "balanceiq_decision_errors", "Decisions that failed, by stage", ["cluster", "stage"], registry=r
        )
        self.xds = _XdsCounters()
        r.register(self.xds)

    def cluster(self, name: str) -> ClusterMetrics:
        """The view one cluster's controller records through."""
        return ClusterMetrics(self, name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ClusterMetrics:
    """:class:`ControllerMetrics` with the ``cluster`` label filled in."""

    def __init__(self, parent: ControllerMetrics, cluster: str) -> None:
        self.parent = parent
        self.name = cluster
        for m in MODES:
            parent.mode.labels(cluster, m).set(0)

    def decision(self, mode: str, outcome: str, step_s: float | None) -> None:
        self.parent.decisions.labels(self.name, mode, outcome).inc()
        if step_s is not None:
            self.parent.step_seconds.labels(self.name).observe(step_s)

    def error(self, stage: str) -> None:
        self.parent.errors.labels(self.name, stage).inc()

    def guardrail(self, name: str) -> None:
        self.parent.guardrail.labels(self.name, name).inc()

    def set_active(self, active: bool) -> None:
        self.parent.active.labels(self.name).set(1 if active else 0)

    def set_reward(self, reward: float) -> None:
        self.parent.reward.labels(self.name).set(reward)

    def set_mode(self, mode: str) -> None:
        for m in MODES:
            self.parent.mode.labels(self.name, m).set(1.0 if m == mode else 0.0)

    def push(self, seconds: float) -> None:
        self.parent.push_seconds.labels(self.name).observe(seconds)

    def ack(self, seconds: float) -> None:
        self.parent.ack_seconds.labels(self.name).observe(seconds)

    def endpoint(self, address: str, weight: float, share: float) -> None:
        self.parent.weight.labels(self.name, address).set(weight)
        self.parent.share.labels(self.name, address).set(share)

    def xds_nodes(self, nodes: list[Mapping[str, object]]) -> None:
        self.parent.xds.update(nodes)

    def exposition(self) -> bytes:
        return self.parent.exposition()

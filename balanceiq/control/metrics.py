"""The controller's own metrics on ``GET /metrics``, in a private registry (Ray Serve
instruments the same process). Names are what ``prometheus/grafana-dashboard.json`` queries."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

MODES = ("policy", "baseline", "hold", "standby")
_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
Family = tuple[str, str, str, str | None]
_XDS_COUNTERS = {"acks": "xDS responses Envoy accepted", "nacks": "xDS responses Envoy rejected"}


class Counted(Collector):
    """Counters another part keeps, read at scrape time: ``(name, help, label, key)`` per
    family, ``key`` naming the counts in what ``read()`` returns (``None``: all of it)."""

    def __init__(self, read: Callable[[], Mapping[str, Any]], specs: Sequence[Family]) -> None:
        self._read = read
        self._specs = specs

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Names only: registering must not call the (possibly remote) xDS server.
        yield from self._families({})

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield from self._families(self._read())

    def _families(self, data: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
        for name, doc, label, key in self._specs:
            fam = CounterMetricFamily(name, doc, labels=[label])
            for k, n in sorted((data if key is None else data.get(key) or {}).items()):
                fam.add_metric([str(k)], float(n))
            yield fam


class _XdsCounters:
    """ACK/NACK totals as the xDS server counts them (read from its status, not re-counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, float]] = {kind: {} for kind in _XDS_COUNTERS}

    def update(self, nodes: list[Mapping[str, object]]) -> None:
        with self._lock:
            for n in nodes:
                node = str(n.get("node_id", ""))
                for kind, totals in self._totals.items():
                    # Counters must not go down; a restarted xDS server starts from 0 again.
                    totals[node] = max(totals.get(node, 0.0), float(n.get(kind, 0) or 0))  # type: ignore[arg-type]

    def read(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {kind: dict(values) for kind, values in self._totals.items()}


class ControllerMetrics:
    """The metrics of every cluster's controller in one process, labelled by cluster."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        fast = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
        slow = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.decisions = self._new(Counter, "decisions", "Control decisions by mode and outcome", "mode", "outcome")
        self.reward = self._new(Gauge, "decision_reward", "Realised reward of the last interval")
        self.push_seconds = self._new(
            Histogram, "push_seconds", "set_assignment round trip to the xDS actor", buckets=fast
        )
        self.ack_seconds = self._new(Histogram, "ack_seconds", "Push to Envoy's ACK", buckets=slow)
        self.step_seconds = self._new(Histogram, "decision_seconds", "One decision, observe to push", buckets=slow)
        self.weight = self._new(Gauge, "endpoint_weight", "Envoy weight in force", "endpoint")
        self.share = self._new(Gauge, "endpoint_share", "Traffic share asked for", "endpoint")
        self.mode = self._new(Gauge, "controller_mode", "1 for the mode in force", "mode")
        self.active = self._new(Gauge, "controller_active", "1 while this controller holds the cluster's lease")
        self.guardrail = self._new(Counter, "guardrail_actions", "Times a guardrail changed a decision", "guardrail")
        self.errors = self._new(Counter, "decision_errors", "Decisions that failed, by stage", "stage")
        self.xds = _XdsCounters()
        xds = [(f"balanceiq_xds_{kind}", doc, "node", kind) for kind, doc in _XDS_COUNTERS.items()]
        self.registry.register(Counted(self.xds.read, xds))

    def _new(self, kind: type[_Metric], name: str, doc: str, *labels: str, **kw: Any) -> _Metric:
        """``balanceiq_<name>`` in this registry, labelled by cluster and then ``labels``."""
        return kind(f"balanceiq_{name}", doc, ["cluster", *labels], registry=self.registry, **kw)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ClusterMetrics:
    """:class:`ControllerMetrics` with the ``cluster`` label filled in."""

    def __init__(self, parent: ControllerMetrics, cluster: str) -> None:
        self.parent = parent
        self.name = cluster
        self.set_mode(None)

    def decision(self, mode: str, outcome: str, step_s: float) -> None:
        self.parent.decisions.labels(self.name, mode, outcome).inc()
        self.parent.step_seconds.labels(self.name).observe(step_s)

    def error(self, stage: str) -> None:
        self.parent.errors.labels(self.name, stage).inc()

    def guardrail(self, name: str) -> None:
        self.parent.guardrail.labels(self.name, name).inc()

    def set_active(self, active: bool) -> None:
        self.parent.active.labels(self.name).set(1 if active else 0)

    def set_reward(self, reward: float) -> None:
        self.parent.reward.labels(self.name).set(reward)

    def set_mode(self, mode: str | None) -> None:
        """1 for ``mode``, 0 for the others (all 0 for None, before the first decision)."""
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

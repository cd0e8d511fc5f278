"""The ALS collector end to end: gRPC stream in, Prometheus exposition out over HTTP."""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.config import default_settings
from balanceiq.exceptions import TestbedError
from balanceiq.telemetry.als import AlsServer, access_log_config, als_cluster_config
from balanceiq.telemetry.als_collector import BUCKETS, AlsCollector
from balanceiq.telemetry.observation import quantile_from_buckets
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq_lab.testbed.envoy import validate_bootstrap

MS = 1_000_000  # ns
HIST = "balanceiq_upstream_rq_time_seconds"


# -- helpers ------------------------------------------------------------------------------


def entry(
    dur_ns: int | None = 20 * MS,
    *,
    cluster: str = "svc",
    host: str | None = "10.0.0.1",
    port: int = 8080,
    code: int | None = 200,
    start_ns: int = 3 * MS,
    end: str = "upstream",
    log_type: str = "DownstreamEnd",
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy would send it; ``host=None`` means no upstream was picked."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.access_log_type = accesslog_pb2.AccessLogType.Value(log_type)
    c.upstream_cluster = cluster
    if host is not None:
        c.upstream_remote_address.socket_address.address = host
        c.upstream_remote_address.socket_address.port_value = port
    if dur_ns is not None:
        c.time_to_first_upstream_tx_byte.FromNanoseconds(start_ns)
        stop = c.time_to_last_upstream_rx_byte if end == "upstream" else c.time_to_last_downstream_tx_byte
        stop.FromNanoseconds(start_ns + dur_ns)
    if code is not None:
        e.response.response_code.value = code
    return e


def send(target: AlsServer | int, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry], batch: int = 50) -> None:
    """One ALS stream carrying ``entries``, returned once the server has taken all of it."""
    port = target if isinstance(target, int) else target.grpc_port
    entries = list(entries)

    def messages() -> Iterator[als_pb2.StreamAccessLogsMessage]:
        ident = als_pb2.StreamAccessLogsMessage.Identifier(node=base_pb2.Node(id="test-envoy"), log_name="balanceiq")
        for i in range(0, max(len(entries), 1), batch):
            msg = als_pb2.StreamAccessLogsMessage()
            if i == 0:
                msg.identifier.CopyFrom(ident)
            msg.http_logs.log_entry.extend(entries[i : i + batch])
            yield msg

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        reply = stub.StreamAccessLogs(messages(), timeout=10)
    assert isinstance(reply, als_pb2.StreamAccessLogsResponse)


class Scrape:
    """One ``/metrics`` scrape, parsed by prometheus_client's own parser."""

    def __init__(self, url: str) -> None:
        r = httpx.get(url, timeout=5)
        assert r.status_code == 200
        self.samples = [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 if absent: Prometheus' view of a counter)."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else 0.0

    def buckets(self, cluster: str, endpoint: str) -> list[tuple[float, float]]:
        return sorted(
            (float(s.labels["le"]), s.value)
            for s in self.samples
            if s.name == f"{HIST}_bucket"
            and s.labels.get("cluster") == cluster
            and s.labels.get("endpoint") == endpoint
        )

    def endpoints(self, cluster: str) -> set[str]:
        return {
            s.labels["endpoint"]
            for s in self.samples
            if s.name == f"{HIST}_count" and s.labels.get("cluster") == cluster
        }

    def count(self, cluster: str, endpoint: str) -> float:
        return self.get(f"{HIST}_count", cluster=cluster, endpoint=endpoint)

    def sum(self, cluster: str, endpoint: str) -> float:
        return self.get(f"{HIST}_sum", cluster=cluster, endpoint=endpoint)

    def rq(self, cluster: str, endpoint: str, code_class: str) -> float:
        return self.get("balanceiq_upstream_rq_total", cluster=cluster, endpoint=endpoint, code_class=code_class)

    def dropped(self, reason: str) -> float:
        return self.get("balanceiq_als_dropped_total", reason=reason)


@pytest.fixture
def als() -> Iterator[AlsServer]:
    server = AlsServer(AlsCollector())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_als() -> Iterator[AlsServer]:
    # Module scope for hypothesis, which runs one test body many times: each example
    # uses its own cluster name so examples never see each other's series.
    server = AlsServer(AlsCollector())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# -- aggregation ---------------------------------------------------------------------------


def test_counts_and_buckets_per_endpoint(als: AlsServer) -> None:
    a = [4, 15, 15, 16, 30, 120, 2000]  # ms
    b = [25, 26, 27]
    send(
        als,
        [entry(d * MS, host="10.0.0.1") for d in a] + [entry(d * MS, host="10.0.0.2") for d in b],
        batch=4,
    )
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    assert m.endpoints("svc") == {"10.0.0.1:8080", "10.0.0.2:8080"}
    for host, durs in (("10.0.0.1", a), ("10.0.0.2", b)):
        ep = f"{host}:8080"
        assert m.count("svc", ep) == len(durs)
        assert m.sum("svc", ep) == pytest.approx(sum(durs) / 1000)
        got = dict(m.buckets("svc", ep))
        assert set(got) == {*BUCKETS, math.inf}
        for le, cum in got.items():
            # Prometheus buckets are cumulative and inclusive: d <= le.
            assert cum == sum(1 for d in durs if d / 1000 <= le), (ep, le)
    # 15 ms exactly lands in le=0.015, not the next bucket.
    first = dict(m.buckets("svc", "10.0.0.1:8080"))
    assert first[0.015] - first[0.0125] == 2
    assert m.get("balanceiq_als_entries_total") == len(a) + len(b)
    assert m.get("balanceiq_als_streams") == 0  # the stream has ended


def test_code_classes(als: AlsServer) -> None:
    codes = [200, 204, 301, 404, 429, 500, 503, 503, None]
    send(als, [entry(code=c) for c in codes])
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    ep = "10.0.0.1:8080"
    assert {k: m.rq("svc", ep, k) for k in ("2xx", "3xx", "4xx", "5xx", "none")} == {
        "2xx": 2,
        "3xx": 1,
        "4xx": 2,
        "5xx": 3,
        "none": 1,
    }
    # Every answered or reset request with an upstream time is also a latency sample.
    assert m.count("svc", ep) == len(codes)


def test_entries_without_upstream_are_dropped_not_observed(als: AlsServer) -> None:
    no_host = entry(host=None, code=503, dur_ns=None)  # no healthy upstream: Envoy's own 503
    no_cluster = entry(cluster="")
    pipe = entry()
    pipe.common_properties.upstream_remote_address.Clear()
    pipe.common_properties.upstream_remote_address.pipe.path = "/tmp/sock"
    periodic = entry(log_type="DownstreamPeriodic")
    good = entry(10 * MS)
    send(als, [no_host, no_cluster, pipe, periodic, good])
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    assert m.dropped("no_upstream") == 2
    assert m.dropped("malformed") == 1
    assert m.dropped("intermediate") == 1
    assert m.dropped("cardinality") == 0  # exported at zero before any drop
    assert m.get("balanceiq_als_entries_total") == 5
    assert m.endpoints("svc") == {"10.0.0.1:8080"}
    assert m.count("svc", "10.0.0.1:8080") == 1
    assert sum(m.rq("svc", "10.0.0.1:8080", k) for k in ("2xx", "5xx", "none")) == 1


def test_duration_sources(als: AlsServer) -> None:
    send(
        als,
        [
            entry(40 * MS, end="upstream"),
            # Upstream response never completed: the downstream end closes the interval.
            entry(70 * MS, end="downstream", code=504),
            # Connect failure: the request counts against the endpoint, with no duration.
            entry(None, code=503),
        ],
    )
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    ep = "10.0.0.1:8080"
    assert m.count("svc", ep) == 2
    assert m.sum("svc", ep) == pytest.approx(0.110)
    assert m.rq("svc", ep, "5xx") == 2
    assert m.rq("svc", ep, "2xx") == 1


def test_ipv6_endpoint_in_brackets(als: AlsServer) -> None:
    send(als, [entry(host="::1", port=9000), entry(host="2001:db8::7", port=443)])
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    assert m.endpoints("svc") == {"[::1]:9000", "[2001:db8::7]:443"}


def test_cardinality_is_bounded() -> None:
    server = AlsServer(AlsCollector(max_endpoints=2))
    server.start()
    try:
        send(server, [entry(host="10.0.0.1"), entry(host="10.0.0.2"), entry(host="10.0.0.3")])
        # Known series keep counting after the bound is reached.
        send(server, [entry(host="10.0.0.1"), entry(host="10.0.0.4"), entry(host="10.0.0.4")])
        m = Scrape(server.metrics_url)  # type: ignore[arg-type]
    finally:
        server.stop()
    assert m.endpoints("svc") == {"10.0.0.1:8080", "10.0.0.2:8080"}
    assert m.count("svc", "10.0.0.1:8080") == 2
    assert m.dropped("cardinality") == 3
    assert m.get("balanceiq_als_series") == 2


def test_tcp_logs_are_dropped(als: AlsServer) -> None:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.tcp_logs.log_entry.add()
    with grpc.insecure_channel(f"127.0.0.1:{als.grpc_port}") as channel:
        als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter([msg]), timeout=10)
    m = Scrape(als.metrics_url)  # type: ignore[arg-type]
    assert m.dropped("tcp") == 1
    assert m.get("balanceiq_als_entries_total") == 1


def test_own_registry_not_global(als: AlsServer) -> None:
    send(als, [entry()])
    assert REGISTRY.get_sample_value(f"{HIST}_count", {"cluster": "svc", "endpoint": "10.0.0.1:8080"}) is None
    assert (
        als.collector.registry.get_sample_value(f"{HIST}_count", {"cluster": "svc", "endpoint": "10.0.0.1:8080"}) == 1
    )


_cluster_ids = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 20_000 * MS),  # duration, ns
            st.integers(0, 60_000 * MS),  # when the first upstream byte went out, ns
            st.booleans(),  # has an upstream host
            st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]),
        ),
        max_size=120,
    )
)
def test_property_count_and_sum(shared_als: AlsServer, rows: list[tuple[int, int, bool, str]]) -> None:
    cluster = f"prop{next(_cluster_ids)}"
    send(
        shared_als,
        [entry(d, start_ns=t0, cluster=cluster, host=host if up else None) for d, t0, up, host in rows],
        batch=7,
    )
    m = Scrape(shared_als.metrics_url)  # type: ignore[arg-type]
    expected: dict[str, list[int]] = {}
    for d, _, up, host in rows:
        if up:
            expected.setdefault(f"[{host}]:8080" if ":" in host else f"{host}:8080", []).append(d)
    assert m.endpoints(cluster) == set(expected)
    for ep, durs in expected.items():
        assert m.count(cluster, ep) == len(durs)
        assert m.sum(cluster, ep) == pytest.approx(sum(durs) / 1e9, rel=1e-9, abs=1e-9)
        # The +Inf bucket is the count; every bucket holds exactly the samples <= le.
        for le, cum in m.buckets(cluster, ep):
            assert cum == sum(1 for d in durs if d / 1e9 <= le)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(5 * MS, 110 * MS), min_size=1, max_size=200))
def test_bucket_quantiles_within_10ms_up_to_110ms(durs_ns: list[int]) -> None:
    """Any latencies from 5 to 110 ms: p50 and p95 from the default buckets are within 10 ms."""
    c = AlsCollector()
    assert c.observe_entries(entry(d) for d in durs_ns) == len(durs_ns)
    durs = sorted(d / 1e9 for d in durs_ns)
    bounds = [*BUCKETS, math.inf]
    counts = [0] * len(bounds)
    for d in durs:
        counts[bisect.bisect_left(bounds, d)] += 1
    cum = list(itertools.accumulate(counts))
    exported = {
        float(s.labels["le"]): s.value
        for fam in c.registry.collect()
        for s in fam.samples
        if s.name == f"{HIST}_bucket"
    }
    assert [exported[b] for b in bounds] == cum
    n = len(durs)
    for q in (0.5, 0.95):
        true_q = durs[max(0, math.ceil(q * n) - 1)]  # nearest-rank quantile
        assert abs(quantile_from_buckets(list(zip(bounds, cum)), q) - true_q) <= 0.010 + 1e-9


# -- the server's lifecycle ---------------------------------------------------------------


def test_ports_and_url(als: AlsServer) -> None:
    assert als.grpc_port and als.metrics_port and als.grpc_port != als.metrics_port
    assert als.metrics_url == f"http://127.0.0.1:{als.metrics_port}/metrics"


def test_bind_errors_name_the_address() -> None:
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(TestbedError, match=f"gRPC server to 127.0.0.1:{port}"):
            AlsServer(AlsCollector(), grpc_port=port).start()
        with pytest.raises(TestbedError, match=f"/metrics to 127.0.0.1:{port}") as info:
            AlsServer(AlsCollector(), metrics_port=port).start()
        assert isinstance(info.value.__cause__, OSError)


def test_failed_start_releases_the_grpc_port() -> None:
    with listening_socket() as taken:
        server = AlsServer(AlsCollector(), metrics_port=taken.getsockname()[1])
        with pytest.raises(TestbedError):
            server.start()
    assert server.grpc_port is None
    server.stop()  # idempotent after a failed start


def test_stop_twice_and_restart() -> None:
    server = AlsServer(AlsCollector())
    grpc_port, _ = server.start()
    server.stop()
    server.stop()
    # so_reuseport=0 and a clean stop: the same port can be bound again right away.
    again = AlsServer(AlsCollector(), grpc_port=grpc_port)
    assert again.start()[0] == grpc_port
    again.stop()


# -- Envoy configuration -------------------------------------------------------------------


def test_access_log_config_shape() -> None:
    full = access_log_config()
    assert "filter" not in full
    assert full["typed_config"]["common_config"] == {
        "log_name": "balanceiq",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "als_cluster"}},
        "buffer_flush_interval": "0.2s",
        "buffer_size_bytes": 16384,
    }
    assert access_log_config(sample_percent=10)["filter"]["runtime_filter"] == {
        "runtime_key": "balanceiq.als_sample",
        "percent_sampled": {"numerator": 10, "denominator": "HUNDRED"},
        "use_independent_randomness": True,
    }
    frac = access_log_config(sample_percent=0.5)["filter"]["runtime_filter"]["percent_sampled"]
    assert frac == {"numerator": 5000, "denominator": "MILLION"}
    for bad in (-1, 100.5, math.nan):
        with pytest.raises(ValueError):
            access_log_config(sample_percent=bad)
    with pytest.raises(ValueError):
        als_cluster_config("127.0.0.1", 0)


def bootstrap_with_als(sample_percent: float) -> dict[str, Any]:
    bootstrap = copy.deepcopy(render_bootstrap(default_settings()))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [access_log_config("als_cluster", sample_percent=sample_percent)]
    # render_bootstrap may already carry an ALS cluster of its own: ours replaces it.
    clusters = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] != "als_cluster"]
    bootstrap["static_resources"]["clusters"] = [*clusters, als_cluster_config("127.0.0.1", 9977)]
    return bootstrap


@pytest.mark.slow  # runs the real Envoy binary (--mode validate)
@pytest.mark.parametrize("sample_percent", [100.0, 10.0, 0.5])
def test_envoy_accepts_the_access_log_and_cluster(sample_percent: float) -> None:
    validate_bootstrap(bootstrap_with_als(sample_percent))


# -- CLI -----------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balanceiq.telemetry.als", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "balanceiq.telemetry.als", "--grpc-port", "0", "--metrics-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("ready grpc="), line
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        send(int(fields["grpc"]), [entry(12 * MS)])
        m = Scrape(fields["metrics"])
        assert m.count("svc", "10.0.0.1:8080") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--metrics-port", "0"],
        ["--grpc-port", "x", "--metrics-port", "0"],
        ["--grpc-port", "70000", "--metrics-port", "0"],
    ],
)
def test_cli_bad_args_exit_2_with_one_line(args: list[str]) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "error:" in res.stderr


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port"])
def test_cli_bind_failure_exit_2_with_one_line(flag: str) -> None:
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        other = "--metrics-port" if flag == "--grpc-port" else "--grpc-port"
        res = run_cli(flag, str(port), other, "0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert f"127.0.0.1:{port}" in res.stderr
    assert res.stdout == ""


def test_orca_utilization_reads_text_and_json_and_refuses_the_rest() -> None:
    from balanceiq.telemetry.als_collector import orca_utilization

    assert orca_utilization("TEXT cpu_utilization:0.4,rps_fractional:12,application_utilization:0.35") == 0.35
    assert orca_utilization("TEXT cpu_utilization:0.4") == 0.4
    assert orca_utilization('JSON {"cpuUtilization": 0.5, "rpsFractional": 3}') == 0.5
    for bad in (
        "",
        "garbage",
        "TEXT x:1",
        "TEXT cpu_utilization:nan",
        "TEXT cpu_utilization:-1",
        "JSON {not json",
        'JSON ["a"]',
        "BIN AAAA",
        "JSON " + "[" * 30_000 + "]" * 30_000,  # was RecursionError: a header Envoy lets through
    ):
        assert orca_utilization(bad) is None, bad


def test_collector_keeps_each_endpoints_last_orca_report() -> None:
    from prometheus_client import generate_latest

    from balanceiq.telemetry.als_collector import ORCA_HEADER

    col = AlsCollector()
    a, b, c = entry(port=1), entry(port=1), entry(port=2)
    a.response.response_headers[ORCA_HEADER] = "TEXT application_utilization:0.2"
    b.response.response_headers[ORCA_HEADER] = "TEXT application_utilization:0.7"
    c.response.response_headers[ORCA_HEADER] = "nonsense"  # counted, not reported
    assert col.observe_entries([a, b, c]) == 3
    text = generate_latest(col.registry).decode()
    assert 'balanceiq_upstream_orca_utilization{cluster="svc",endpoint="10.0.0.1:1"} 0.7' in text
    assert 'endpoint="10.0.0.1:2"} ' not in text.split("balanceiq_upstream_orca_utilization{", 1)[1].split("\n# ")[0]


# -- /snapshot: the same numbers as /metrics, as compact JSON -------------------------------


def test_snapshot_agrees_with_the_exposition(als: AlsServer) -> None:
    durations = [0.5, 1.0, 2.5, 7.0, 20.0, 20.0, 99.0, 250.0, 11_000.0]  # ms, on and between bounds
    send(
        als,
        [entry(int(d * MS), host="10.0.0.1") for d in durations]
        + [entry(5 * MS, host="10.0.0.2", code=503), entry(None, host="10.0.0.2", code=None)],
    )
    scrape = Scrape(als.metrics_url or "")
    r = httpx.get((als.metrics_url or "").removesuffix("/metrics") + "/snapshot", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    snap = r.json()
    assert snap["format"] == "balanceiq-als-snapshot/1"
    by_key = {(s["cluster"], s["endpoint"]): s for s in snap["series"]}
    for ep in ("10.0.0.1:8080", "10.0.0.2:8080"):
        s = by_key[("svc", ep)]
        les = [*snap["bounds"], math.inf]
        assert list(zip(les, s["buckets"])) == scrape.buckets("svc", ep)
        assert s["buckets"][-1] == scrape.count("svc", ep)
        for klass, n in s["codes"].items():
            assert n == scrape.rq("svc", ep, klass)
    assert by_key[("svc", "10.0.0.2:8080")]["codes"] == {"5xx": 1, "none": 1}

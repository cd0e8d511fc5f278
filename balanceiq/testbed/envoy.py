"""Envoy bootstraps rendered from Settings, as data: each xDS flavour and TLS are one switch. ``envoy/*.yaml`` in the
repo holds the default renderings (kept identical by a test). The update merge window defaults to 0 s (every push is a
whole decision: merging only adds lag), and ``per_endpoint_stats`` is on so Prometheus sees each endpoint."""

from __future__ import annotations

from typing import Any

import httpx
import yaml

from balanceiq.config import Settings
from balanceiq.exceptions import EnvoyError

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS_CTX = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CLUSTER_HEADER = "x-balanceiq-cluster"  # picks a cluster other than the first (see cluster_routes)

API_TYPES = ("ads-sotw", "ads-delta", "eds-sotw", "eds-delta")


def render_bootstrap(
    settings: Settings,
    *,
    api: str | None = None,
    node_id: str = "balanceiq-envoy-0",
    lb_policy: str | None = None,
    health_check_interval_s: float = 5.0,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap as a dict: one listener, one EDS cluster per config cluster."""
    from balanceiq.telemetry.als import access_log_config, als_cluster_config

    api = api or settings.xds.api
    if api not in API_TYPES:
        raise EnvoyError(f"unknown xDS api {api!r}; expected one of {', '.join(API_TYPES)}")
    admin = httpx.URL(settings.envoy.admin_url)
    admin_port = admin.port or (443 if admin.scheme == "https" else 80)
    # The xDS stream's back-off is EnvoyGrpc.retry_policy; GrpcService's own is for
    # other async streams and leaves xDS on Envoy's default (growing to 30 s).
    retry = {"retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}
    api_source = {
        "api_type": "DELTA_GRPC" if api.endswith("delta") else "GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster", "retry_policy": retry}}],
    }
    ads = api.startswith("ads")
    eds_config: dict[str, Any] = {"ads": {}} if ads else {"api_config_source": api_source}
    eds_config["resource_api_version"] = "V3"
    lb = {"lb_policy": lb_policy or settings.envoy.lb_policy}
    # The static cluster Envoy reaches BalanceIQ's xDS server through (HTTP/2, TLS if set).
    xds_host = settings.xds.host if settings.xds.host not in ("0.0.0.0", "::") else "127.0.0.1"
    xds_cluster = als_cluster_config(xds_host, settings.xds.port, "xds_cluster")
    if settings.xds.tls.enabled:
        xds_cluster["transport_socket"] = _xds_tls_socket(settings.xds.tls)
    clusters = [xds_cluster]
    clusters += [_service_cluster(c.name, settings, eds_config, lb, health_check_interval_s) for c in settings.clusters]
    access_log: list[dict[str, Any]] = []
    if settings.telemetry.als_enabled:
        # Per-endpoint latency for any backend: Envoy streams each request's upstream
        # host and timings to BalanceIQ's ALS exporter (balanceiq/telemetry/als.py).
        access_log.append(access_log_config(sample_percent=settings.telemetry.als_sample_percent))
        clusters.append(als_cluster_config("127.0.0.1", settings.telemetry.als_grpc_port))
    listener = _listener(settings.envoy.listen_host, settings.envoy.listen_port, access_log, cluster_routes(settings))
    bootstrap: dict[str, Any] = {
        "node": {"id": node_id, "cluster": "balanceiq"},
        "admin": {"address": {"socket_address": {"address": admin.host or "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
    if ads:
        bootstrap["dynamic_resources"] = {"ads_config": api_source}
    return bootstrap


def _service_cluster(
    name: str, settings: Settings, eds_config: dict[str, Any], lb: dict[str, Any], health_check_interval_s: float
) -> dict[str, Any]:
    """One steered cluster: EDS endpoints and weights, active health checks, outlier detection."""
    return {
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        **lb,
        "eds_cluster_config": {"service_name": name, "eds_config": eds_config},
        "common_lb_config": {"update_merge_window": f"{settings.envoy.update_merge_window_ms / 1000:g}s"},
        "track_cluster_stats": {"per_endpoint_stats": True},
        "health_checks": [
            {
                "timeout": "1s",
                "interval": f"{health_check_interval_s:g}s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/healthz"},
            }
        ],
        # Eject after 5 consecutive 5xx only: gradual degradation is the controller's job (it
        # lowers the weight); success-rate ejection would make the split differ from the weights.
        "outlier_detection": {
            "consecutive_5xx": 5,
            "enforcing_success_rate": 0,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 50,
        },
    }


def _listener(host: str, port: int, access_log: list[dict[str, Any]], routes: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingress listener: one HTTP connection manager routing to the clusters."""
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "ingress",
        **({"access_log": access_log} if access_log else {}),
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return {
        "name": "ingress",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def cluster_routes(settings: Settings) -> list[dict[str, Any]]:
    """Routes to every configured cluster: the first takes ``/``; each other one takes
    requests with ``x-balanceiq-cluster: <name>`` and paths under ``/<name>/`` (the
    prefix stripped), so one listener fronts them all."""
    first, *others = settings.clusters
    routes: list[dict[str, Any]] = []
    for c in others:
        header = {"name": CLUSTER_HEADER, "string_match": {"exact": c.name}}
        routes.append({"match": {"prefix": "/", "headers": [header]}, "route": {"cluster": c.name, "timeout": "10s"}})
        routes.append(
            {"match": {"prefix": f"/{c.name}/"}, "route": {"cluster": c.name, "timeout": "10s", "prefix_rewrite": "/"}}
        )
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": first.name, "timeout": "10s"}})
    return routes


def render_attach(settings: Settings, *, api: str | None = None) -> dict[str, Any]:
    """What an Envoy you already run needs to be steered by BalanceIQ, to merge into its own bootstrap: ``clusters``
    (xDS, one EDS cluster per config cluster, ALS), ``dynamic_resources`` (ADS only, else ``None``) and ``access_log``
    (for each HTTP connection manager whose latency BalanceIQ should see): the pieces of :func:`render_bootstrap`."""
    whole = render_bootstrap(settings, api=api)
    hcm = whole["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {
        "clusters": whole["static_resources"]["clusters"],
        "dynamic_resources": whole.get("dynamic_resources"),
        "access_log": hcm.get("access_log", []),
    }


def render_attach_yaml(settings: Settings, *, api: str | None = None) -> str:
    """:func:`render_attach` as commented YAML, ready to paste."""
    parts = render_attach(settings, api=api)

    def dump(key: str) -> str:
        return yaml.safe_dump({key: parts[key]}, sort_keys=False).rstrip()

    names = ", ".join(c.name for c in settings.clusters)
    out = [
        "# Generated by `balanceiq envoy snippet`: merge into your Envoy's bootstrap so",
        f"# BalanceIQ steers the weights of: {names}. Your listeners and clusters stay as they are.",
        "# 1. Append to static_resources.clusters (rename if yours already use these names):",
        dump("clusters"),
    ]
    if parts["dynamic_resources"] is not None:
        out += ["# 2. Merge into the bootstrap's top-level dynamic_resources (ADS):", dump("dynamic_resources")]
    else:
        out += ["# 2. No dynamic_resources needed: each EDS cluster names the xDS cluster itself."]
    if parts["access_log"]:
        out += [
            "# 3. Append to the access_log of each http_connection_manager routing to these",
            "#    clusters: per-endpoint latency for BalanceIQ's telemetry (ALS).",
            dump("access_log"),
        ]
    out += [
        "# Route to the clusters above as to any other; give the bootstrap a node.id.",
        "# Check the merged file: envoy --mode validate -c merged.yaml",
        "",
    ]
    return "\n".join(out)


def _xds_tls_socket(tls: Any) -> dict[str, Any]:
    """Envoy's side of TLS to the xDS server: verify it, and present a cert for mTLS."""
    if tls.envoy_ca_file is None:
        raise EnvoyError(
            "xds.tls.envoy_ca_file is required to render a bootstrap with TLS: "
            "Envoy must verify the xDS server it takes endpoints from"
        )
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(tls.envoy_ca_file)}}
    ctx: dict[str, Any] = {"@type": TLS_CTX, "common_tls_context": {"validation_context": validation}}
    if tls.server_name:
        ctx["sni"] = tls.server_name
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": tls.server_name}},
            {"san_type": "IP_ADDRESS", "matcher": {"exact": tls.server_name}},
        ]
    if tls.require_client_cert:
        if tls.envoy_cert_file is None:
            raise EnvoyError(
                "xds.tls.envoy_cert_file/envoy_key_file are required when require_client_cert "
                "is true: they are the certificate Envoy presents"
            )
        ctx["common_tls_context"]["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(tls.envoy_cert_file)},
                "private_key": {"filename": str(tls.envoy_key_file)},
            }
        ]
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}

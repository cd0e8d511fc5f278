"""Telemetry: one honest Observation per cluster, from Prometheus or (fallback) Envoy."""

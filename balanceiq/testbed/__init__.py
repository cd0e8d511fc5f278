"""The local testbed: sample backends in three "clouds", Envoy, and (later) Prometheus."""

"""BalanceIQ: learned, cost-aware multi-cloud load balancing for Envoy."""

__version__ = "0.1.0"

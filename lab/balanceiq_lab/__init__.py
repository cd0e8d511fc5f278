"""BalanceIQ's lab: benchmarks, the demos and fault injection, beside the product.

Installed from the repo (``make setup``, or ``pip install -e lab/``); it adds
``balanceiq bench ...`` and ``balanceiq demo`` to the product's CLI through the
``balanceiq.cli`` entry point. The product never imports it (an import-linter contract).
"""

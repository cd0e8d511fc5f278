"""BalanceIQ's lab: benchmarks, the demos and fault injection, beside the product.

Installed from the repo (``make setup``, or ``pip install -e lab/``); it adds
``balanceiq bench ...``, ``balanceiq demo``, ``balanceiq testbed up|down`` and ``balanceiq cluster check`` to the
product's CLI through the ``balanceiq.cli`` entry point, and offers its sample fleet
(:mod:`balanceiq_lab.testbed.fleet`) to the product features that take one. The product never imports it (an import-linter contract).
"""

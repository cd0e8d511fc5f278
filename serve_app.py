"""Entry for ``serve run serve_app:app``: the BalanceIQ Serve application.

The config file comes from ``BALANCEIQ_CONFIG`` (default ``balanceiq.yaml``); see
:mod:`balanceiq.serve.app`. ``serve run serve_app.yaml`` runs the same app with its HTTP
options (loopback, port 8000) spelled out.
"""

from balanceiq.serve.app import build_app

app = build_app()

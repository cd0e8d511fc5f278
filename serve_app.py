# The BalanceIQ Serve application, for all three forms users were given:
#   serve run serve_app:app     imports this module: `app` is bound on the last line
#   serve run serve_app.py      Ray's CLI reads an existing file as a YAML config, so this
#                               file is also YAML: the keys below are that config
#   serve run serve_app.yaml    the same application, HTTP options spelled out
# Every line is both Python (an annotated name) and YAML (a key and its value), which is
# why there is no docstring and why the import sits in an expression. The config file
# comes from BALANCEIQ_CONFIG (default balanceiq.yaml); see balanceiq.serve.app. The API is
# at the config's api.host:api.port (default 127.0.0.1:8000), served by the Controller
# replica itself; Serve's proxy serves it too, on 8001 here (on 8000 for serve_app:app).
# Keep it on loopback unless an authenticating proxy is in front (mutations need the token).
proxy_location: "HeadOnly"
http_options: {"host": "127.0.0.1", "port": 8001}
applications: [{"name": "balanceiq", "route_prefix": "/", "import_path": "balanceiq.serve.app:build_app"}]
balanceiq_app: (app := __import__("balanceiq.serve.app").serve.app.build_app())

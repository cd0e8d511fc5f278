#!/usr/bin/env bash
# Prometheus comes from Debian's package (/usr/bin/prometheus); install it when missing.
# The testbed starts it itself with a temporary data dir, so the service apt may
# register is never used.
set -u
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Prometheus (Debian package) ..."
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
   || { $SUDO apt-get update -qq >/dev/null 2>&1 && \
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
  prometheus --version 2>&1 | head -1
else
  echo "warning: could not install prometheus with apt; telemetry tests will need it" >&2
fi

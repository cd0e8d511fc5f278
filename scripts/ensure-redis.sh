#!/usr/bin/env bash
# Redis comes from Debian's package (/usr/bin/redis-server): Ray's external GCS storage
# for head fault tolerance. Install it when missing. The testbed and the fault test
# start it themselves on loopback with a password and a temporary dir, so the service
# apt may register is never used.
set -u
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Redis (Debian package) ..."
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 \
   || { $SUDO apt-get update -qq >/dev/null 2>&1 && \
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }; then
  redis-server --version 2>&1 | head -1
else
  echo "warning: could not install redis-server with apt; the head fault-tolerance test will need it" >&2
fi

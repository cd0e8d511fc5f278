#!/usr/bin/env bash
# Chromium comes from Debian's package (/usr/bin/chromium); install it when missing.
# The browser test (tests/browser) drives it headless through Playwright with
# executable_path=/usr/bin/chromium, so `playwright install` (which downloads a
# browser build of its own) is never needed.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Chromium (Debian package) ..."
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
   || { $SUDO apt-get update -qq >/dev/null 2>&1 && \
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
  /usr/bin/chromium --version 2>/dev/null | head -1
else
  echo "warning: could not install chromium with apt; the browser test will need it" >&2
  exit 1
fi

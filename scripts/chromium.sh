#!/usr/bin/env bash
# Chromium for the test suite only (`make test`): the status page's test drives it headless (tests/chromium.py).
# Nothing to do when a Chromium is on PATH or $CHROMIUM names one; otherwise Debian's package, as root or with sudo.
set -euo pipefail

if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "senmon test setup: Chromium is missing, and installing it needs root (or sudo), which this user does not have." >&2
    echo "  Install it as root: apt-get install -y --no-install-recommends chromium fonts-liberation" >&2
    echo "  or point \$CHROMIUM at a Chromium or Chrome binary." >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "senmon test setup: Chromium is missing and there is no apt-get here; install Chromium and put it on PATH" \
         "(or point \$CHROMIUM at it)." >&2
    exit 1
  fi
  echo "==> installing chromium (the status page's test drives it headless)"
  packages=(chromium fonts-liberation)
  if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"; then
    "${as_root[@]}" apt-get update -qq  # a fresh image may have no package lists yet
    if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"; then
      echo "senmon test setup: 'apt-get install chromium' failed (see above); install Chromium by hand" \
           "(or point \$CHROMIUM at it)." >&2
      exit 1
    fi
  fi
fi


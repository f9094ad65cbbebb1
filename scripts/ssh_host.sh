#!/usr/bin/env bash
# The `ray up` test's tools (`make test`): tests/test_ray_up.py runs a real `ray up` against this machine over SSH,
# so it needs an SSH server (Debian's openssh-server; the test starts its own sshd on loopback, none is left
# running) and rsync (the cluster launcher's file mounts). Nothing to do when both are here; otherwise Debian's
# packages, as root or with sudo.
set -euo pipefail

if [ -x /usr/sbin/sshd ] && command -v rsync >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "senmon test setup: openssh-server and rsync are missing, and installing them needs root (or sudo)." >&2
  echo "  Install them as root: apt-get install -y --no-install-recommends openssh-server rsync" >&2
  exit 1
fi
echo "==> installing openssh-server and rsync (the 'ray up' test runs the cluster launcher against this machine)"
packages=(openssh-server openssh-client rsync)
install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"; }
if ! install; then
  "${as_root[@]}" apt-get update -qq  # a fresh image may have no package lists yet
  install || { echo "senmon test setup: 'apt-get install openssh-server rsync' failed (see above)" >&2; exit 1; }
fi

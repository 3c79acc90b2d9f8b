#!/usr/bin/env bash
# Install Debian's openssh-server for the namespace-node tests (tests/integration/netns_nodes.py).
# Idempotent and quiet: does nothing when /usr/sbin/sshd is present. Only the binary is used:
# the tests run their own sshd with their own config and keys; no service is started here.
# Needs root and apt (Debian/Ubuntu); exits non-zero with a message otherwise, and the
# namespace-node tests then skip with the reason.
set -euo pipefail

if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_sshd: need root to apt-get install openssh-server" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_sshd: apt-get not found (not Debian/Ubuntu)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package's postinst tries to start the service; there is no init system here.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
log=/tmp/install_sshd.log
if ! apt-get install -y --no-install-recommends openssh-server openssh-client >"$log" 2>&1; then
    apt-get update >>"$log" 2>&1 || true
    apt-get install -y --no-install-recommends openssh-server openssh-client >>"$log" 2>&1 || {
        echo "install_sshd: apt-get install failed (log: $log)" >&2
        tail -n 5 "$log" >&2
        exit 1
    }
fi
[ -x /usr/sbin/sshd ] || { echo "install_sshd: installed, but /usr/sbin/sshd is still missing" >&2; exit 1; }
echo "install_sshd: installed openssh-server"

#!/usr/bin/env bash
# Install Debian's SLURM (slurm-wlm) and munge for the SLURM integration tests.
# Idempotent: does nothing when sbatch, slurmctld, slurmd and munged are present.
# Needs root and apt (Debian/Ubuntu); exits non-zero with a message otherwise,
# and the tests marked `slurm` then skip with that reason.
set -euo pipefail

have_all() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && { command -v munged >/dev/null || [ -x /usr/sbin/munged ]; }
}

if have_all; then
    echo "install_slurm: slurm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: need root to apt-get install slurm-wlm munge" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: apt-get not found (not Debian/Ubuntu)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Packages' postinst scripts try to start services; there is no init system here.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
if ! apt-get install -y --no-install-recommends slurm-wlm munge >/tmp/install_slurm.log 2>&1; then
    apt-get update >>/tmp/install_slurm.log 2>&1 || true
    apt-get install -y --no-install-recommends slurm-wlm munge >>/tmp/install_slurm.log 2>&1 || {
        echo "install_slurm: apt-get install failed (log: /tmp/install_slurm.log)" >&2
        tail -n 5 /tmp/install_slurm.log >&2
        exit 1
    }
fi
have_all || { echo "install_slurm: installed, but sbatch/slurmctld/slurmd/munged still missing" >&2; exit 1; }
echo "install_slurm: installed slurm-wlm and munge"

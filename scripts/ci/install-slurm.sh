#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurm-wlm, 22.05 on bookworm) and munge, idempotently.
# Only installs packages: the test fixture (tests/slurm_cluster.py) writes its own slurm.conf
# and starts/stops munged, slurmctld and slurmd itself (these machines have no systemd).
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin
have_all() {
  command -v munged >/dev/null && command -v slurmctld >/dev/null &&
    command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v scontrol >/dev/null && [ -s /etc/munge/munge.key ]
}
version() { slurmd -V 2>/dev/null || echo "slurmd (version unknown)"; }

if have_all; then
  echo "slurm already installed: $(version)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-slurm.sh: needs root for apt-get (running as $(id -un))" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "install-slurm.sh: no apt-get on this machine; install Slurm and munge another way" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Keep the daemons from starting from maintainer scripts: the fixture owns them.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
if [ ! -s /etc/munge/munge.key ]; then   # the package normally creates it
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
have_all
echo "slurm installed: $(version)"

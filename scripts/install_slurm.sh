#!/usr/bin/env bash
# Debian packages for the test suite's one-node SLURM cluster (tests start and stop the daemons themselves).
# Needs root and apt; elsewhere the SLURM tests are skipped with this script named as the remedy.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_slurm.sh: needs root and apt-get; SLURM tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null

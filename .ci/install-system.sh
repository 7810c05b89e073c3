#!/usr/bin/env bash
# System packages the launcher tests need (tests/unit/test_launchers_static.py and tests/integration/):
# slurm (controller, node daemon, client) and munge for the emulated cluster, Debian's docker.io
# engine and debootstrap for the container tests, iproute2 and util-linux (ip netns, unshare) for
# the network-namespace test, shellcheck. Idempotent and non-interactive; needs root.
set -euo pipefail

packages=(
    slurmctld slurmd slurm-client munge
    docker.io debootstrap
    iproute2 util-linux
    shellcheck
    ca-certificates
)

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-system.sh: all packages present"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=120 update -q
# No daemons are started here (the tests start their own): policy-rc.d may refuse the services'
# start at install time, which is fine.
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends "${missing[@]}"
echo "install-system.sh: installed ${missing[*]}"

#!/usr/bin/env bash
# Start a real two-node Slurm (n1, n2) on this host, without systemd, for testing.
#
#   cluster/slurm/local/up.sh [STATE_DIR]      (default: $MIMO_SLURM_STATE or /tmp/mimo-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf     (printed at the end; every Slurm command needs it)
#   cluster/slurm/local/down.sh [STATE_DIR]    (stops everything this started, by PID)
#
# Installs `slurmctld slurmd slurm-client munge` when missing (root only; cluster/system-deps.sh),
# then starts our own munged, slurmctld and one slurmd per node. All state, sockets, logs and
# pid files live in STATE_DIR; anything a previous (crashed) run left there is stopped first.
# Ports: free ones are picked unless CTLD_PORT / N1_PORT / N2_PORT are set.
# Separate hosts (hosts-up.sh sets these): N1_ADDR / N2_ADDR are the nodes' NodeAddr (default
# 127.0.0.1), N1_NETNS / N2_NETNS the network namespaces their slurmd run in; slurmctld runs in
# N1_NETNS at N1_ADDR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="$(realpath -m "${1:-${MIMO_SLURM_STATE:-/tmp/mimo-slurm}}")"
WAIT_S="${WAIT_S:-30}"
N1_ADDR="${N1_ADDR:-127.0.0.1}" N2_ADDR="${N2_ADDR:-127.0.0.1}"
N1_NETNS="${N1_NETNS:-}" N2_NETNS="${N2_NETNS:-}"

die() { echo "slurm-local: $*" >&2; exit 1; }
# Exit 3: Slurm cannot be installed here at all (tests skip with this reason instead of failing).
cannot() { echo "slurm-local: cannot install Slurm: $*" >&2; exit 3; }

install_packages() {
    # The one list of OS packages (exit 3 = cannot install here, which the tests report as a skip).
    "$HERE/../../system-deps.sh" slurm
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_munge() {
    # Our own munged with its own key and socket: no dependence on (or damage to) a system one.
    local dir="$STATE/munge"
    mkdir -p "$dir"
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$dir"
    chmod 0755 "$dir"
    chmod 0400 "$dir/munge.key"
    runuser -u munge -- munged --socket="$dir/munge.socket.2" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
        || die "munged failed to start (see $dir/munged.log)"
}

# $1: network namespace ("" = this one), then the command to run in it. nsenter, not `ip netns
# exec`: that also remounts /sys, hiding the cgroup filesystem slurmd insists on.
in_netns() {
    local ns="$1"; shift
    if [[ -n "$ns" ]]; then nsenter --net="/run/netns/$ns" "$@"; else "$@"; fi
}

write_conf() {
    local host ctld; host="$(hostname -s)"
    # In a namespace the controller is reached at n1's address, not at what the host name resolves to.
    ctld="$host"; [[ -n "$N1_NETNS" ]] && ctld="$host($N1_ADDR)"
    sed -e "s|@CTLD_HOST@|$ctld|g" -e "s|@HOSTNAME@|$host|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@N1_ADDR@|$N1_ADDR|g" -e "s|@N2_ADDR@|$N2_ADDR|g" \
        -e "s|@CTLD_PORT@|${CTLD_PORT:-$(free_port)}|g" \
        -e "s|@N1_PORT@|${N1_PORT:-$(free_port)}|g" -e "s|@N2_PORT@|${N2_PORT:-$(free_port)}|g" \
        "$HERE/slurm.conf.in" > "$STATE/slurm.conf.tmp"
    mv "$STATE/slurm.conf.tmp" "$STATE/slurm.conf"
}

wait_idle() {
    # Both nodes idle, or a bounded failure that shows the logs.
    local deadline=$((SECONDS + WAIT_S))
    while (( SECONDS < deadline )); do
        [[ "$(in_netns "$N1_NETNS" sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" == 2 ]] && return 0
        sleep 0.5
    done
    in_netns "$N1_NETNS" sinfo -N >&2 || true
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "nodes n1, n2 not idle after ${WAIT_S}s"
}

[[ $(id -u) -eq 0 ]] || cannot "needs root (SlurmUser=root, munged runs as the munge user)"
install_packages
"$HERE/down.sh" "$STATE" >/dev/null 2>&1 || true   # leftovers of a crashed run
rm -rf "$STATE"
mkdir -p "$STATE"/{ctld,spool,pids,log}
chmod 0755 "$STATE"
start_munge
write_conf
export SLURM_CONF="$STATE/slurm.conf"
in_netns "$N1_NETNS" slurmctld || die "slurmctld failed (see $STATE/log/slurmctld.log)"
in_netns "$N1_NETNS" slurmd -N n1 || die "slurmd -N n1 failed (see $STATE/log/slurmd-n1.log)"
in_netns "$N2_NETNS" slurmd -N n2 || die "slurmd -N n2 failed (see $STATE/log/slurmd-n2.log)"
wait_idle
echo "export SLURM_CONF=$SLURM_CONF"

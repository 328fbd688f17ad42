#!/usr/bin/env bash
# Stop and delete what hosts-up.sh made in STATE_DIR: Slurm (down.sh: jobs, slurmd, slurmctld,
# munged), the sshds by their pid files, then every process still inside the two namespaces (by
# the PIDs `ip netns pids` lists: only what ran in them, e.g. a job's Ray daemons), then the
# namespaces themselves (which deletes the veth pair). Safe to run twice or on a half-made setup.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="$(realpath -m "${1:-${MIMO_HOSTS_STATE:-/tmp/mimo-hosts}}")"

# $1: pid file, $2: the binary it must be (a stale pid may belong to someone else by now).
stop_pid() {
    local pid
    [[ -f "$1" ]] || return 0
    pid="$(tr -dc 0-9 < "$1")"
    [[ -n "$pid" && "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *"/$2" ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
}

# The namespaces hosts-up.sh recorded ("host namespace address" per line).
namespaces=()
[[ -f "$STATE/hosts" ]] && mapfile -t namespaces < <(awk '{print $2}' "$STATE/hosts")

if [[ -d "$STATE/slurm" ]]; then
    # The bin/ wrappers let down.sh's scontrol/scancel reach slurmctld inside h1.
    PATH="$STATE/bin:$PATH" "$HERE/down.sh" "$STATE/slurm" >/dev/null 2>&1
fi
for pidfile in "$STATE"/ssh/sshd-*.pid; do stop_pid "$pidfile" sshd; done
for ns in "${namespaces[@]}"; do
    [[ -e "/run/netns/$ns" ]] || continue
    for sig in TERM KILL; do
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        [[ -z "${pids// }" ]] && break
        # shellcheck disable=SC2086
        kill -"$sig" $pids 2>/dev/null
        for _ in $(seq 25); do [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] && break; sleep 0.2; done
    done
    ip netns del "$ns" 2>/dev/null
done
echo "hosts-local: stopped and deleted (state in $STATE)"

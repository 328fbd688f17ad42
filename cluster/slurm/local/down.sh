#!/usr/bin/env bash
# Stop the local Slurm that up.sh started in STATE_DIR: cancel its jobs, then stop slurmd,
# slurmctld and munged by the PIDs in their pid files. Never by name (other Slurm or munge
# daemons on this host are not ours). Safe to run twice or on a half-started cluster.
set -uo pipefail

STATE="$(realpath -m "${1:-${MIMO_SLURM_STATE:-/tmp/mimo-slurm}}")"
export SLURM_CONF="$STATE/slurm.conf"

# $1: pid file, $2: the binary it must be (a stale pid may belong to someone else by now).
stop_pid() {
    local pidfile="$1" exe="$2" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(tr -dc 0-9 < "$pidfile")"
    [[ -n "$pid" && "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *"/$exe" ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
}

# Processes of our jobs carry our SLURM_CONF in their environment; only needed when the
# controller could not cancel them (crashed run). Skips this script and its ancestors.
kill_job_leftovers() {
    local mine=" $$ " p=$$
    while [[ "$p" -gt 1 ]]; do p="$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1)"; mine+="$p "; done
    for env in /proc/[0-9]*/environ; do
        local pid="${env#/proc/}"; pid="${pid%/environ}"
        [[ "$mine" == *" $pid "* ]] && continue
        if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
            kill -KILL "$pid" 2>/dev/null
        fi
    done
}

if [[ -f "$SLURM_CONF" ]] && scontrol ping >/dev/null 2>&1; then
    jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// }" ]]; then
        # shellcheck disable=SC2086
        scancel --full $jobs 2>/dev/null
        for _ in $(seq 60); do [[ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
fi
for node in n1 n2; do stop_pid "$STATE/pids/slurmd-$node.pid" slurmd; done
stop_pid "$STATE/pids/slurmctld.pid" slurmctld
kill_job_leftovers
stop_pid "$STATE/munge/munged.pid" munged
echo "slurm-local: stopped (state in $STATE)"

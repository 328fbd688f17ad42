#!/usr/bin/env bash
# Install the OS packages a part of this project needs, when they are missing.
#
#   cluster/system-deps.sh GROUP [GROUP ...]      e.g.  cluster/system-deps.sh ssh slurm
#   cluster/system-deps.sh --list                 every group, its programs and packages
#
# This file is the one list of what the project needs from the operating system beyond
# Python, a C++ compiler (DeepSpeed's JIT build) and git, which the supported images ship.
# The test fixtures and cluster/slurm/local/up.sh call it, so a fresh machine needs nothing
# installed by hand. A group is satisfied when all its programs are found; otherwise its
# packages are installed with apt-get (root only; the package index is refreshed once when
# the first try fails, as on a fresh image).
#
# Exit codes: 0 all groups present, 2 usage error, 3 cannot install here (not root, no
# apt-get, or apt-get failed): the tests skip with this script's one-line reason.
set -euo pipefail

# group -> "programs (absolute paths where the daemons are not on a user's PATH) | packages"
declare -A GROUPS_=(
    # `ray up` / `ray submit` on an on-prem cluster: ssh to the head, rsync of file_mounts;
    # the tests run their own sshd on 127.0.0.1.
    [ssh]="/usr/sbin/sshd ssh ssh-keygen rsync | openssh-server openssh-client rsync"
    # The real local Slurm of cluster/slurm/local/ (controller, node daemons, client, munge).
    [slurm]="slurmctld slurmd srun sbatch scontrol munged | slurmctld slurmd slurm-client munge"
    # Two "hosts" on one machine (cluster/slurm/local/hosts-up.sh): network namespaces + veth.
    [netns]="ip | iproute2"
    # DeepSpeed's multi-node launcher (`deepspeed --hostfile`, its default `--launcher pdsh`).
    [pdsh]="pdsh | pdsh"
    # A headless browser for tests/test_mlflow_ui.py, which looks at the MLflow UI as a user would
    # (`chromium --headless`, driven over its DevTools port); the fonts render the pages' text.
    [chromium]="chromium | chromium fonts-dejavu-core"
)

die() { echo "system-deps: $*" >&2; exit 2; }
cannot() { echo "system-deps: cannot install $*" >&2; exit 3; }

missing_programs() {  # $1: group -> the programs of the group that are not found
    local programs="${GROUPS_[$1]%%|*}" out=()
    for prog in $programs; do
        if [[ "$prog" == /* ]]; then [[ -x "$prog" ]] || out+=("$prog")
        else command -v "$prog" >/dev/null || out+=("$prog"); fi
    done
    echo "${out[*]:-}"
}

install_group() {  # $1: group
    local missing packages
    missing="$(missing_programs "$1")"
    [[ -z "$missing" ]] && return 0
    packages="${GROUPS_[$1]#*| }"
    [[ $(id -u) -eq 0 ]] || cannot "'$1' ($packages): missing $missing and not root"
    command -v apt-get >/dev/null || cannot "'$1' ($packages): missing $missing and no apt-get"
    echo "system-deps: installing $packages (missing: $missing)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q $packages >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $packages >/dev/null 2>&1; } \
        || cannot "'$1': apt-get install $packages failed"
    missing="$(missing_programs "$1")"
    [[ -z "$missing" ]] || cannot "'$1': $missing still missing after installing $packages"
}

[[ $# -gt 0 ]] || die "usage: $0 GROUP [GROUP ...] | --list (groups: ${!GROUPS_[*]})"
if [[ "$1" == "--list" ]]; then
    for g in "${!GROUPS_[@]}"; do echo "$g: programs ${GROUPS_[$g]%%|*}| packages ${GROUPS_[$g]#*| }"; done
    exit 0
fi
for g in "$@"; do [[ -n "${GROUPS_[$g]:-}" ]] || die "unknown group '$g' (groups: ${!GROUPS_[*]})"; done
for g in "$@"; do install_group "$g"; done

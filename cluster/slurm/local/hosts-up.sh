#!/usr/bin/env bash
# Two "hosts" h1, h2 on this machine, each a network namespace with its own address, and a real
# two-node Slurm across them, for testing the cluster scripts on separate addresses.
#
#   cluster/slurm/local/hosts-up.sh [STATE_DIR]     (default: $MIMO_HOSTS_STATE or /tmp/mimo-hosts)
#   export PATH=STATE_DIR/bin:$PATH SLURM_CONF=STATE_DIR/slurm/slurm.conf   (printed at the end)
#   cluster/slurm/local/hosts-down.sh [STATE_DIR]   (stops and deletes everything, by PID)
#
# h1 = namespace $PREFIX-h1 at $SUBNET.1, h2 = $PREFIX-h2 at $SUBNET.2 (defaults mimo, 10.77.0),
# joined by one veth pair (interfaces veth-h1, veth-h2), loopback up; they reach each other and
# nothing else. In them: slurmctld (h1), one slurmd per host (n1 in h1, n2 in h2, NodeAddr = the
# host's address; cluster/slurm/local/up.sh), and one sshd per host on port 22 of its address with
# a host key and a client key for root made here (for `deepspeed --hostfile`'s pdsh/ssh).
# STATE_DIR/bin holds wrappers: `sbatch`, `scontrol`, ... run in h1 when called from outside the
# hosts, `ssh` uses the client key. Installs iproute2, pdsh, openssh-server and Slurm when
# missing (root only; cluster/system-deps.sh). Anything a previous run left behind is removed first.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="$(realpath -m "${1:-${MIMO_HOSTS_STATE:-/tmp/mimo-hosts}}")"
PREFIX="${PREFIX:-mimo}"
SUBNET="${SUBNET:-10.77.0}"

die() { echo "hosts-local: $*" >&2; exit 1; }
cannot() { echo "hosts-local: cannot set up hosts: $*" >&2; exit 3; }

[[ $(id -u) -eq 0 ]] || cannot "needs root (network namespaces, sshd, Slurm)"
"$HERE/../../system-deps.sh" netns pdsh ssh slurm || exit $?
"$HERE/hosts-down.sh" "$STATE" >/dev/null 2>&1 || true   # leftovers of a crashed run
rm -rf "$STATE"
mkdir -p "$STATE"/{bin,ssh,home}
chmod 0755 "$STATE"
chmod 0700 "$STATE/home"

make_hosts() {
    # The namespaces are created and recorded first, so hosts-down.sh finds them even if a later
    # step fails; the veth ends are created inside them (no name ever exists outside).
    for h in h1 h2; do
        ip netns add "$PREFIX-$h"
        echo "$h $PREFIX-$h $SUBNET.${h#h}" >> "$STATE/hosts"
        ip -n "$PREFIX-$h" link set lo up
    done
    ip link add veth-h1 netns "$PREFIX-h1" type veth peer name veth-h2 netns "$PREFIX-h2"
    for h in h1 h2; do
        ip -n "$PREFIX-$h" addr add "$SUBNET.${h#h}/24" dev "veth-$h"
        ip -n "$PREFIX-$h" link set "veth-$h" up
    done
}

write_wrappers() {
    # Slurm clients reach slurmctld only from inside the hosts: outside, run them in h1.
    # Inside a host (a job, an ssh session) they run where they are. bash, not sh: dash drops
    # the exported bash functions (BASH_FUNC_*) a batch script passes to its srun tasks.
    for cmd in sbatch srun salloc scontrol scancel squeue sinfo; do
        cat > "$STATE/bin/$cmd" <<EOF
#!/bin/bash
[ -z "\$(ip netns identify \$\$ 2>/dev/null)" ] && exec nsenter --net=/run/netns/$PREFIX-h1 $(command -v "$cmd") "\$@"
exec $(command -v "$cmd") "\$@"
EOF
    done
    # What a ~/.ssh/config entry does on a real cluster: the key, and no prompts about new hosts.
    cat > "$STATE/bin/ssh" <<EOF
#!/bin/sh
exec $(command -v ssh) -i $STATE/ssh/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o BatchMode=yes "\$@"
EOF
    chmod 0755 "$STATE"/bin/*
}

start_sshd() {  # $1: host (h1|h2), $2: its address
    local dir="$STATE/ssh"
    cat > "$dir/sshd_config-$1" <<EOF
ListenAddress $2
Port 22
HostKey $dir/host_ed25519
PidFile $dir/sshd-$1.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv HOME=$STATE/home
EOF
    mkdir -p /run/sshd   # sshd's privilege-separation directory
    nsenter --net="/run/netns/$PREFIX-$1" /usr/sbin/sshd -f "$dir/sshd_config-$1" -E "$dir/sshd-$1.log" \
        || die "sshd in $1 failed (see $dir/sshd-$1.log)"
}

wait_ssh() {  # every host answers over ssh from h1, bounded
    local deadline=$((SECONDS + 30))
    for addr in "$SUBNET.1" "$SUBNET.2"; do
        until nsenter --net="/run/netns/$PREFIX-h1" "$STATE/bin/ssh" "root@$addr" true 2>/dev/null; do
            (( SECONDS < deadline )) || die "no ssh to $addr after 30s (see $STATE/ssh/*.log)"
            sleep 0.3
        done
    done
}

make_hosts
write_wrappers
ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh/host_ed25519"
ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh/id_ed25519"
cp "$STATE/ssh/id_ed25519.pub" "$STATE/ssh/authorized_keys"
start_sshd h1 "$SUBNET.1"
start_sshd h2 "$SUBNET.2"
wait_ssh
# Fixed ports: each namespace has all of its own free.
N1_ADDR="$SUBNET.1" N2_ADDR="$SUBNET.2" N1_NETNS="$PREFIX-h1" N2_NETNS="$PREFIX-h2" \
    CTLD_PORT=6817 N1_PORT=6818 N2_PORT=6818 "$HERE/up.sh" "$STATE/slurm" >/dev/null
echo "hosts-local: h1 $SUBNET.1 ($PREFIX-h1), h2 $SUBNET.2 ($PREFIX-h2); Slurm n1 on h1, n2 on h2"
echo "export PATH=$STATE/bin:\$PATH SLURM_CONF=$STATE/slurm/slurm.conf"

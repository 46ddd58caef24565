#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, to try the batch scripts in scripts/slurm/
# (the test suite uses it). Needs root; Debian's slurm-wlm and munge packages are installed when missing.
#
#   scripts/slurm_local.sh up   [DIR]   start munged (unless one runs), slurmctld and slurmd; print SLURM_CONF
#   scripts/slurm_local.sh down [DIR]   stop the daemons this script started, by their PIDs
#
# DIR (default /tmp/airynet-slurm) holds slurm.conf, the daemons' state, spool, logs and PID files, and
# `env`, which sets SLURM_CONF for the client commands:   . DIR/env && sbatch ... && squeue
# No systemd and no cgroups are needed: processes are tracked through /proc and accounting is off,
# so query jobs with squeue/scontrol, not sacct.
set -euo pipefail

action=${1:-}
dir=${2:-${AIRYNET_SLURM_DIR:-/tmp/airynet-slurm}}
conf="$dir/slurm.conf"

fail() { echo "slurm_local.sh: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 4))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    fail "$what did not happen within ${seconds}s; see the logs in $dir"
}

stop_pid_file() {  # stop the daemon whose PID we recorded, and wait until it is gone
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

node_idle() { [ "$(SLURM_CONF=$conf sinfo -h -N -o %t 2>/dev/null)" = idle ]; }

up() {
    [ "$(id -u)" = 0 ] || fail "needs root (it runs slurmd and munged and may install packages)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        echo "slurm_local.sh: installing slurm-wlm and munge" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >&2 \
            || fail "apt-get install slurm-wlm munge failed"
    fi
    [ -f "$dir/slurmctld.pid" ] && fail "$dir already holds a running cluster; run: $0 down $dir"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"

    # Munge authenticates SLURM's messages. An already running munged (same key) is reused and left alone.
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        install -d -o munge -g munge -m 0755 /run/munge
        install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
        [ -f /etc/munge/munge.key ] || mungekey --create
        setsid setpriv --reuid=munge --regid=munge --init-groups munged -F \
            >"$dir/log/munged.out" 2>&1 < /dev/null &
        echo $! >"$dir/munged.pid"
        wait_for 20 "munged answering" sh -c 'munge -n | unmunge'
    fi

    local host
    host=$(hostname -s)
    cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: one node, two CPUs, no cgroups, no accounting.
ClusterName=airynet
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${AIRYNET_SLURMCTLD_PORT:-6817}
SlurmdPort=${AIRYNET_SLURMD_PORT:-6818}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$conf" >"$dir/env"

    setsid slurmctld -D -f "$conf" >"$dir/log/slurmctld.out" 2>&1 < /dev/null &
    echo $! >"$dir/slurmctld.pid"
    wait_for 30 "slurmctld answering" env SLURM_CONF="$conf" scontrol ping
    setsid slurmd -D -f "$conf" >"$dir/log/slurmd.out" 2>&1 < /dev/null &
    echo $! >"$dir/slurmd.pid"
    wait_for 60 "node $host idle in sinfo" node_idle
    echo "$conf"
}

down() {
    # slurmd first, so that it does not report the controller missing; munged only if we started it.
    stop_pid_file "$dir/slurmd.pid"
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munged.pid"
}

case $action in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac

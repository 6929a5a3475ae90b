#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd, with accounting: MariaDB + slurmdbd) on this
# machine, for trying the cluster path and for the tests that need one. Debian's packages; run as root.
# Everything (config, munge key, state, spool, logs, pid files, database) lives under one folder.
#   cluster/slurm.sh start   -> prints SLURM_CONF=<path>; export it in every shell that submits
#   cluster/slurm.sh stop    -> cancels the remaining jobs and stops every daemon
#   cluster/slurm.sh status
# LAB_SLURM_DIR picks the folder (default /tmp/lab-slurm); LAB_SLURM_CPUS how many CPUs the node
# declares (default 8: more than the cores, so several 1-CPU test jobs run at once).
set -euo pipefail
ROOT=${LAB_SLURM_DIR:-/tmp/lab-slurm}
CPUS=${LAB_SLURM_CPUS:-8}
NODE=$(hostname)
CLUSTER=lab
export SLURM_CONF=$ROOT/etc/slurm.conf

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v munged >/dev/null && return
    # A policy-rc.d that exits 101 keeps apt from starting the system-wide daemons.
    [ -e /usr/sbin/policy-rc.d ] || printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd \
        slurm-client munge slurmdbd mariadb-server-core mariadb-client-core >/dev/null
}

# This machine's PID 1 may reap dead daemons late: a zombie still answers kill -0.
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}

wait_for() {  # wait_for <what> <command...>: up to 30 s
    local what=$1
    shift
    for _ in $(seq 150); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "slurm.sh: $what did not come up; logs in $ROOT/log" >&2
    exit 1
}

write_config() {
    mkdir -p "$ROOT"/{etc,munge,run,log,state,spool,db}
    chmod 0755 "$ROOT/munge"  # munged refuses a socket folder that others cannot enter
    if [ ! -s "$ROOT/munge/munge.key" ]; then
        dd if=/dev/urandom bs=1 count=1024 of="$ROOT/munge/munge.key" status=none
        chmod 0400 "$ROOT/munge/munge.key"
    fi
    local hw mem
    hw=$(slurmd -C | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    cat >"$ROOT/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A short credential lifetime lets a requeued job start again in seconds instead of minutes.
AuthInfo=socket=$ROOT/munge/munge.socket,cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# slurmdbd connections take the munge socket from here, not from AuthInfo.
AccountingStoragePass=$ROOT/munge/munge.socket
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat >"$ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$ROOT/munge/munge.socket
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ROOT/etc/slurmdbd.conf"
}

start() {
    install_packages
    write_config
    alive "$ROOT/run/munged.pid" || munged --key-file="$ROOT/munge/munge.key" \
        --socket="$ROOT/munge/munge.socket" --pid-file="$ROOT/run/munged.pid" \
        --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munge.seed"
    wait_for munged munge -S "$ROOT/munge/munge.socket" -n
    if ! alive "$ROOT/run/mariadb.pid"; then
        [ -d "$ROOT/db/mysql" ] || mariadb-install-db --user=root --datadir="$ROOT/db" \
            --auth-root-authentication-method=normal >"$ROOT/log/mariadb-install.log" 2>&1
        (mariadbd --user=root --datadir="$ROOT/db" --bind-address=127.0.0.1 --port=3307 \
            --socket="$ROOT/run/mariadb.sock" --pid-file="$ROOT/run/mariadb.pid" \
            --log-error="$ROOT/log/mariadb.log" >/dev/null 2>&1 &)
    fi
    wait_for MariaDB mariadb --protocol=tcp -h 127.0.0.1 -P 3307 -u root -e 'SELECT 1'
    alive "$ROOT/run/slurmdbd.pid" || slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for slurmdbd sacctmgr -n list cluster
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive "$ROOT/run/slurmctld.pid" || slurmctld
    wait_for slurmctld scontrol ping
    alive "$ROOT/run/slurmd.pid" || slurmd -N "$NODE"
    wait_for "the node" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
    echo "SLURM_CONF=$SLURM_CONF"
}

stop_daemon() {  # stop_daemon <pid file>
    local pid
    alive "$1" || return 0
    pid=$(cat "$1" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        alive "$1" || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    [ -d "$ROOT" ] || return 0
    if alive "$ROOT/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    fi
    for daemon in slurmd slurmctld slurmdbd mariadb munged; do
        stop_daemon "$ROOT/run/$daemon.pid"
    done
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) alive "$ROOT/run/slurmctld.pid" && scontrol ping && sinfo ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac

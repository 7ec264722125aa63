#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (munged, slurmctld, slurmd, all as root) for
# tests/slurm. Idempotent: when the cluster already answers with this configuration it only
# prints the conf path. Installs Debian's slurm-wlm and munge first when they are missing, since
# CI runs on a fresh machine. Prints the slurm.conf path on its last line.
#
# Environment: SLURM_CONF_DIR (default /etc/slurm), MEDSSL_SLURM_CPUS (default 8: more than the
# cores so that a small job array and two pretraining jobs run side by side; slurmd is told to
# trust the configured count).
set -euo pipefail

conf_dir=${SLURM_CONF_DIR:-/etc/slurm}
conf=$conf_dir/slurm.conf
cpus=${MEDSSL_SLURM_CPUS:-8}
log_dir=/var/log/slurm
state_dir=/var/spool/slurmctld
spool_dir=/var/spool/slurmd

say() { echo "slurm-up: $*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it writes $conf_dir and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mem=$((mem_mb * 9 / 10))

# The whole cluster config. cons_tres with CR_CPU does not count memory, so jobs need no --mem;
# linuxproc/task none need no cgroups (containers rarely allow them).
wanted=$(cat <<EOF
# Written by medssl .ci/slurm-up.sh: a one-node test cluster.
ClusterName=medssl
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MinJobAge=900
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$state_dir
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

running() {  # running PIDFILE: the daemon whose pid the file names is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {  # stop PIDFILE: end that daemon (only the one this script started) and wait for it
    local pid
    running "$1" || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

mkdir -p "$conf_dir" "$log_dir" "$state_dir" "$spool_dir"
if [[ ! -f $conf ]] || [[ $(cat "$conf") != "$wanted" ]]; then
    say "writing $conf"
    printf '%s\n' "$wanted" >"$conf"
    # A changed config needs fresh daemons; old state would name an old node layout.
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi

# munge: the package creates the key on install; make one if a previous set-up removed it.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 2>/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! running /run/munge/munged.pid; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi

if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    SLURM_CONF=$conf /usr/sbin/slurmctld -f "$conf"
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    SLURM_CONF=$conf /usr/sbin/slurmd -f "$conf"
fi

# Ready when the node is schedulable (idle, mixed or allocated), not just when slurmctld answers.
export SLURM_CONF=$conf
for _ in $(seq 150); do
    state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null || true)
    case $state in
        idle*|mix*|alloc*) echo "$conf"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
die "node $host not ready (state '${state:-none}'); see $log_dir/slurmctld.log and $log_dir/slurmd.log"

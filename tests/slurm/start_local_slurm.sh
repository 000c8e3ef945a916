#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests/test_slurm.py: munge, slurmctld and slurmd on
# localhost, 2 CPUs, one partition "debug". Installs Debian's slurm-wlm and munge when absent
# (needs root and apt), writes /etc/slurm/slurm.conf, starts the daemons and waits until the
# node takes jobs. Prints how long the install and the start took. Safe to run again: daemons
# already answering are left alone.
#   tests/slurm/start_local_slurm.sh          # install if needed, then start
#   tests/slurm/start_local_slurm.sh --stop   # stop the daemons it started
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

stop_slurm() {
    for name in slurmd slurmctld; do
        if [ -f "$STATE/$name.pid" ]; then
            kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
            rm -f "$STATE/$name.pid"
        fi
    done
}

if [ "${1:-}" = --stop ]; then
    stop_slurm
    if [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "start_local_slurm.sh: needs root (apt-get, /etc/slurm, the daemons)" >&2
    exit 1
fi

seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
t0=$(date +%s.%N)
if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi
t1=$(date +%s.%N)

if scontrol ping 2>/dev/null | grep -q 'is UP' && sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    echo "SLURM already up (install $(seconds "$t0" "$t1") s)"
    exit 0
fi
MARK="# written by tests/slurm/start_local_slurm.sh"
if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "start_local_slurm.sh: $CONF exists and was not written by this script; left alone" >&2
    exit 1
fi

mkdir -p "$STATE"/ctld "$STATE"/d /etc/slurm /run/munge
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
# munged refuses to run as root; the package's own user runs it
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi

# proctrack/linuxproc and task/none: no cgroups needed (containers often lack them)
cat > "$CONF" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

stop_slurm
/usr/sbin/slurmctld -c   # -c: forget jobs of an earlier start
/usr/sbin/slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then
        t2=$(date +%s.%N)
        echo "local SLURM up: install $(seconds "$t0" "$t1") s, start $(seconds "$t1" "$t2") s"
        exit 0
    fi
    sleep 0.5
done
echo "start_local_slurm.sh: the node did not become idle in 30 s; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
sinfo >&2 || true
exit 1

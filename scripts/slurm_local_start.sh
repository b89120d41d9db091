#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (for the SLURM tests and the slurm profile).
#
#   sudo scripts/slurm_local_start.sh          # idempotent: does nothing more when it already runs
#   scripts/slurm_local_stop.sh                # stops exactly what this script started
#
# Debian/Ubuntu, as root, without systemd: installs slurm-wlm and munge with apt-get when
# missing, writes slurm.conf for one node (this host, CPUs and memory from `slurmd -C`), starts
# munged (as user munge), slurmctld and slurmd in the background with pid files under $STATE,
# and waits until the node is idle. Facts this relies on (slurm 22.05):
#   - proctrack/linuxproc + task/none work without cgroups/systemd;
#   - select/cons_tres + CR_Core_Memory with DefMemPerCPU (else a job without --mem takes the
#     whole node); RealMemory ~2% below what slurmd -C reports (else the node drains);
#   - no accounting storage: sacct does not work, so the Snakemake profile polls with squeue,
#     which needs MinJobAge (300 s) >= 3 x the plugin's init delay before status checks;
#   - the host name must resolve (here to 127.0.0.1);
#   - GPUs as a generic resource: GresTypes=gpu, Gres=gpu:N on the node, and in gres.conf
#     AutoDetect=off plus File= device files. slurmd 22.05 drops a gpu line that has only a
#     Count (the node then reports 0 GPUs and goes INVAL), so the files are FAKE devices:
#     $STATE/fake-gpu/nvidia0..N-1, character devices with /dev/null's numbers (1, 3), made with
#     mknod (plain files where mknod is refused; slurmd then logs "not a valid character or
#     block device" but counts them). Jobs can request them (--gres=gpu:2) and SLURM sets
#     CUDA_VISIBLE_DEVICES per step from their indices, so the GPU-shaped submission path runs
#     through real sbatch/srun; nothing can compute on them (tests mock CUDA in their process).
# Environment: CLCLUSTER_SLURM_STATE (default /tmp/clcluster-slurm), CLCLUSTER_SLURM_PARTITION
# (default "debug"), CLCLUSTER_SLURM_TIMEOUT (seconds to wait for an idle node, default 120),
# CLCLUSTER_SLURM_FAKE_GPUS (fake GPUs declared on the node, default 2; 0 declares none).
set -euo pipefail

STATE=${CLCLUSTER_SLURM_STATE:-/tmp/clcluster-slurm}
PARTITION=${CLCLUSTER_SLURM_PARTITION:-debug}
TIMEOUT=${CLCLUSTER_SLURM_TIMEOUT:-120}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES_CONF=$CONF_DIR/gres.conf
FAKE_GPUS=${CLCLUSTER_SLURM_FAKE_GPUS:-2}
HOST=$(hostname -s)

say() { echo "slurm_local_start: $*" >&2; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ $(id -u) != 0 ]]; then
    say "must run as root (it installs packages and starts daemons)"; exit 1
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. host name must resolve
if ! getent hosts "$HOST" >/dev/null; then
    say "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi

mkdir -p "$STATE"/{ctld,slurmd,log,run} "$CONF_DIR"
chmod 755 "$STATE"

# 3. munge: key, folders owned by munge, daemon as user munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
chmod 400 /etc/munge/munge.key
if ! alive "$STATE/run/munged.pid"; then
    if pgrep -x munged >/dev/null; then
        say "a munged not started by this script is running; using it"
    else
        say "starting munged"
        rm -f /run/munge/munged.pid
        runuser -u munge -- munged --force
        for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$STATE/run/munged.pid"
    fi
fi
munge -n | unmunge >/dev/null

# 4. slurm.conf (rewritten only when it changes, so that a running cluster is left alone)
NODE_LINE=$(slurmd -C | head -n1)                     # NodeName=vm CPUs=2 Boards=1 ... RealMemory=7937
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
MEM=$((MEM * 98 / 100))
DEFMEM=$((MEM / CPUS / 2))
NODE_LINE=$(sed "s/RealMemory=[0-9]*/RealMemory=$MEM/" <<<"$NODE_LINE")
GRES_TYPES=""
NEW_GRES=""
if ((FAKE_GPUS > 0)); then
    FAKE_DEV=$STATE/fake-gpu
    mkdir -p "$FAKE_DEV"
    for ((i = 0; i < FAKE_GPUS; i++)); do
        [[ -e $FAKE_DEV/nvidia$i ]] || mknod "$FAKE_DEV/nvidia$i" c 1 3 2>/dev/null || touch "$FAKE_DEV/nvidia$i"
    done
    NODE_LINE="$NODE_LINE Gres=gpu:$FAKE_GPUS"
    GRES_TYPES="GresTypes=gpu"
    NEW_GRES="# Written by scripts/slurm_local_start.sh: $FAKE_GPUS FAKE GPUs (device files behave as /dev/null).
AutoDetect=off
NodeName=$HOST Name=gpu File=$FAKE_DEV/nvidia[0-$((FAKE_GPUS - 1))]"
fi
NEW=$(cat <<EOF
# Written by scripts/slurm_local_start.sh: a one-node cluster on $HOST for tests.
ClusterName=clcluster
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=10
InactiveLimit=0
$GRES_TYPES
$NODE_LINE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
if [[ -n $NEW_GRES ]] && { [[ ! -f $GRES_CONF ]] || [[ "$(cat "$GRES_CONF")" != "$NEW_GRES" ]]; }; then
    say "writing $GRES_CONF ($FAKE_GPUS fake GPUs)"
    printf '%s\n' "$NEW_GRES" >"$GRES_CONF"
elif [[ -z $NEW_GRES ]]; then
    rm -f "$GRES_CONF"
fi
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW" ]]; then
    say "writing $CONF (restart the daemons with slurm_local_stop.sh and this script if they run)"
    printf '%s\n' "$NEW" >"$CONF"
    if alive "$STATE/run/slurmctld.pid"; then scontrol reconfigure || true; fi
fi

# 5. daemons (slurmctld -c: clean start without old state on a first start)
if ! alive "$STATE/run/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld -c
fi
if ! alive "$STATE/run/slurmd.pid"; then
    say "starting slurmd"
    slurmd
fi

# 6. wait for an idle node
deadline=$((SECONDS + TIMEOUT))
while true; do
    st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case "$st" in
        idle|mixed|allocated) break ;;
        *drain*|*down*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    if ((SECONDS > deadline)); then
        say "node $HOST not idle after ${TIMEOUT}s (state '$st'); see $STATE/log"; exit 1
    fi
    sleep 1
done
say "cluster up: node $HOST ($CPUS CPUs, ${MEM} MB) state $st, partition $PARTITION; state in $STATE"

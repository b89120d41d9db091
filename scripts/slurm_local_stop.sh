#!/usr/bin/env bash
# Stop the local SLURM cluster started by scripts/slurm_local_start.sh: exactly the daemons whose
# pid files it wrote under $CLCLUSTER_SLURM_STATE (default /tmp/clcluster-slurm), nothing else.
# Pass --purge to delete that state folder too.
set -uo pipefail

STATE=${CLCLUSTER_SLURM_STATE:-/tmp/clcluster-slurm}

stop() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || { echo "slurm_local_stop: $name: no pid file" >&2; return 0; }
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm_local_stop: stopping $name (pid $pid)" >&2
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
}

stop slurmd "$STATE/run/slurmd.pid"
stop slurmctld "$STATE/run/slurmctld.pid"
stop munged "$STATE/run/munged.pid"
if [[ ${1:-} == --purge ]]; then
    rm -rf "$STATE"
fi

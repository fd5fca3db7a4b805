#!/usr/bin/env bash
# Brings up a real single-node Slurm (munged + slurmctld + slurmd) on this
# machine, under a private folder, on non-default ports. Prints the folder;
# `source FOLDER/env` sets SLURM_CONF for sbatch/squeue/scontrol, and
# `slurm-down.sh FOLDER` stops everything it started.
#
# Usage: slurm-up.sh [FOLDER] [PLUGSTACK_CONF]
set -euo pipefail

dir="${1:-$(mktemp -d /tmp/cryo-slurm.XXXXXX)}"
plugstack="${2:-}"
mkdir -p "$dir"/{state,spool,log,tmp}
host="$(hostname -s)"
cpus="$(nproc)"

for cmd in munged mungekey slurmctld slurmd sinfo; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "slurm-up: $cmd not found (install slurm-wlm and munge)" >&2
    exit 2
  fi
done

bash "$(dirname "$0")/munge-up.sh"

# Ports: pick two free ones.
read -r ctld_port slurmd_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)

cat > "$dir/slurm.conf" <<CONF
ClusterName=cryotest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
# The steps' PMIx directories (spmix_appdir_<uid>_<job>.<step>) go here, not
# in /tmp: each test Slurm numbers its jobs from 1 again, and a directory
# left by an earlier Slurm killed mid-step would fail the same step's launch.
TmpFS=$dir/tmp
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
if [ -n "$plugstack" ]; then
  echo "PlugStackConfig=$plugstack" >> "$dir/slurm.conf"
fi
echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -c -f "$SLURM_CONF"
slurmd -c -f "$SLURM_CONF"

for _ in $(seq 100); do
  if sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    echo "$dir"
    exit 0
  fi
  sleep 0.2
done
echo "slurm-up: the node did not become idle; logs in $dir/log" >&2
sinfo >&2 || true
tail -n 20 "$dir/log/"*.log >&2 || true
exit 1

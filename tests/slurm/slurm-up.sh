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
mkdir -p "$dir"/{state,spool,log}
host="$(hostname -s)"
cpus="$(nproc)"

for cmd in munged mungekey slurmctld slurmd sinfo; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "slurm-up: $cmd not found (install slurm-wlm and munge)" >&2
    exit 2
  fi
done

# munge: one key per machine, started once.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c >/dev/null 2>&1 || mungekey --create
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
fi
# Daemons must not inherit the caller's descriptors (a build lock held by
# the test runner, pipes it waits on): munged outlives this script.
detached() {
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      n=${fd##*/}
      if [ "$n" -gt 2 ] 2>/dev/null; then eval "exec $n>&-"; fi
    done
    exec "$@"
  )
}
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! munge -n >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    detached runuser -u munge -- munged --force
  else
    detached munged --force
  fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n >/dev/null

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

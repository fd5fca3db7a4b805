#!/usr/bin/env bash
# Stops the daemons slurm-up.sh started in FOLDER (munged is left running:
# it is shared by the machine and harmless).
set -uo pipefail
dir="$1"
# Jobs first: their slurmstepd processes would outlive slurmd.
if [ -s "$dir/slurm.conf" ] && [ -s "$dir/slurmctld.pid" ]; then
  SLURM_CONF="$dir/slurm.conf" scancel --user="$(id -un)" --full >/dev/null 2>&1
  for _ in $(seq 100); do
    [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.1
  done
fi
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
  if [ -s "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  fi
done
exit 0

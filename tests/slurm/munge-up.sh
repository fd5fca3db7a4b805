#!/usr/bin/env bash
# Makes sure munged runs on this machine (one key per machine, started
# once, left running: it is shared by every Slurm daemon here, including
# those in the namespace cluster's nodes, which reach it by its socket).
set -euo pipefail
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


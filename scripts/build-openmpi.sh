#!/usr/bin/env bash
# Builds the Open MPI flavour of the rank runtime: libcryo_rank_openmpi.so
# and libcryo_rank_openmpi.a, next to the default (MPICH) libcryo_rank in
# $CARGO_TARGET_DIR/<profile> (default target/debug, or target/release with
# --release).
#
# rsmpi's mpi-sys binds the MPI that `$MPICC -show` names when it is built,
# and its build script does not run again when MPICC changes; so this build
# has a target directory of its own ($CARGO_TARGET_DIR/openmpi), and the
# MPICH build's is never touched. MPICC defaults to Open MPI's explicit
# wrapper, mpicc.openmpi (set CRYO_OPENMPI_MPICC for another one).
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"

profile=debug
flags=()
case "${1:-}" in
  "") ;;
  --release) profile=release; flags=(--release) ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

mpicc="${CRYO_OPENMPI_MPICC:-mpicc.openmpi}"
if ! command -v "$mpicc" >/dev/null 2>&1; then
  echo "error: $mpicc not found: install Open MPI (openmpi-bin libopenmpi-dev; scripts/install-deps.sh does)" >&2
  exit 1
fi

target="${CARGO_TARGET_DIR:-$ROOT/target}"
MPICC="$mpicc" CARGO_TARGET_DIR="$target/openmpi" cargo build -p cryo-rank "${flags[@]}"
mkdir -p "$target/$profile"
for ext in so a; do
  # Through a temporary name, so that nothing ever links a half-copied file.
  cp -f "$target/openmpi/$profile/libcryo_rank.$ext" "$target/$profile/.libcryo_rank_openmpi.$ext.tmp"
  mv -f "$target/$profile/.libcryo_rank_openmpi.$ext.tmp" "$target/$profile/libcryo_rank_openmpi.$ext"
done
echo "==> $target/$profile/libcryo_rank_openmpi.so (Open MPI, $("$mpicc" --showme:version 2>&1 | head -1))"

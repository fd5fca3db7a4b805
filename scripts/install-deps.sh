#!/usr/bin/env bash
# Installs what cryo needs on Debian/Ubuntu, non-interactively and
# idempotently: a C and Fortran toolchain, MPICH, Open MPI beside it (for
# the libcryo_rank_openmpi flavour and its tests), libclang (for rsmpi's
# bindgen), zstd, Python with NumPy, mpi4py (Debian's, built against Open
# MPI), pip and venv (for the Python package), Slurm with munge and
# libslurm-dev (for the SPANK plugin and the Slurm tests), iproute2,
# util-linux and nftables (the namespace cluster tests), hyperfine
# (scripts/bench-start.sh), and a Rust toolchain if none is present. Safe to run again and again.
#
# Installing Open MPI would switch Debian's `mpi` (mpicc, mpicxx, ...),
# `mpirun` (mpirun, mpiexec) and `mpi-<arch>` (mpi.h, libmpi.so)
# alternatives to it, since its priority is higher. The default build of
# libcryo_rank and the tests use MPICH through those plain names, so the
# three are pinned to MPICH (manual mode, which a package install leaves
# alone) before and after installing; Open MPI is always called by its
# explicit names (mpicc.openmpi, mpirun.openmpi).
set -euo pipefail

packages=(build-essential pkg-config cmake ca-certificates curl git zstd mpich libmpich-dev libclang-dev clang procps python3 gfortran
  openmpi-bin libopenmpi-dev python3-numpy python3-mpi4py python3-pip python3-venv
  slurm-wlm munge libslurm-dev iproute2 nftables util-linux hyperfine)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Pins the alternative NAME to TARGET (nothing when it already is, in
# manual mode; nothing when TARGET is not installed yet).
pin() {
  local name="$1" target="$2"
  [ -e "$target" ] || return 0
  if update-alternatives --query "$name" 2>/dev/null | grep -q '^Status: manual' &&
    [ "$(update-alternatives --query "$name" | sed -n 's/^Value: //p')" = "$target" ]; then
    return 0
  fi
  echo "==> pinning the $name alternative to $target"
  as_root update-alternatives --set "$name" "$target" >/dev/null
}
pin_mpich() {
  local arch
  arch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)"
  pin mpi /usr/bin/mpicc.mpich
  pin mpirun /usr/bin/mpirun.mpich
  pin "mpi-$arch" "/usr/include/$arch/mpich"
}

pin_mpich
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "==> system packages present"
fi
pin_mpich

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "==> installing the Rust toolchain (rustup)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
echo "==> $(cargo --version)"

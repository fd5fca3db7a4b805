#!/usr/bin/env bash
# Installs what cryo needs on Debian/Ubuntu, non-interactively and
# idempotently: a C and Fortran toolchain, MPICH, libclang (for rsmpi's bindgen), zstd,
# Slurm with munge and libslurm-dev (for the SPANK plugin and the Slurm
# tests), and a Rust toolchain if none is present. Safe to run again and
# again.
set -euo pipefail

packages=(build-essential pkg-config cmake ca-certificates curl git zstd mpich libmpich-dev libclang-dev clang procps python3 gfortran
  slurm-wlm munge libslurm-dev)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

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

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "==> installing the Rust toolchain (rustup)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
echo "==> $(cargo --version)"

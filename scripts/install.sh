#!/usr/bin/env bash
# Installs cryo under a prefix, so that applications' build systems find it:
#
#   PREFIX/bin/cryo, cryo-agent             the commands
#   PREFIX/lib/libcryo_rank.so, .a          the rank runtime (MPICH)
#   PREFIX/lib/libcryo_rank_openmpi.so, .a  the rank runtime for Open MPI
#   PREFIX/include/cryo.h                   its C API
#   PREFIX/include/cryo.mod, lib/libcryo_fortran.a   `use cryo` (MPICH's mpif90)
#   PREFIX/include/openmpi/cryo.mod, lib/libcryo_fortran_openmpi.a   (Open MPI)
#   PREFIX/share/cryo/fortran/              the module's source, for other compilers
#   PREFIX/lib/cryo/spank_cryo.so           the Slurm plugin (plugstack.conf)
#   PREFIX/lib/cryo/python/cryo/            `import cryo` (PYTHONPATH=PREFIX/lib/cryo/python)
#   PREFIX/lib/pkgconfig/cryo.pc            pkg-config --cflags --libs cryo
#   PREFIX/lib/pkgconfig/cryo-openmpi.pc    ... cryo-openmpi
#   PREFIX/lib/cmake/cryo/                  find_package(cryo): cryo::rank, cryo::rank_openmpi
#
# Usage: scripts/install.sh [--prefix DIR] [--profile release|debug] [--no-build] [--without-openmpi]
#   --prefix DIR        where to install (default /usr/local)
#   --profile P         which build to install (default release)
#   --no-build          install what is already built instead of building first
#   --without-openmpi   do not build the Open MPI flavour (installed anyway if built)
set -euo pipefail
source "$(dirname "$0")/common.sh"

prefix=/usr/local
profile=release
build=1
openmpi=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --without-openmpi) openmpi=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release|debug) ;;
  *) echo "install.sh: --profile must be release or debug, not $profile" >&2; exit 2 ;;
esac
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
target="${CARGO_TARGET_DIR:-$ROOT/target}/$profile"

if [ "$build" = 1 ]; then
  flag=()
  [ "$profile" = release ] && flag=(--release)
  echo "==> building ($profile)"
  (cd "$ROOT" && cargo build "${flag[@]}" -p cryo-coordinator -p cryo-agent -p cryo-rank -p cryo-slurm)
  if [ "$openmpi" = 1 ] && command -v mpicc.openmpi >/dev/null 2>&1; then
    bash "$ROOT/scripts/build-openmpi.sh" "${flag[@]}"
  fi
fi

need() {
  if [ ! -e "$target/$1" ]; then
    echo "install.sh: $target/$1 is missing: build first, or leave out --no-build" >&2
    exit 1
  fi
}
for file in cryo cryo-agent libcryo_rank.so libcryo_rank.a libspank_cryo.so; do need "$file"; done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1)"
echo "==> installing cryo $version into $prefix"
install -d "$prefix/bin" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/cryo" "$prefix/lib/cryo" "$prefix/include"
install -m 0755 "$target/cryo" "$target/cryo-agent" "$prefix/bin/"
if [ -e "$target/cryo-bench" ]; then install -m 0755 "$target/cryo-bench" "$prefix/bin/"; fi
install -m 0755 "$target/libcryo_rank.so" "$prefix/lib/"
install -m 0644 "$target/libcryo_rank.a" "$prefix/lib/"
install -m 0755 "$target/libspank_cryo.so" "$prefix/lib/cryo/spank_cryo.so"
install -m 0644 "$ROOT/rank/include/cryo.h" "$prefix/include/"
flavours="mpich"
if [ -e "$target/libcryo_rank_openmpi.so" ]; then
  install -m 0755 "$target/libcryo_rank_openmpi.so" "$prefix/lib/"
  install -m 0644 "$target/libcryo_rank_openmpi.a" "$prefix/lib/"
  flavours="mpich openmpi"
fi

# The Fortran module, compiled by each MPI's own wrapper (a .mod belongs to
# one compiler), and its source for any other.
install -d "$prefix/share/cryo/fortran"
install -m 0644 "$ROOT/rank/fortran/cryo.F90" "$ROOT/rank/fortran/cryo_typed.inc" "$prefix/share/cryo/fortran/"
fortran_module() { # wrapper, include folder, library name
  local work
  work="$(mktemp -d)"
  if (cd "$work" && "$1" -c "$ROOT/rank/fortran/cryo.F90" -o cryo.o >/dev/null 2>&1); then
    install -d "$2"
    install -m 0644 "$work/cryo.mod" "$2/"
    ar rcs "$prefix/lib/$3" "$work/cryo.o"
    fortran="$fortran $3"
  else
    echo "    (no Fortran module for $1: it did not compile it)"
  fi
  rm -rf "$work"
}
fortran=""
if command -v mpif90.mpich >/dev/null 2>&1; then
  fortran_module mpif90.mpich "$prefix/include" libcryo_fortran.a
fi
if [[ " $flavours " == *" openmpi "* ]] && command -v mpifort.openmpi >/dev/null 2>&1; then
  fortran_module mpifort.openmpi "$prefix/include/openmpi" libcryo_fortran_openmpi.a
fi

# The Python package, with the runtimes next to it (where it looks first).
rm -rf "$prefix/lib/cryo/python/cryo"
install -d "$prefix/lib/cryo/python/cryo"
install -m 0644 "$ROOT"/python/cryo/*.py "$prefix/lib/cryo/python/cryo/"
for lib in "$prefix"/lib/libcryo_rank*.so; do
  ln -sf "../../../$(basename "$lib")" "$prefix/lib/cryo/python/cryo/$(basename "$lib")"
done

# The MPI the runtime was built against, for pkg-config's Requires.
mpi_requires=""
if pkg-config --exists mpich 2>/dev/null; then mpi_requires="mpich"; fi

cat > "$prefix/lib/pkgconfig/cryo.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: cryo
Description: cryo's rank runtime: checkpoint/restart for MPI jobs (MPICH build)
Version: $version
Requires: $mpi_requires
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lcryo_rank
Libs.private: -lpthread -ldl -lm
EOF

if [[ " $flavours " == *" openmpi "* ]]; then
  ompi_requires=""
  if pkg-config --exists ompi-c 2>/dev/null; then ompi_requires="ompi-c"; fi
  cat > "$prefix/lib/pkgconfig/cryo-openmpi.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: cryo-openmpi
Description: cryo's rank runtime: checkpoint/restart for MPI jobs (Open MPI build)
Version: $version
Requires: $ompi_requires
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lcryo_rank_openmpi
Libs.private: -lpthread -ldl -lm
EOF
fi

sed -e "s|@VERSION@|$version|g" "$ROOT/scripts/cmake/cryoConfig.cmake.in" \
  > "$prefix/lib/cmake/cryo/cryoConfig.cmake"
sed -e "s|@VERSION@|$version|g" "$ROOT/scripts/cmake/cryoConfigVersion.cmake.in" \
  > "$prefix/lib/cmake/cryo/cryoConfigVersion.cmake"

echo "==> installed:"
echo "    $prefix/bin/cryo, cryo-agent"
echo "    $prefix/lib/libcryo_rank.{so,a} ($flavours), $prefix/include/cryo.h"
echo "    $prefix/lib/cryo/python (PYTHONPATH for import cryo)"
echo "    Fortran:${fortran:- none} (use cryo: -I$prefix/include, -lcryo_fortran -lcryo_rank)"
echo "    $prefix/lib/cryo/spank_cryo.so (plugstack.conf: optional $prefix/lib/cryo/spank_cryo.so)"
echo "    $prefix/lib/pkgconfig/cryo.pc, $prefix/lib/cmake/cryo/"

# Sourced by the scripts: puts cargo on PATH and fixes the build flags.
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT

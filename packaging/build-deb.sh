#!/bin/bash
# Builds target/debian/baton_<version>_<arch>.deb with `cargo deb` (installed when missing).
# A plain `cargo deb` builds the same package; this script is for stamping another version:
#   packaging/build-deb.sh [--version VERSION]
# --version stamps VERSION into the binary (/-/version, baton --version) and the package, for
# test upgrades. The man page and the completions come from packaging/generated/ (see
# Cargo.toml) and name the version of Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
version=
if [ "${1:-}" = --version ]; then version=$2; fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
if [ -n "$version" ]; then
  BATON_VERSION="$version" cargo build --release --quiet
else
  cargo build --release --quiet
fi
args=(--no-build --quiet)
[ -n "$version" ] && args+=(--deb-version "$version-1")
cargo deb "${args[@]}"

#!/bin/bash
# Builds target/debian/baton_<version>_<arch>.deb: the release binary, the man page and the
# completions generated from it, then `cargo deb` (installed when missing).
#   packaging/build-deb.sh [--version VERSION]
# --version stamps another version into the binary (/-/version, baton --version) and the
# package, for test upgrades.
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
rm -rf target/assets
target/release/baton generate --out target/assets
gzip -9n target/assets/baton.8
args=(--no-build --quiet)
[ -n "$version" ] && args+=(--deb-version "$version-1")
cargo deb "${args[@]}"

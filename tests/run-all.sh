#!/bin/bash
# The whole test suite: formatting, lints, unit and integration tests, and the real-systemd
# harness. Installs what it needs on Debian 12. Run it as root from anywhere:
#     tests/run-all.sh
# (the systemd harness boots a real systemd 252 in a container, which needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n==> %s\n' "$*"; }
die() { echo "tests/run-all.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run me as root (sudo tests/run-all.sh): the systemd harness boots a container"

say "installing what the tests need"
need=()
for pair in systemd-socket-activate:systemd curl:curl python3:python3 cc:gcc lintian:lintian setpriv:util-linux unshare:util-linux; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || { command -v curl >/dev/null && curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt; }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo --version
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
# tests/activation.rs runs the development loop `systemfd --no-pid -s http::PORT -- ...`.
command -v systemfd >/dev/null || cargo install --locked --quiet systemfd

say "cargo fmt --check"
cargo fmt --check

# clippy fails on every rustc warning too; the builds below share its settings (no RUSTFLAGS),
# so nothing is compiled twice.
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings

say "cargo doc (no broken links, no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

say "cargo test"
cargo test --quiet 2>&1 | tee /tmp/baton-cargo-test.log
grep -q '^test result: ok' /tmp/baton-cargo-test.log || die "cargo test ran no test"

say "plain cargo deb in a fresh clone: the complete package (tests/package/fresh-clone.sh)"
bash tests/package/fresh-clone.sh

say "packages: version 1, 2 and a broken 3 (tests/package/build-debs.sh)"
debs=$(mktemp -d /tmp/baton-debs.XXXXXX)
trap 'rm -rf "$debs"' EXIT
bash tests/package/build-debs.sh "$debs"

say "lintian: no errors, no warnings"
for deb in "$debs"/baton_1.deb "$debs"/baton_2.deb; do
  if ! out=$(lintian --fail-on error,warning "$deb" 2>&1); then
    echo "$out"; die "lintian reports errors or warnings for $(basename "$deb")"
  fi
  echo "lintian $(basename "$deb"): no errors, no warnings"
done

say "the package on a system without systemd: tests/package/no-systemd.sh"
bash tests/package/no-systemd.sh "$debs"

say "real systemd 252: tests/systemd/run.sh (the binary of baton_1.deb)"
dpkg-deb --fsys-tarfile "$debs/baton_1.deb" | tar -xO ./usr/bin/baton > "$debs/baton"
chmod 755 "$debs/baton"
BATON_DEBS=$debs bash tests/systemd/run.sh "$debs/baton"

say "all tests passed"

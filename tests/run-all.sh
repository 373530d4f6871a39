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
for pair in systemd-socket-activate:systemd curl:curl python3:python3 cc:gcc pkg-config:pkg-config; do
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

say "cargo fmt --check"
cargo fmt --check

say "cargo clippy --all-targets -- -D warnings"
RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo clippy --quiet --all-targets -- -D warnings

say "cargo build --release"
RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo build --release --quiet

say "cargo test"
RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo test --quiet 2>&1 | tee /tmp/baton-cargo-test.log
grep -q '^test result: ok' /tmp/baton-cargo-test.log || die "cargo test ran no test"

say "real systemd 252: tests/systemd/run.sh"
bash tests/systemd/run.sh target/release/baton

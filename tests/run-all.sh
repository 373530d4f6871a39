#!/bin/bash
# The whole test suite: formatting, lints, unit and integration tests, the package, the README's
# commands on a fresh Debian 12, and the real-systemd harness. Installs what it needs on Debian 12
# (apt-get update first; Debian's Rust packages when there is no cargo 1.88 or newer, see
# tools/with-rust.sh). Run it as root, or as a user who may sudo (it runs itself again through
# sudo: the systemd harness and the chroots need root), from anywhere:
#     tests/run-all.sh
# Knobs:
#   BATON_TESTS_UNTIL=lint   stop after the installs, `cargo fmt --check` and `cargo clippy`
#   BATON_TESTS_UNTIL=toolchain  stop once the Debian packages and the Rust toolchain are there
#                            (tests/fresh/readme.sh uses both on fresh systems)
#   BATON_SKIP_FRESH=1       skip tests/fresh/readme.sh (the README's commands on a fresh system)
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step's line gives the time since the start: the whole must stay under 30 minutes.
say() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
die() { echo "tests/run-all.sh: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "run me as root: the systemd harness boots a container"
  echo "tests/run-all.sh: running as root through sudo (the systemd harness boots a container)" >&2
  rc=0
  sudo env ${BATON_TESTS_UNTIL:+BATON_TESTS_UNTIL="$BATON_TESTS_UNTIL"} \
    ${BATON_SKIP_FRESH:+BATON_SKIP_FRESH="$BATON_SKIP_FRESH"} bash "$PWD/tests/run-all.sh" || rc=$?
  # what root built in target/ is yours again, so that your own cargo can write there
  [ ! -d target ] || sudo chown -R "$(id -u):$(id -g)" target
  exit "$rc"
fi

say "installing what the tests need"
need=()
for pair in systemd-socket-activate:systemd curl:curl python3:python3 cc:gcc lintian:lintian setpriv:util-linux unshare:util-linux git:git goaccess:goaccess logrotate:logrotate h2load:nghttp2-client openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# A cargo of Rust 1.88 or newer, with rustfmt and clippy: the one there is, else Debian's.
cargo_bin=$(sh tools/with-rust.sh --dev)
# cargo install puts cargo-deb and systemfd into $CARGO_HOME/bin, which Debian's cargo leaves
# out of PATH.
export PATH="$cargo_bin:$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
cargo --version
if [ "${BATON_TESTS_UNTIL:-}" = toolchain ]; then
  say "stopping once the toolchain is there (BATON_TESTS_UNTIL=toolchain)"
  exit 0
fi
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
# tests/activation.rs runs the development loop `systemfd --no-pid -s http::PORT -- ...`.
command -v systemfd >/dev/null || cargo install --locked --quiet systemfd

say "cargo fmt --check"
cargo fmt --all --check

# clippy fails on every rustc warning too; the builds below share its settings (no RUSTFLAGS),
# so nothing is compiled twice.
say "cargo clippy --workspace --all-targets --all-features -- -D warnings"
cargo clippy --quiet --workspace --all-targets --all-features -- -D warnings

if [ "${BATON_TESTS_UNTIL:-}" = lint ]; then
  say "stopping after the installs and lints (BATON_TESTS_UNTIL=lint)"
  exit 0
fi

say "cargo doc (no broken links, no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet

# With the library's: lifecycle/tests/examples.rs runs its echo and axum examples as real processes.
say "cargo test --workspace --all-features"
cargo test --workspace --all-features --quiet 2>&1 | tee /tmp/baton-cargo-test.log
grep -q '^test result: ok' /tmp/baton-cargo-test.log || die "cargo test ran no test"

# The library has no HTTP and no CLI unless asked: none of these in its default dependencies.
say "baton-lifecycle's default dependencies: no HTTP, no CLI, no config format, no metrics"
lifecycle_deps=$(cargo tree -p baton-lifecycle -e normal --prefix none)
for crate in axum hyper tower-http clap toml prometheus-client; do
  if grep -q "^$crate v" <<<"$lifecycle_deps"; then
    die "baton-lifecycle depends on $crate with its default features (cargo tree -p baton-lifecycle -e normal -i $crate)"
  fi
done
echo "baton-lifecycle: none of axum, hyper, tower-http, clap, toml, prometheus-client"

say "packages: version 1, 2 and a broken 3 (tests/package/build-debs.sh)"
debs=$(mktemp -d /tmp/baton-debs.XXXXXX)
trap 'rm -rf "$debs"' EXIT
bash tests/package/build-debs.sh "$debs"

# After the packages: the fresh clone's target dir is seeded from target/release, which they
# built, so that it compiles baton alone and not every dependency again.
say "plain cargo deb in a fresh clone: the complete package (tests/package/fresh-clone.sh)"
bash tests/package/fresh-clone.sh

say "lintian: no errors, no warnings"
for deb in "$debs"/baton_1.deb "$debs"/baton_2.deb; do
  if ! out=$(lintian --fail-on error,warning "$deb" 2>&1); then
    echo "$out"; die "lintian reports errors or warnings for $(basename "$deb")"
  fi
  echo "lintian $(basename "$deb"): no errors, no warnings"
done

say "the package on a system without systemd: tests/package/no-systemd.sh"
bash tests/package/no-systemd.sh "$debs"

if [ -z "${BATON_SKIP_FRESH:-}" ]; then
  say "the README's commands on a fresh Debian 12, as a sudo user (and the toolchain as root): tests/fresh/readme.sh"
  bash tests/fresh/readme.sh
fi

say "real systemd 252: tests/systemd/run.sh (the binary of baton_1.deb)"
dpkg-deb --fsys-tarfile "$debs/baton_1.deb" | tar -xO ./usr/bin/baton > "$debs/baton"
chmod 755 "$debs/baton"
BATON_DEBS=$debs bash tests/systemd/run.sh "$debs/baton"

say "all tests passed"

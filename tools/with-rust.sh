#!/bin/sh
# tools/with-rust.sh [--dev] [COMMAND [ARG...]] - run COMMAND with a cargo of Rust 1.88 or newer
# first in PATH, installing one when there is none. With no COMMAND, print the directory of that
# cargo (and nothing else) on stdout. --dev also provides `cargo fmt` and `cargo clippy`.
#
#     sh tools/with-rust.sh cargo run --release -- serve
#
# Which cargo, in this order:
#   1. an existing one that is 1.88 or newer: `cargo` in PATH, then $CARGO_HOME/bin/cargo
#      (default ~/.cargo/bin, rustup's), then /usr/bin/cargo. Nothing is installed or updated
#      then, except the rustfmt and clippy of that toolchain with --dev when they are missing
#      (`rustup component add`, or the matching Debian packages).
#   2. Debian's packages, with apt: `apt-get update`, then cargo-web and rustc-web (plus
#      rustfmt-web and rust-web-clippy with --dev; Debian 12 has Rust 1.96 in bookworm-security);
#      or cargo, rustc (rustfmt, rust-clippy) when the release's plain cargo is 1.88 or newer
#      (Debian 13). They install /usr/bin/cargo. rustc-web pulls in gcc, the linker rustc needs.
#   3. rustup, as the last resort on systems without such packages (fetched from sh.rustup.rs
#      into ~/.cargo); needs curl and a C compiler.
# apt-get runs directly as root, through sudo otherwise. Progress goes to stderr.
set -eu

dev=
if [ "${1:-}" = --dev ]; then dev=1; shift; fi

say() { echo "with-rust: $*" >&2; }
die() { echo "with-rust: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "installing needs root: run me as root, or install sudo"
  fi
}

# version_ok VERSION: VERSION (1.96.0, 1.96.0+dfsg1-1~deb12u2, ...) is 1.88 or newer
version_ok() {
  major=${1%%.*} rest=${1#*.}
  minor=${rest%%[!0-9]*}
  case "$major$minor" in '' | *[!0-9]*) return 1 ;; esac
  [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 88 ]; }
}

# cargo_ok CARGO: CARGO runs and is 1.88 or newer
cargo_ok() {
  [ -x "$1" ] || return 1
  v=$("$1" --version 2>/dev/null) || return 1
  v=${v#cargo }
  version_ok "${v%% *}"
}

find_cargo() {
  for c in "$(command -v cargo 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" /usr/bin/cargo; do
    if [ -n "$c" ] && cargo_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

updated=
apt_update() { # once
  [ -z "$updated" ] || return 0
  say "apt-get update"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
  updated=1
}

apt_install() {
  apt_update || die "apt-get update failed"
  say "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

candidate() { # candidate PACKAGE: the version apt would install, or nothing
  apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9].*\)/\1/p'
}

install_debian() { # the release's Rust packages, when they are 1.88 or newer
  command -v apt-get >/dev/null 2>&1 || return 1
  apt_update || return 1
  if version_ok "$(candidate cargo-web)"; then
    apt_install cargo-web rustc-web ${dev:+rustfmt-web rust-web-clippy}
  elif version_ok "$(candidate cargo)"; then
    apt_install cargo rustc ${dev:+rustfmt rust-clippy}
  else
    say "apt has no cargo 1.88 or newer (cargo-web: $(candidate cargo-web), cargo: $(candidate cargo))"
    return 1
  fi
}

install_rustup() {
  if ! command -v curl >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "rustup needs curl and a C compiler (cc)"
    apt_install ca-certificates curl gcc libc6-dev
  fi
  say "installing Rust with rustup (https://sh.rustup.rs) into ${CARGO_HOME:-$HOME/.cargo}"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y -q --no-modify-path --profile minimal ${dev:+-c rustfmt -c clippy} >&2
}

if ! cargo=$(find_cargo); then
  say "no cargo 1.88 or newer found; installing one"
  install_debian || install_rustup
  cargo=$(find_cargo) || die "still no cargo 1.88 or newer after installing"
fi
bin=$(dirname "$cargo")
PATH=$bin:$PATH
export PATH

if [ -n "$dev" ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  if [ -x "$bin/rustup" ]; then
    say "rustup component add rustfmt clippy"
    "$bin/rustup" component add rustfmt clippy >&2
  else
    case $(dpkg-query -S "$(readlink -f "$cargo")" 2>/dev/null) in
      cargo-web:*) apt_install rustfmt-web rust-web-clippy ;;
      cargo:*) apt_install rustfmt rust-clippy ;;
      *) die "$cargo has no 'cargo fmt' or 'cargo clippy', and I do not know how to add them" ;;
    esac
  fi
  { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1 \
    || die "still no 'cargo fmt' and 'cargo clippy' for $cargo"
fi
say "using $cargo ($(cargo --version))"

if [ $# = 0 ]; then echo "$bin"; exit 0; fi
exec "$@"

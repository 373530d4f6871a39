#!/bin/bash
# tests/fresh/readme.sh - the README's two commands on a fresh Debian 12 with no cargo installed
# beforehand: both as a sudo user, and the toolchain install as root. Needs root (mount, chroot) and the network (Debian's
# archive and crates.io). Prints PASS/FAIL lines and `N passed, M failed`; exits 1 on a failure.
#
# The "fresh machines" are chroots of a copy-on-write overlay of this machine's / (as in
# tests/package/no-systemd.sh; nothing on the host changes), one per user, in a private mount and
# pid namespace (every process they start dies with the test). In each:
#   * no Rust toolchain: rustup's ~/.cargo/bin and ~/.rustup are hidden under empty tmpfs, PATH is
#     the system's, and the test checks that no cargo or rustc is found (/usr/local/bin included);
#   * no apt lists (/var/lib/apt/lists is emptied), so an `apt-get install` without
#     `apt-get update` first fails;
#   * the source is a copy of this checkout's tracked and untracked files at /src/baton, without
#     target/; root's CARGO_HOME registry cache is the host's (copy-on-write); the sudo user's
#     ~/.cargo starts empty, and cargo downloads from crates.io.
#   * the chroots share the host's network (apt and cargo download), so baton serves on a free
#     port given in the chroot's /etc/baton/baton.toml (which baton reads when it exists), not on
#     the embedded 127.0.0.1:8080 that may be busy on the host.
# The sudo user (baton-fresh, in group sudo, NOPASSWD because nothing can answer a prompt in CI)
# runs the README's first command: it must install Debian's Rust packages through sudo, build
# baton and serve /-/healthy; then the second with BATON_TESTS_UNTIL=lint, which must run itself
# through sudo, add rustfmt-web and rust-web-clippy, pass `cargo fmt --check` and `cargo clippy`
# with Debian's toolchain, and leave no root-owned file in target/. Root, on a fresh machine without
# sudo, runs the README's second command with BATON_TESTS_UNTIL=toolchain: it must install all
# four of Debian's Rust packages with apt directly (the path the first command takes as root too,
# through the same tools/with-rust.sh). The rest of the suite runs on the host anyway.
#
# Root does not run the first command to its end (a release build and /-/healthy): that is the
# sudo user's build again. Two builds of baton from scratch with Debian's rustc (the user's release
# build and root's clippy), plus root's `cargo install` of cargo-deb and systemfd, not more: each
# build takes four to five minutes on 2 cores, and the whole suite must stay under 30 minutes. A
# build as root in a second chroot would not reuse the first (cargo's fingerprints hold the
# registry's path, which is under each user's home). About 11 minutes on 2 cores (10m40s alone).
# BATON_FRESH_TIMEOUT (seconds, default 1500) bounds each command run in a chroot; the whole
# test, three times that plus 5 min.
set -uo pipefail

if [ "${1:-}" != --inner ]; then
  cd "$(dirname "$0")/../.." || exit 1
  [ "$(id -u)" = 0 ] || { echo "tests/fresh/readme.sh: needs root (mount, chroot)" >&2; exit 1; }
  repo=$PWD
  work=$(mktemp -d /var/tmp/baton-fresh.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/src"
  # the checkout as it is (tracked and untracked files, not what .gitignore names, like target/)
  if [ -d .git ] || [ -f .git ]; then
    git ls-files -z --cached --others --exclude-standard \
      | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$work/src" -xf -
  else
    tar --exclude=./target -cf - . | tar -C "$work/src" -xf -
  fi
  limit=${BATON_FRESH_TIMEOUT:-1500}
  timeout --kill-after=30 $((limit * 3 + 300)) \
    unshare --mount --pid --fork --propagation private -- bash "$repo/tests/fresh/readme.sh" --inner "$work" "$repo" "$limit" </dev/null
  exit $?
fi

# --- inside the private mount and pid namespace -----------------------------------------------
work=$2 repo=$3 limit=$4
pass=0 fail=0
ok() { echo "PASS: fresh: $1"; pass=$((pass+1)); }
bad() { echo "FAIL: fresh: $1"; fail=$((fail+1)); [ -z "${2:-}" ] || tail -n 40 "$2" | sed 's/^/      | /'; }
finish() { echo "$pass passed, $fail failed"; [ "$fail" = 0 ]; exit $?; }

# The README's commands: the first code block's lines that are not comments.
mapfile -t cmds < <(awk '/^```sh$/ {b=1; next} b && /^```/ {exit} b && !/^#/ && NF' "$repo/README.md")
serve_cmd=${cmds[0]:-} test_cmd=${cmds[1]:-}
case "$serve_cmd" in *"-- serve"*) ;; *) bad "the README's first command serves: '$serve_cmd'"; finish;; esac
case "$test_cmd" in *tests/run-all.sh*) ;; *) bad "the README's second command is tests/run-all.sh: '$test_cmd'"; finish;; esac
echo "README's first command:  $serve_cmd"
echo "README's second command: $test_cmd"

syspath=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mnt=$work/mnt  # a private tmpfs for the overlays' upper layers (which cannot be on /'s fs)
if ! { mkdir -p "$mnt" && mount -t tmpfs -o size=8g tmpfs "$mnt"; }; then bad "tmpfs"; finish; fi

# fresh NAME: a fresh machine at $mnt/NAME/root; prints its path
fresh() {
  local top=$mnt/$1 r=$mnt/$1/root
  mkdir -p "$top/upper" "$top/ovl" "$r"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$top/upper,workdir=$top/ovl" "$r" || return 1
  mount -t proc proc "$r/proc"
  mount --rbind /dev "$r/dev"
  mount -t tmpfs -o mode=755 tmpfs "$r/run"
  mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
  mount -t tmpfs tmpfs "$r/var/lib/apt/lists" && mkdir -p "$r/var/lib/apt/lists/partial"
  # root's rustup toolchain and what cargo installed are hidden: an empty ~/.cargo and ~/.rustup,
  # but for a copy-on-write registry cache
  [ ! -d "$r/root/.rustup" ] || mount -t tmpfs tmpfs "$r/root/.rustup"
  if [ -d /root/.cargo ]; then
    mount -t tmpfs tmpfs "$r/root/.cargo"
    if [ -d /root/.cargo/registry ]; then
      mkdir -p "$r/root/.cargo/registry" "$top/reg-upper" "$top/reg-work"
      mount -t overlay overlay \
        -o "lowerdir=/root/.cargo/registry,upperdir=$top/reg-upper,workdir=$top/reg-work" "$r/root/.cargo/registry"
    fi
  fi
  mkdir -p "$r/src/baton" && mount --bind "$work/src" "$r/src/baton"
  # services started by maintainer scripts would run on the host: none
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d" && chmod 755 "$r/usr/sbin/policy-rc.d"
  # a free port for baton (the chroot shares the host's network)
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$r/etc/baton"
  printf '[server]\nlisten = ["http=127.0.0.1:%s"]\n' "$port" >"$r/etc/baton/baton.toml"
  echo "$r"
}

# no_rust ROOT NAME: nothing in ROOT finds a cargo or rustc
no_rust() {
  if chroot "$1" env -i PATH=$syspath HOME=/root sh -c \
       'command -v cargo || command -v rustc || ls /usr/local/bin/cargo /usr/local/bin/rustc ~/.cargo/bin/cargo' >/dev/null 2>&1; then
    bad "$2: the fresh machine has no cargo or rustc beforehand"; return 1
  fi
  ok "$2: the fresh machine has no cargo or rustc beforehand"
}

# serve ROOT NAME WHAT LOG CMD...: CMD (in ROOT) runs the README's first command; it must bring up
# baton, which must answer /-/healthy on the configured port; then everything it started stops.
serve() {
  local r=$1 name=$2 what=$3 log=$4 port pid t0=$SECONDS up=
  shift 4
  port=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$r/etc/baton/baton.toml")
  # timeout makes a process group of its own: killing it ends the whole command
  timeout --kill-after=10 "$limit" chroot "$r" "$@" sh -c "cd /src/baton && $serve_cmd" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(curl -s --max-time 2 "http://127.0.0.1:$port/-/healthy")" = ok ]; then up=1; break; fi
    sleep 2
  done
  kill -TERM -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  if [ -n "$up" ]; then
    ok "$name: the README's first command $what and serves /-/healthy ($((SECONDS - t0)) s)"
  else
    bad "$name: the README's first command $what and serves /-/healthy ($((SECONDS - t0)) s)" "$log"
    return 1
  fi
}

# --- a sudo user --------------------------------------------------------------------------------
user=baton-fresh
if r=$(fresh user) && no_rust "$r" "sudo user"; then
  if chroot "$r" env -i PATH=$syspath DEBIAN_FRONTEND=noninteractive sh -ec "
       apt-get update -q && apt-get install -y -q sudo
       useradd --create-home --shell /bin/bash --groups sudo $user
       echo '$user ALL=(ALL:ALL) NOPASSWD: ALL' >/etc/sudoers.d/$user
       rm -rf /var/lib/apt/lists/* && mkdir /var/lib/apt/lists/partial" >"$work/setup.log" 2>&1; then
    chown -R "$(chroot "$r" id -u $user):$(chroot "$r" id -g $user)" "$work/src"
    serve "$r" "sudo user" "installs Rust through sudo, builds baton" "$work/user-serve.log" setpriv --reuid=$user --regid=$user --init-groups \
      env -i HOME=/home/$user USER=$user LOGNAME=$user PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8
    if grep -q 'apt-get install cargo-web rustc-web' "$work/user-serve.log"; then
      ok "sudo user: Debian's cargo-web and rustc-web were installed"
    else
      bad "sudo user: Debian's cargo-web and rustc-web were installed" "$work/user-serve.log"
    fi
    ! grep -q 'with rustup' "$work/user-serve.log" || bad "sudo user: rustup was not used" "$work/user-serve.log"
    # the second command as the sudo user runs itself through sudo; up to the lints (the rest of
    # the suite runs on the host), which adds rustfmt and clippy to Debian's cargo and lints with
    # them; whatever root built in target/ must be the user's again
    t0=$SECONDS
    if timeout --kill-after=10 "$limit" chroot "$r" setpriv --reuid=$user --regid=$user --init-groups \
         env -i HOME=/home/$user USER=$user LOGNAME=$user PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
         BATON_TESTS_UNTIL=lint sh -c "cd /src/baton && $test_cmd" >"$work/user-test.log" 2>&1 \
       && grep -q 'running as root through sudo' "$work/user-test.log" \
       && grep -q 'apt-get install rustfmt-web rust-web-clippy' "$work/user-test.log" \
       && grep -q 'stopping after the installs and lints' "$work/user-test.log" \
       && [ -d "$work/src/target/debug" ] && [ -z "$(find "$work/src/target" -uid 0 -print -quit)" ]; then
      ok "sudo user: the README's second command runs through sudo, adds rustfmt-web and rust-web-clippy, formats and lints with them, and leaves target/ to the user (BATON_TESTS_UNTIL=lint, $((SECONDS - t0)) s)"
    else
      bad "sudo user: the README's second command runs through sudo, adds rustfmt-web and rust-web-clippy, formats and lints with them, and leaves target/ to the user (BATON_TESTS_UNTIL=lint, $((SECONDS - t0)) s)" "$work/user-test.log"
    fi
  else
    bad "sudo user: setting up sudo and the user" "$work/setup.log"
  fi
  umount -R "$r"; rm -rf "${mnt:?}/user"
else
  bad "sudo user: a fresh machine"
fi

# --- root, without sudo ---------------------------------------------------------------------------
if r=$(fresh root) && no_rust "$r" "root"; then
  if chroot "$r" dpkg-query -W -f="\${Status}" sudo 2>/dev/null | grep -q 'ok installed'; then
    chroot "$r" env -i PATH=$syspath dpkg --purge sudo >/dev/null 2>&1
  fi
  if chroot "$r" env -i PATH=$syspath sh -c 'command -v sudo' >/dev/null; then
    bad "root: no sudo on the fresh machine"
  fi
  rootenv=(env -i HOME=/root USER=root LOGNAME=root "PATH=$syspath" LANG=C.UTF-8)
  t0=$SECONDS
  if timeout --kill-after=10 "$limit" chroot "$r" "${rootenv[@]}" BATON_TESTS_UNTIL=toolchain \
       sh -c "cd /src/baton && $test_cmd" >"$work/root-test.log" 2>&1 \
     && grep -q 'stopping once the toolchain is there' "$work/root-test.log"; then
    ok "root: the README's second command installs its tools (BATON_TESTS_UNTIL=toolchain, $((SECONDS - t0)) s)"
  else
    bad "root: the README's second command installs its tools (BATON_TESTS_UNTIL=toolchain, $((SECONDS - t0)) s)" "$work/root-test.log"
  fi
  # the first command's tools/with-rust.sh, as it would start the build: that cargo, nothing installed
  if timeout --kill-after=10 "$limit" chroot "$r" "${rootenv[@]}" sh -c 'cd /src/baton && sh tools/with-rust.sh cargo --version' >"$work/root-serve.log" 2>&1 \
     && grep -q '^with-rust: using /usr/bin/cargo ' "$work/root-serve.log" \
     && ! grep -q -e 'installing' -e 'apt-get' "$work/root-serve.log"; then
    ok "root: the README's first command takes Debian's cargo that the second installed, and installs nothing"
  else
    bad "root: the README's first command takes Debian's cargo that the second installed, and installs nothing" "$work/root-serve.log"
  fi
  if grep -q 'apt-get install cargo-web rustc-web rustfmt-web rust-web-clippy' "$work/root-test.log"; then
    ok "root: Debian's cargo-web, rustc-web, rustfmt-web and rust-web-clippy were installed with apt, without sudo"
  else
    bad "root: Debian's cargo-web, rustc-web, rustfmt-web and rust-web-clippy were installed with apt, without sudo" "$work/root-test.log"
  fi
  umount -R "$r"
else
  bad "root: a fresh machine"
fi
finish

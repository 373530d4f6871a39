#!/bin/bash
# tests/package/no-systemd.sh DEBDIR - the package on a system where systemd does not run:
# install, upgrade, remove and purge in a chroot of a copy-on-write overlay of this machine's /
# (nothing on the host changes) with an empty /run, so there is no /run/systemd/system. The
# maintainer scripts must succeed and say nothing on stderr but which enablement symlinks
# deb-systemd-helper made or removed. Needs root. Prints PASS/FAIL lines
# and `N passed, M failed`.
set -uo pipefail
debs=$(cd "$1" && pwd)
[ "$(id -u)" = 0 ] || { echo "tests/package/no-systemd.sh: needs root (mount, chroot)" >&2; exit 1; }
work=$(mktemp -d /tmp/baton-nosystemd.XXXXXX)
trap 'rm -rf "$work"' EXIT

unshare --mount --propagation private -- bash -s "$work" "$debs" <<'INNER'
set -u
work=$1 debs=$2 root=$1/root
mount -t tmpfs -o size=1g tmpfs "$work" || exit 1
mkdir -p "$work/upper" "$work/ovl" "$root"
mount -t overlay overlay -o lowerdir=/,upperdir="$work/upper",workdir="$work/ovl" "$root" || exit 1
mount -t tmpfs tmpfs "$root/run"
mount --rbind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mkdir -p "$root/debs" && mount --bind "$debs" "$root/debs"
pass=0 fail=0
step() { # step NAME CMD...: runs CMD in the chroot; passes when it exits 0 and stderr holds
  # nothing but deb-systemd-helper's notes on the enablement symlinks it creates or removes
  local name=$1; shift
  if chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@" >"$work/out" 2>"$work/err" \
     && ! grep -vqE '^(Created symlink|Removed) .*baton\.(service|socket)' "$work/err"; then
    echo "PASS: no systemd: $name"; pass=$((pass+1))
  else
    echo "FAIL: no systemd: $name"; sed 's/^/      | /' "$work/out" "$work/err"; fail=$((fail+1))
  fi
}
check() { # check NAME CMD...: CMD in the chroot must succeed
  local name=$1; shift
  if chroot "$root" "$@" >/dev/null 2>&1; then echo "PASS: no systemd: $name"; pass=$((pass+1)); else echo "FAIL: no systemd: $name"; fail=$((fail+1)); fi
}
step "dpkg -i version 1" dpkg -i /debs/baton_1.deb
check "/usr/bin/baton runs" /usr/bin/baton --version
check "/etc/baton/baton.toml is valid" /usr/bin/baton check --config /etc/baton/baton.toml
check "baton.socket is enabled for when systemd boots" test -L /etc/systemd/system/sockets.target.wants/baton.socket
step "dpkg -i version 2 (upgrade)" dpkg -i /debs/baton_2.deb
step "dpkg -r" dpkg -r baton
check "/usr/bin/baton is gone" test ! -e /usr/bin/baton
check "the conffile stays after remove" test -e /etc/baton/baton.toml
step "dpkg -P" dpkg -P baton
check "/etc/baton is gone after purge" test ! -e /etc/baton
check "no enablement symlink is left" test ! -e /etc/systemd/system/sockets.target.wants/baton.socket
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
INNER

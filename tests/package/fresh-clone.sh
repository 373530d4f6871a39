#!/bin/bash
# tests/package/fresh-clone.sh - a plain `cargo deb` in a fresh `git clone` of the committed
# tree (HEAD; uncommitted changes are not in a clone) builds the complete package: the man page,
# with a CONFIGURATION section naming every key of config::KEYS and an EXAMPLES section, and the
# completions. Nothing generated beforehand, no packaging/build-deb.sh.
# Its cargo target dir, target/fresh-clone/target, is kept between runs (seeded once from
# target/release), so that only baton itself is compiled. Prints PASS/FAIL lines; exit 1 on a
# failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
work=$repo/target/fresh-clone
fails=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

# man comes with lintian (man-db), which tests/run-all.sh installs.
git rev-parse --git-dir >/dev/null 2>&1 || { echo "tests/package/fresh-clone.sh: needs a git checkout to clone" >&2; exit 1; }
rm -rf "$work/src"
mkdir -p "$work"
git clone --quiet --no-hardlinks "$repo" "$work/src"
echo "fresh clone of $(git -C "$work/src" log -1 --format='%h %s' | cut -c1-80)" >&2
if [ ! -d "$work/target/release" ] && [ -d target/release ]; then
  mkdir -p "$work/target"
  cp -a --reflink=auto target/release "$work/target/"
fi
rm -rf "$work/target/debian"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
if (cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo deb --quiet >"$work/cargo-deb.log" 2>&1); then
  pass "cargo deb in a fresh clone"
else
  tail -20 "$work/cargo-deb.log"
  fail "cargo deb in a fresh clone"
  exit 1
fi
deb=$(ls "$work"/target/debian/baton_*.deb)
# The binary is the clone's, not one left in the seeded target dir by another build (such as
# tests/package/build-debs.sh's, stamped with the next version).
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$work/src/Cargo.toml" | head -n 1)
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/baton > "$work/baton" && chmod 755 "$work/baton"
if [ "$("$work/baton" --version)" = "baton $version" ]; then
  pass "the package's baton is version $version, as Cargo.toml says"
else
  fail "the package's baton is version $version, as Cargo.toml says (it says: $("$work/baton" --version 2>&1))"
fi
contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/baton ./usr/share/man/man8/baton.8.gz ./usr/share/bash-completion/completions/baton \
            ./usr/share/zsh/vendor-completions/_baton ./usr/share/fish/vendor_completions.d/baton.fish; do
  if grep -q " $path\$" <<<"$contents"; then pass "the package holds $path"; else fail "the package holds $path"; fi
done

# The page as man shows it, without hyphenation, from the package.
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/man/man8/baton.8.gz | zcat > "$work/baton.8"
page=$(MANWIDTH=200 man --nh --nj -l "$work/baton.8" 2>/dev/null || MANWIDTH=200 man -l "$work/baton.8")
section() { awk -v s="$1" '/^[A-Z][A-Z ]*$/ { on = ($0 == s) } on' <<<"$page"; }
configuration=$(section CONFIGURATION)
if [ -n "$configuration" ]; then pass "baton(8) has a CONFIGURATION section"; else fail "baton(8) has a CONFIGURATION section"; fi
# Every key of the parser's table, section.name (src/config.rs, KEYS).
keys=$(awk '/^pub const KEYS/ { on = 1 } on && /section: "/ { split($0, a, "\""); s = a[2] }
            on && /name: "/ { split($0, a, "\""); print s "." a[2] } on && /^];/ { exit }' "$work/src/src/config.rs")
[ "$(wc -l <<<"$keys")" -ge 15 ] || fail "found the keys in src/config.rs (found: $keys)"
missing=()
for key in $keys; do
  grep -qE "^ +$key \(" <<<"$configuration" || missing+=("$key")
done
if [ ${#missing[@]} = 0 ]; then
  pass "CONFIGURATION lists all $(wc -l <<<"$keys") keys, each with type and default"
else
  fail "CONFIGURATION lacks ${missing[*]}"
fi
if section EXAMPLES | grep -q 'baton serve \.'; then pass "baton(8) has an EXAMPLES section"; else fail "baton(8) has an EXAMPLES section"; fi
if grep -q generate "$work/baton.8"; then fail "baton(8) does not mention the hidden generate"; else pass "baton(8) does not mention the hidden generate"; fi
[ "$fails" = 0 ] || { echo "fresh-clone.sh: $fails failed" >&2; exit 1; }
echo "fresh-clone.sh: all passed ($deb)" >&2

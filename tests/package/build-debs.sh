#!/bin/bash
# tests/package/build-debs.sh OUTDIR - the packages the packaging tests install, in OUTDIR:
#   baton_1.deb  the current code as it is (version from Cargo.toml)
#   baton_2.deb  the same code stamped as the next version (a package upgrade)
#   baton_3.deb  version 2 with a corrupt binary (a broken upgrade)
# and OUTDIR/versions with the three version strings. Leaves target/release/baton as built for
# version 2.
set -euo pipefail
out=$1
cd "$(dirname "$0")/../.."
mkdir -p "$out"
rm -f "$out"/*.deb
base=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
# The next two patch versions: 0.1.0 -> 0.1.1, 0.1.2.
next() { echo "$base" | awk -F. -v n="$1" '{printf "%d.%d.%d", $1, $2, $3 + n}'; }
v2=$(next 1) v3=$(next 2)-1

bash packaging/build-deb.sh
cp target/debian/baton_${base}-1_*.deb "$out/baton_1.deb"
bash packaging/build-deb.sh --version "$v2"
cp target/debian/baton_${v2}-1_*.deb "$out/baton_2.deb"

# Version 3: version 2's package with a truncated binary, as a botched build would leave it.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$out/baton_2.deb" "$work/pkg"
head -c 4096 "$work/pkg/usr/bin/baton" > "$work/baton" && mv "$work/baton" "$work/pkg/usr/bin/baton"
chmod 755 "$work/pkg/usr/bin/baton"
sed -i "s/^Version: .*/Version: $v3/" "$work/pkg/DEBIAN/control"
(cd "$work/pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
dpkg-deb --root-owner-group -b "$work/pkg" "$out/baton_3.deb" >/dev/null
printf '%s\n' "$(dpkg-deb -f "$out/baton_1.deb" Version)" "$(dpkg-deb -f "$out/baton_2.deb" Version)" "$(dpkg-deb -f "$out/baton_3.deb" Version)" > "$out/versions"
echo "built: $(tr '\n' ' ' < "$out/versions")" >&2

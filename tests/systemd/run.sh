#!/bin/bash
# tests/systemd/run.sh [PATH_TO_BATON_BINARY] - baton's tests against a real systemd 252.
#
# For every tests/systemd/cases/*.sh, in order: boots a fresh container (lab.sh, LAB_ROOT=overlay,
# so /usr and dpkg's database are writable; boot takes ~0.2 s), installs the binary as
# /usr/bin/baton and the repo's systemd/baton.socket + systemd/baton.service, unchanged, into
# /etc/systemd/system, runs `systemctl daemon-reload`, runs the case inside as a transient unit
# (systemd-run --wait --pipe, RuntimeMaxSec=CASE_TIMEOUT, so a hung case is killed whole), and
# powers the container off. Every case thus starts from a freshly booted system with nothing of baton
# running and an empty journal.
#
# Prints one PASS:/FAIL: line per check, the tail of the container's journal after a case with
# failures, and last, alone on its line, `N passed, M failed`. Exits 0 only if nothing failed.
# Builds nothing: default binary is target/release/baton (run `cargo build --release` first).
# Needs root. The first run downloads systemd-container (apt-get download; see lab.sh setup).
#
# Environment:
#   CASES="10-* 20-*"     only the cases whose file names match one of these globs
#   BATON_LAB_TARGET      the container's boot target (default basic.target: the overlay boots
#                         the host's /etc, and multi-user.target would start every service the
#                         host enables, e.g. a database, for nothing)
#   CASE_TIMEOUT=300      seconds per case
#   JOURNAL_TAIL=80       journal lines printed after a failing case
#   KEEP=1                keep the work directory (logs, journals) even when everything passed
#   CASE_ENV="K=V ..."    extra environment for the cases (their knobs, e.g. "RELOADS=3")
#   BATON_DEBS=DIR        packages for the packaging case, at /lab/debs inside (made by
#                         tests/package/build-debs.sh: baton_1.deb, baton_2.deb, baton_3.deb)
#   LAB_DIR               lab state (default /tmp/baton-systemd-lab; see lab.sh)
#
# A case may start with a line `# lab: no-install` to get the container without baton installed
# (e.g. to install a .deb itself); the binary and the units are then at /lab/bin and /lab/units.
set -uo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "tests/systemd/run.sh: needs root (it boots systemd in a systemd-nspawn container)" >&2
  exit 1
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${1:-$REPO/target/release/baton}
case "$BIN" in /*) ;; *) BIN=$PWD/$BIN;; esac
LAB="$HERE/lab.sh"

CASE_TIMEOUT=${CASE_TIMEOUT:-300}
JOURNAL_TAIL=${JOURNAL_TAIL:-80}
export LAB_DIR=${LAB_DIR:-/tmp/baton-systemd-lab}
export LAB_NAME=baton-$$
export LAB_ROOT=overlay
export LAB_INIT_ARGS="systemd.unit=${BATON_LAB_TARGET:-basic.target} ${LAB_INIT_ARGS:-}"
export LAB_EXEC_TIMEOUT=$((CASE_TIMEOUT+30))   # backstop; RuntimeMaxSec= below is the real limit

say() { echo "[run.sh] $*" >&2; }
T0=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }

PASSED=0 FAILED=0
FAILED_LINES=()
LAB_UP=0
WORK=
CHILD=
CURRENT=

summary() { echo "$PASSED passed, $FAILED failed"; }
# a failure found by run.sh itself (not by a case)
harness_fail() { FAILED=$((FAILED+1)); FAILED_LINES+=("FAIL: $1"); echo "FAIL: $1"; shift; [ $# -gt 0 ] && printf '      | %s\n' "$@"; return 0; }
# count_results FILE: adds a case's PASS/FAIL lines to the totals; sets p and f to its counts
count_results() {
  local l
  p=$(grep -c '^PASS: ' "$1" 2>/dev/null); f=$(grep -c '^FAIL: ' "$1" 2>/dev/null)
  p=${p:-0}; f=${f:-0}
  PASSED=$((PASSED+p)); FAILED=$((FAILED+f))
  while IFS= read -r l; do FAILED_LINES+=("$l"); done < <(grep '^FAIL: ' "$1" 2>/dev/null)
}
# bg CMD...: runs CMD and waits for it, in a way a signal to run.sh interrupts at once (bash
# runs traps only between foreground commands, but does interrupt `wait`)
bg() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=; return $rc; }

lab_stop() {
  [ "$LAB_UP" = 1 ] || return 0
  LAB_UP=0
  bash "$LAB" stop >/dev/null 2>"$WORK/lab-stop.log" || { say "lab stop failed:"; cat "$WORK/lab-stop.log" >&2; }
}
on_signal() {
  trap - INT TERM
  say "interrupted${CURRENT:+ during $CURRENT}; tearing the container down"
  [ -n "$CHILD" ] && kill "$CHILD" 2>/dev/null
  lab_stop
  [ -n "$CURRENT" ] && count_results "$LAB_SHARE/results/$CURRENT.txt"
  harness_fail "interrupted by a signal${CURRENT:+ during $CURRENT}"
  [ -n "$WORK" ] && say "logs kept in $WORK"
  summary
  exit 130
}
on_exit() {
  lab_stop
  rm -rf --one-file-system "${LAB_DIR:?}/run.$LAB_NAME" 2>/dev/null
  return 0
}
trap on_exit EXIT
trap on_signal INT TERM HUP

# ------------------------------------------------------------------ checks ----
if [ ! -f "$BIN" ] || [ ! -x "$BIN" ]; then
  say "no executable baton binary at $BIN: build it first (cargo build --release in $REPO)"
  harness_fail "baton binary $BIN exists"; summary; exit 1
fi
for f in systemd/baton.socket systemd/baton.service; do
  [ -f "$REPO/$f" ] || { harness_fail "$f exists in the repository"; summary; exit 1; }
done
shopt -s nullglob
ALL_CASES=("$HERE"/cases/*.sh)
CASE_FILES=()
for c in "${ALL_CASES[@]}"; do
  n=$(basename "$c")
  if [ -n "${CASES:-}" ]; then
    m=0; read -ra globs <<<"$CASES"
    for g in "${globs[@]}"; do [[ $n == $g || ${n%.sh} == $g ]] && m=1; done   # glob match
    [ $m = 1 ] || continue
  fi
  CASE_FILES+=("$c")
done
[ ${#CASE_FILES[@]} -gt 0 ] || { harness_fail "no cases to run (CASES=${CASES:-})"; summary; exit 1; }

# ----------------------------------------------------------------- staging ----
# /lab inside the container: bin/baton, units/, tests/ (lib.sh, helpers, cases), results/
WORK=$(mktemp -d /tmp/baton-systemd-test.XXXXXX)
export LAB_SHARE=$WORK/share
mkdir -p "$LAB_SHARE"/{bin,units,tests,results}
cp "$BIN" "$LAB_SHARE/bin/baton"
cp "$REPO/systemd/baton.socket" "$REPO/systemd/baton.service" "$LAB_SHARE/units/"
cp "$REPO/packaging/logrotate" "$LAB_SHARE/units/logrotate"
cp -r "$HERE/lib.sh" "$HERE/helpers" "$HERE/cases" "$LAB_SHARE/tests/"
if [ -n "${BATON_DEBS:-}" ]; then
  mkdir -p "$LAB_SHARE/debs" && cp "$BATON_DEBS"/* "$LAB_SHARE/debs/"
fi
say "binary: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))"
say "work dir: $WORK; lab: $LAB_DIR, container $LAB_NAME"

bash "$LAB" setup 2>"$WORK/lab-setup.log" || { cat "$WORK/lab-setup.log" >&2; harness_fail "lab setup (systemd-nspawn)"; summary; exit 1; }

INSTALL='set -e
install -m 0755 /lab/bin/baton /usr/bin/baton
install -m 0644 /lab/units/baton.socket /lab/units/baton.service /etc/systemd/system/
systemctl daemon-reload
cmp /lab/units/baton.service /etc/systemd/system/baton.service
cmp /lab/units/baton.socket /etc/systemd/system/baton.socket
for u in baton.socket baton.service; do
  s=$(systemctl show -P LoadState $u); [ "$s" = loaded ] || { echo "$u: LoadState=$s"; exit 1; }
done'

# ------------------------------------------------------------------- cases ----
for c in "${CASE_FILES[@]}"; do
  name=$(basename "$c" .sh)
  results=$LAB_SHARE/results/$name.txt
  : > "$results"
  echo "=== $name"
  CURRENT=$name
  t=$EPOCHREALTIME
  LAB_UP=1   # from here on, lab_stop has something to do even if start fails half-way
  if ! bg bash "$LAB" start 2>"$WORK/lab-start.$name.log"; then
    cat "$WORK/lab-start.$name.log" >&2
    lab_stop
    harness_fail "$name: the lab container boots" "see $WORK/lab-start.$name.log"
    CURRENT=
    break
  fi
  boot=$(elapsed "$t")
  rc=0; t=$EPOCHREALTIME
  if grep -q '^# lab: no-install' "$c"; then
    :
  elif ! out=$(bash "$LAB" exec bash -c "$INSTALL" 2>&1); then
    harness_fail "$name: install baton and its units in the container" "$out"
    rc=skip
  fi
  install=$(elapsed "$t"); t=$EPOCHREALTIME
  if [ "$rc" = 0 ]; then
    # as a transient unit: the case gets its own cgroup, so a timeout kills all of it
    case_env=()
    for kv in ${CASE_ENV:-}; do case_env+=(-E "$kv"); done
    bg bash "$LAB" unit --unit="baton-case-$name" -p RuntimeMaxSec="$CASE_TIMEOUT" "${case_env[@]}" \
         -E BATON_CASE="$name" -E BATON_RESULTS="/lab/results/$name.txt" -E BATON_LAB=/lab \
         -E BATON_TESTS=/lab/tests -E LANG=C.UTF-8 -E SYSTEMD_PAGER= -E SYSTEMD_COLORS=0 \
         bash "/lab/tests/cases/$name.sh" || rc=$?
  fi
  run=$(elapsed "$t"); t=$EPOCHREALTIME
  lab_stop
  stop=$(elapsed "$t")
  cp "$LAB_DIR/run.$LAB_NAME/journal.log" "$WORK/journal.$name.log" 2>/dev/null || true
  cp "$LAB_DIR/run.$LAB_NAME/console.log" "$WORK/console.$name.log" 2>/dev/null || true

  count_results "$results"
  CURRENT=
  case "$rc" in
    0|skip) ;;
    *) if [ "$rc" = 124 ] || grep -q "baton-case-$name.service: Failed with result 'timeout'" "$WORK/journal.$name.log" 2>/dev/null; then
         harness_fail "$name: timed out (CASE_TIMEOUT=${CASE_TIMEOUT}s)"
       elif [ "$f" = 0 ]; then
         harness_fail "$name: exited with status $rc without reporting a failure"
       fi;;
  esac
  [ "$rc" = 0 ] && [ "$p" = 0 ] && [ "$f" = 0 ] && harness_fail "$name: ran at least one check"
  say "$name: $p passed, $f failed; boot ${boot}s, install ${install}s, case ${run}s, stop ${stop}s"
  if { [ "$f" -gt 0 ] || [ "$rc" != 0 ]; } && [ -s "$WORK/journal.$name.log" ]; then
    echo "--- last $JOURNAL_TAIL lines of the container journal ($WORK/journal.$name.log):"
    tail -n "$JOURNAL_TAIL" "$WORK/journal.$name.log" | sed 's/^/    /'
    echo "--- end of journal"
  fi
done

if [ "$FAILED" -gt 0 ]; then
  echo "=== failures:"; printf '%s\n' "${FAILED_LINES[@]}"
  say "logs kept in $WORK"
elif [ "${KEEP:-0}" = 1 ]; then
  say "logs kept in $WORK"
else
  rm -rf "$WORK"
fi
say "total $(elapsed "$T0")s"
summary
[ "$FAILED" = 0 ]

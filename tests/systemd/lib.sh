# tests/systemd/lib.sh - helpers for the cases in tests/systemd/cases/*.sh.
#
# Sourced by every case, INSIDE the lab container (a freshly booted systemd 252 on which run.sh
# has installed /usr/bin/baton and the repo's baton.socket + baton.service, daemon-reloaded,
# nothing started). A case is a bash script:
#
#     #!/bin/bash
#     # 20-something: what it checks, in one line
#     . "$(dirname "$0")/../lib.sh"
#     section "first part"
#     check "baton.socket starts" systemctl start baton.socket
#     http_get /-/healthy
#     check_eq "GET /-/healthy answers 200" 200 "$HTTP_STATUS"
#     check_wait "the start event is in the journal" 5 journal_has baton.service BATON_EVENT=start
#     finish
#
# Every check prints exactly one line, `PASS: <case>: <what>` or `FAIL: <case>: <what>`, the
# latter followed by indented details; run.sh counts the lines recorded in $BATON_RESULTS. Checks
# do not stop the case; `abort` does (when nothing after a failure can mean anything).
# Await conditions with wait_for / check_wait (they poll); sleep only where time itself is the
# point (e.g. "still running after the grace period"), and say so in a comment.
#
# Environment (set by run.sh): BATON_CASE (case name), BATON_RESULTS (file the PASS/FAIL lines
# are appended to), BATON_LAB (the share dir, /lab), BATON_TESTS (this directory).
# Tunables: BATON_URL (http://127.0.0.1:8080), HTTP_TIMEOUT (10 s per request),
# WAIT_INTERVAL (0.05 s between polls).

set -u
set -o pipefail

BATON_TESTS=${BATON_TESTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
BATON_LAB=${BATON_LAB:-/lab}
BATON_CASE=${BATON_CASE:-$(basename "$0" .sh)}
BATON_RESULTS=${BATON_RESULTS:-/dev/null}
BATON_URL=${BATON_URL:-http://127.0.0.1:8080}
HTTP_TIMEOUT=${HTTP_TIMEOUT:-10}
WAIT_INTERVAL=${WAIT_INTERVAL:-0.05}

_PASSED=0
_FAILED=0
HTTP_STATUS= HTTP_BODY= HTTP_HEADERS= HTTP_ERROR=
HELD_DIR= HELD_PID= HELD_PORT= HELD_STATUS= HELD_HEADERS= HELD_ERROR=
_T0=$EPOCHREALTIME
CASE_TMP=$(mktemp -d "/tmp/baton-case.XXXXXX")
_AT_EXIT=()

# ----------------------------------------------------------------- cleanup ----
# at_exit CMD...: run CMD when the case exits (in reverse order of registration), e.g. to kill a
# background load generator. Do not set your own EXIT trap; use this.
at_exit() { _AT_EXIT+=("$(printf '%q ' "$@")"); }
_lib_exit() {
  local i
  for ((i=${#_AT_EXIT[@]}-1; i>=0; i--)); do eval "${_AT_EXIT[i]}" >/dev/null 2>&1 || true; done
  rm -rf "$CASE_TMP"
}
trap _lib_exit EXIT

# ----------------------------------------------------------------- results ----
_record() { echo "$1" >> "$BATON_RESULTS"; echo "$1"; }
_details() { [ $# -gt 0 ] && printf '%s\n' "$@" | sed '/^$/d' | tail -n 25 | sed 's/^/      | /'; return 0; }

# pass WHAT
pass() { _PASSED=$((_PASSED+1)); _record "PASS: $BATON_CASE: $1"; }
# fail WHAT [DETAIL...]   (details are printed indented under the FAIL line)
fail() { local what=$1; shift; _FAILED=$((_FAILED+1)); _record "FAIL: $BATON_CASE: $what"; _details "$@"; }
# abort WHAT [DETAIL...]: fail and end the case now
abort() { fail "$@"; echo "      (case aborted)"; finish; }
# section TITLE: a heading in the output
section() { echo "--- $BATON_CASE: $* (at +$(_elapsed "$_T0")s)"; }
# info TEXT: a note in the output (not a check)
info() { printf "%s\n" "$*" | sed "s/^/    # /"; }

# check WHAT CMD...: passes when CMD exits 0; on failure shows its output
check() {
  local what=$1; shift; local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if [ $rc = 0 ]; then pass "$what"; else fail "$what" "command failed (exit $rc): $*" "$out"; fi
  return $rc
}
# check_not WHAT CMD...: passes when CMD exits non-zero
check_not() {
  local what=$1; shift; local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if [ $rc != 0 ]; then pass "$what"; else fail "$what" "command succeeded but should not have: $*" "$out"; return 1; fi
}
# check_eq WHAT EXPECTED ACTUAL
check_eq() {
  if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "expected: '$2'" "actual:   '$3'"; return 1; fi
}
# check_ne WHAT UNEXPECTED ACTUAL
check_ne() {
  if [ "$2" != "$3" ]; then pass "$1"; else fail "$1" "expected anything but '$2'"; return 1; fi
}
# check_match WHAT ERE TEXT: TEXT (any of its lines, as a whole) matches the extended regex ERE
check_match() {
  if grep -Eq -- "$2" <<<"$3"; then pass "$1"; else fail "$1" "no match for /$2/ in:" "$3"; return 1; fi
}
# check_no_match WHAT ERE TEXT
check_no_match() {
  local hits
  if hits=$(grep -E -- "$2" <<<"$3"); then fail "$1" "unexpected match for /$2/:" "$hits"; return 1; else pass "$1"; fi
}
# check_wait WHAT TIMEOUT_S CMD...: passes when CMD succeeds within TIMEOUT_S (polled)
check_wait() {
  local what=$1 t=$2; shift 2; local out rc=0
  if wait_for "$t" "$@"; then pass "$what"; return 0; fi
  out=$("$@" 2>&1) || rc=$?
  fail "$what" "not true within ${t}s: $*" "last attempt: exit $rc" "$out"
  return 1
}

# finish: end of the case; exit status 0 when nothing failed
finish() {
  echo "--- $BATON_CASE: $_PASSED passed, $_FAILED failed in $(_elapsed "$_T0")s"
  [ "$_FAILED" = 0 ]; exit $?
}

# ----------------------------------------------------------------- waiting ----
_elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}'; }
_usecs() { awk -v t="$1" 'BEGIN{printf "%d", t*1000000}'; }
_now_us() { echo "${EPOCHREALTIME/./}"; }

# wait_for TIMEOUT_S CMD...: runs CMD (quietly) every WAIT_INTERVAL until it exits 0; returns 0
# then, 1 if TIMEOUT_S (may be fractional) passes first. CMD may be a shell function.
wait_for() {
  local deadline; deadline=$(( $(_now_us) + $(_usecs "$1") )); shift
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    [ "$(_now_us)" -ge "$deadline" ] && return 1
    sleep "$WAIT_INTERVAL"
  done
}

# ----------------------------------------------------------------- systemd ----
# unit_prop UNIT PROPERTY: prints the property (systemctl show -P)
unit_prop() { systemctl show -P "$2" "$1"; }
# unit_is UNIT ACTIVESTATE: true when the unit's ActiveState is that (active, inactive,
# activating, deactivating, failed...)
unit_is() { [ "$(systemctl show -P ActiveState "$1")" = "$2" ]; }
# unit_state UNIT: prints ActiveState/SubState, e.g. active/running
unit_state() { echo "$(systemctl show -P ActiveState "$1")/$(systemctl show -P SubState "$1")"; }
# unit_state_is UNIT ACTIVE/SUB
unit_state_is() { [ "$(unit_state "$1")" = "$2" ]; }
# unit_pids UNIT: the pids in the unit's cgroup, space-separated, sorted
unit_pids() {
  local cg; cg=$(systemctl show -P ControlGroup "$1")
  [ -n "$cg" ] && sort -n "/sys/fs/cgroup$cg/cgroup.procs" 2>/dev/null | tr '\n' ' ' | sed 's/ $//'
}
# main_pid [UNIT]: systemd's MainPID of UNIT (baton.service); 0 when none
main_pid() { systemctl show -P MainPID "${1:-baton.service}"; }
# pid_alive PID: the process exists and is not a zombie
pid_alive() { [ -n "${1:-}" ] && [ "$1" != 0 ] && [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# pid_gone PID
pid_gone() { ! pid_alive "$1"; }
# listening PORT: something listens on TCP PORT (any address)
listening() { [ -n "$(ss -Hltn "sport = :$1")" ]; }
# conn_owner LOCAL_PORT CLIENT_PORT: prints the users:(...) of the server side of an established
# TCP connection; empty while the connection waits in the listen backlog (not accepted yet)
conn_owner() { ss -Htnp state established "( sport = :$1 and dport = :$2 )" | grep -o 'users:.*' || true; }
# conn_accepted_by NAME LOCAL_PORT CLIENT_PORT: the server side is held by a process named NAME
conn_accepted_by() { conn_owner "$2" "$3" | grep -q "\"$1\""; }
# baton_up: start baton.socket, activate baton.service with a first request, wait until systemd
# has it active/running (READY=1 processed)
baton_up() {
  systemctl start baton.socket || return 1
  wait_for 10 http_ok /-/healthy || { echo "baton_up: GET /-/healthy: $HTTP_STATUS $HTTP_ERROR"; return 1; }
  wait_for 10 unit_state_is baton.service active/running || { echo "baton_up: baton.service is $(unit_state baton.service)"; return 1; }
}
# baton_reset: stop baton's units and forget their failures (for cases that need a clean
# slate in the middle; every case starts on a freshly booted container anyway)
baton_reset() {
  systemctl stop baton.service baton.socket 2>/dev/null
  systemctl reset-failed baton.service baton.socket 2>/dev/null
  return 0
}

# ----------------------------------------------------------------- journal ----
# journal_json UNIT [JOURNALCTL ARGS...]: the unit's entries of this boot, one JSON per line
# (inside with_journal_snapshot UNIT, without ARGS: the snapshot's)
journal_json() {
  local u=$1; shift
  if [ $# = 0 ] && [ "$u" = "$_JOURNAL_SNAPSHOT_UNIT" ]; then cat "$CASE_TMP/journal-snapshot.json"; return; fi
  journalctl -b -u "$u" -o json --no-pager "$@"
}
# with_journal_snapshot UNIT CMD...: runs CMD (e.g. a function making many journal_* queries)
# with the journal_* functions reading UNIT's entries from one snapshot taken now, instead of
# running journalctl for each query. Entries logged meanwhile are not seen. Returns CMD's status.
_JOURNAL_SNAPSHOT_UNIT=
with_journal_snapshot() {
  local u=$1 rc=0; shift
  journalctl -b -u "$u" -o json --no-pager > "$CASE_TMP/journal-snapshot.json" || return 1
  _JOURNAL_SNAPSHOT_UNIT=$u
  "$@" || rc=$?
  _JOURNAL_SNAPSHOT_UNIT=
  return $rc
}
# journal_find UNIT COND...: prints the unit's entries matching every COND (KEY=VALUE,
# KEY~REGEX, KEY!=VALUE, KEY); exit 1 when none (see helpers/journal.py)
journal_find() { local u=$1; shift; journal_json "$u" | python3 "$BATON_TESTS/helpers/journal.py" "$@"; }
# journal_has UNIT COND...: some entry matches
journal_has() { journal_find "$@" >/dev/null; }
# last_words_logged COND...: some entry of baton's (SYSLOG_IDENTIFIER=baton) in this boot matches,
# whichever unit journald gave it. A process that exits right after logging (an old generation
# after its handover) may be gone before journald reads its last lines, and journald then
# cannot tell their unit (it reads the sender's cgroup in /proc): `-u` would miss them.
last_words_logged() {
  journalctl -b -o json --no-pager SYSLOG_IDENTIFIER=baton |
    python3 "$BATON_TESTS/helpers/journal.py" "$@" >/dev/null
}
# journal_field UNIT FIELD COND...: FIELD of the last matching entry
journal_field() {
  local u=$1 f=$2; shift 2
  journal_json "$u" | python3 "$BATON_TESTS/helpers/journal.py" --field "$f" "$@" | tail -n 1
}
# journal_messages UNIT COND...: MESSAGE of every matching entry, one per line
journal_messages() {
  local u=$1; shift
  journal_json "$u" | python3 "$BATON_TESTS/helpers/journal.py" --field MESSAGE "$@"
}
# systemd_messages UNIT: what systemd itself (PID 1) logged about the unit
systemd_messages() { journal_messages "$1" _PID=1 || true; }
# systemd_messages_match UNIT REGEX: one of systemd's own messages about UNIT matches REGEX
systemd_messages_match() { systemd_messages "$1" | grep -qE "$2"; }
# journal_count UNIT COND...: how many entries match
journal_count() { local u=$1; shift; journal_json "$u" | python3 "$BATON_TESTS/helpers/journal.py" --count "$@" || true; }
# journal_text UNIT: the unit's messages as text (for grep), with the sender
journal_text() { journalctl -b -u "$1" -o short-precise --no-pager; }

# -------------------------------------------------------------------- HTTP ----
# http_get PATH|URL [CURL ARGS...]: GET (or whatever the args say) with curl; sets
#   HTTP_STATUS  status code (000 when there was no response)
#   HTTP_BODY    the body (trailing newlines stripped)
#   HTTP_HEADERS the response head, CRs removed
#   HTTP_ERROR   curl's error message, if any
# Returns curl's exit status (0 when a response arrived, whatever its status).
http_get() {
  local url=$1; shift; local rc=0
  case "$url" in /*) url=$BATON_URL$url;; esac
  : > "$CASE_TMP/h"; : > "$CASE_TMP/b"
  HTTP_STATUS=$(curl -sS --max-time "$HTTP_TIMEOUT" -D "$CASE_TMP/h" -o "$CASE_TMP/b" \
                     -w '%{http_code}' "$@" "$url" 2>"$CASE_TMP/e") || rc=$?
  HTTP_BODY=$(cat "$CASE_TMP/b")
  HTTP_HEADERS=$(tr -d '\r' < "$CASE_TMP/h")
  HTTP_ERROR=$(cat "$CASE_TMP/e")
  [ -n "$HTTP_STATUS" ] || HTTP_STATUS=000
  return $rc
}
# http_status PATH|URL [CURL ARGS...]: prints only the status code
http_status() { http_get "$@"; echo "$HTTP_STATUS"; }
# http_ok PATH|URL: the answer is 200 (for wait_for)
http_ok() { http_get "$@" && [ "$HTTP_STATUS" = 200 ]; }
# header NAME [HEADERS]: value of a response header (case-insensitive; default HTTP_HEADERS)
header() {
  printf '%s\n' "${2-$HTTP_HEADERS}" | awk -v n="$1" 'BEGIN{n=tolower(n)}
    { i=index($0,":"); if (i && tolower(substr($0,1,i-1))==n) { v=substr($0,i+1); sub(/^[ \t]+/,"",v); print v; exit } }'
}
# json_get JSON KEY[.KEY...]: a field of a JSON document (strings raw, others as JSON)
json_get() {
  python3 -c 'import json,sys
v=json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v=v[int(k)] if isinstance(v,list) else v[k]
print(v if isinstance(v,str) else json.dumps(v))' "$1" "$2"
}
# version_field KEY: a field of GET /-/version (pid, generation, version, started, listeners)
version_field() { http_get /-/version >/dev/null && [ "$HTTP_STATUS" = 200 ] && json_get "$HTTP_BODY" "$1"; }
# metric NAME: the value of an unlabelled metric from GET /-/metrics
metric() { http_get /-/metrics && awk -v n="$1" '$1==n{print $2; f=1} END{exit !f}' <<<"$HTTP_BODY"; }

# held_request_start PATH [HOST] [PORT]: opens a connection and sends all of a GET request head
# but its final empty line, in the background: a request in flight that the server cannot finish
# until held_request_release. Sets HELD_DIR and HELD_PORT (the client's local port; see
# conn_accepted_by). Returns non-zero if the connection could not be made.
held_request_start() {
  local path=$1 host=${2:-127.0.0.1} port=${3:-8080}
  HELD_DIR=$(mktemp -d "$CASE_TMP/held.XXXXXX")
  python3 "$BATON_TESTS/helpers/held_request.py" "$host" "$port" "$path" "$HELD_DIR" 60 &
  HELD_PID=$!
  at_exit kill "$HELD_PID"
  wait_for 10 test -e "$HELD_DIR/sent" || return 1
  HELD_PORT=$(cat "$HELD_DIR/sent")
}
# held_request_release: sends the end of the head and waits for the answer; sets HELD_STATUS
# (000 when none), HELD_HEADERS (CRs removed), HELD_ERROR. Returns the helper's exit status.
held_request_release() {
  local rc=0
  touch "$HELD_DIR/go"
  wait "$HELD_PID" || rc=$?
  HELD_HEADERS=$(python3 -c 'import sys
d=open(sys.argv[1],"rb").read()
sys.stdout.write(d.split(b"\r\n\r\n")[0].decode("latin-1").replace("\r",""))' "$HELD_DIR/response" 2>/dev/null)
  HELD_STATUS=$(head -n 1 <<<"$HELD_HEADERS" | awk '/^HTTP\//{print $2}')
  [ -n "$HELD_STATUS" ] || HELD_STATUS=000
  HELD_ERROR=$(cat "$HELD_DIR/error" 2>/dev/null || true)
  return $rc
}

# -------------------------------------------------------------------- load ----
# HTTP load from helpers/load.py (see its header): keep-alive clients that reuse a connection
# until the server says `Connection: close`, and clients that open a fresh connection per
# request, all to 127.0.0.1; every failure is recorded. One load at a time per case.
LOAD_DIR= LOAD_PID= LOAD_REPORT= LOAD_OK= LOAD_FAILED= LOAD_STOPPED_BY=
# load_start [LOAD.PY OPTIONS...]: starts the load in the background (files in a new LOAD_DIR,
# --max-seconds 120 unless given: it always ends by itself) and waits until both kinds of client
# have had a successful request. Non-zero, with the reason on stdout, if that does not happen.
load_start() {
  LOAD_DIR=$(mktemp -d "$CASE_TMP/load.XXXXXX")
  LOAD_REPORT= LOAD_OK= LOAD_FAILED= LOAD_STOPPED_BY=
  python3 "$BATON_TESTS/helpers/load.py" "$LOAD_DIR" --max-seconds 120 "$@" >"$LOAD_DIR/out" 2>&1 &
  LOAD_PID=$!
  at_exit kill "$LOAD_PID"
  wait_for 10 load_progress 'p["kinds"]["keepalive"]["ok"] > 0 and p["kinds"]["fresh"]["ok"] > 0' || {
    echo "load_start: no successful request from both kinds of client within 10 s"
    cat "$LOAD_DIR/out" "$LOAD_DIR/progress.json" 2>/dev/null
    return 1
  }
}
# load_progress PYTHON_EXPR: true when EXPR holds for the running load's progress (a dict p, as
# in report.json without the failure list), e.g. load_progress 'p["ok"] >= 1000'
load_progress() {
  python3 -c 'import json,sys
p=json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2]) else 1)' "$LOAD_DIR/progress.json" "$1" 2>/dev/null
}
# load_ok: the running load's count of successful requests so far
load_ok() { json_get "$(cat "$LOAD_DIR/progress.json")" ok; }
# load_saw_generation G: both kinds of client have had /-/version answered by generation G
load_saw_generation() {
  load_progress "p['generations']['keepalive'].get('$1', 0) > 0 and p['generations']['fresh'].get('$1', 0) > 0"
}
# load_stop: creates the stop file and waits for the report (up to 20 s); sets LOAD_REPORT
# (its path), LOAD_OK, LOAD_FAILED, LOAD_STOPPED_BY (stop-file, SIGTERM or max-seconds).
# Non-zero, with the reason on stdout, if no report came.
load_stop() {
  touch "$LOAD_DIR/stop"
  if ! wait_for 20 test -s "$LOAD_DIR/report.json"; then
    echo "load_stop: no report in $LOAD_DIR within 20 s"; cat "$LOAD_DIR/out" 2>/dev/null
    kill "$LOAD_PID" 2>/dev/null
    return 1
  fi
  wait "$LOAD_PID" 2>/dev/null
  LOAD_REPORT=$LOAD_DIR/report.json
  # read from the file: a report with hundreds of failures is too long for an argument
  read -r LOAD_OK LOAD_FAILED LOAD_STOPPED_BY < <(python3 -c 'import json,sys
r=json.load(open(sys.argv[1])); print(r["ok"], r["failed"], r["stopped_by"])' "$LOAD_REPORT")
}
# load_summary [N]: one line about the stopped load's report, then its N slowest requests
load_summary() {
  python3 -c 'import json,sys
r=json.load(open(sys.argv[1])); k=r["kinds"]; l=r["latency_ms"]
print("%d ok, %d failed in %.1f s (%.0f/s); keep-alive: %d ok on %d connections, %d closed by the server with Connection: close; fresh: %d ok; latency p50 %s ms, p99 %s ms, max %s ms; pids: %d" % (
  r["ok"], r["failed"], r["duration_s"], r["requests_per_s"], k["keepalive"]["ok"], k["keepalive"]["connections"],
  k["keepalive"]["server_closes"], k["fresh"]["ok"], l["p50"], l["p99"], l["max"], len(r["pids"])))
for d in r["slowest"][:int(sys.argv[2])]:
    print("  slow: %(ms)s ms at t=%(t)ss (%(time)s) %(worker)s GET %(path)s, request #%(request_on_connection)s on its connection, answered by pid %(pid)s" % d)' "$LOAD_REPORT" "${1:-0}"
}
# load_failures: the stopped load's failures, one line each (for a FAIL's details)
load_failures() {
  python3 -c 'import json,sys
r=json.load(open(sys.argv[1]))
for f in r["failures"]:
    print("t=%(t)ss %(time)s %(worker)s phase=%(phase)s %(error)s; request #%(request_on_connection)s on its connection (local port %(local_port)s, last answered by pid %(last_pid)s, generation %(last_generation)s) GET %(path)s" % f)
if r["failures_dropped"]: print("... and %d more" % r["failures_dropped"])
if r["threads_stuck"]: print("threads still in a request at the end: %s" % ", ".join(r["threads_stuck"]))' "$LOAD_REPORT"
}
